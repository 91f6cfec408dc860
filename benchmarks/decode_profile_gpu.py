"""Where the inference time goes: device kernels of a decode step, a prefill chunk and a streamed frame.

    python -m benchmarks.decode_profile_gpu [--context 4096] [--steps 16] [--out FILE] [--hlo-dir DIR]
    python -m benchmarks.decode_profile_gpu --smoke     # tiny presets, any backend

For the hybrid (InfiniteVL-4B preset) and the teacher (Qwen2.5-VL-3B preset), random bf16 weights,
batch 1, a ``--context``-token text prompt prefilled first. Each workload runs untraced for its
wall time, then under ``jax.profiler.trace``; the trace's device events (kernels on GPU, XLA ops on
CPU) are summed by kernel name, per call:

- ``decode``: one ``DecoderEngine.decode_step`` (greedy), both models;
- ``prefill_chunk``: one ``--chunk``-token prefill chunk on the constant cache (hybrid);
- ``frame``: one 448x448 frame through ``StreamingSession.push_frame`` (ViT + its 256-token chunk),
  with the default (on GPU: unrolled) decoder engine and vision encoder; ``frame_scanned``: the
  same with both scanned. ``host_ms``: the median time ``push_frame`` takes to return (host work
  and dispatch; the device runs on asynchronously).

Per workload it prints wall ms, device-busy ms (the sum of kernel times), kernels per call, the
kernel time by kind and the top kernels (for the prefill chunk, with the source op of each XLA
fusion); ``--hlo-dir`` also writes the compiled decode step's and prefill chunk's HLO text (fusion
names in the table are its instruction names). Wall well above busy time means launch or host overhead; busy
time well above the bandwidth floor (parameter bytes / HBM bandwidth for a decode step) means slow
kernels.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import add_out_argument
from benchmarks.inference_gpu import MODELS, SMOKE_MODELS, build_model
from benchmarks.kernel_profile import profile


def profile_model(kind: str, args, hlo_dir: str | None) -> list[dict]:
    import jax
    from flax import nnx

    from infinitevl_jax.infer import DecoderEngine, SamplingConfig, cache_bytes

    streaming = kind == "hybrid" and args.frames
    preset, overrides = SMOKE_MODELS[kind] if args.smoke else (MODELS[kind], [])
    model = build_model(preset, overrides, with_vision=streaming)
    engine = DecoderEngine(model.language_model if streaming else model, chunk_size=args.chunk)
    decoder = engine.decoder  # the engine's weights (unstacked on GPU; the VLM keeps the stacked ones for frames)
    full_attention = "full_attention" in decoder.cfg.layer_types
    context = args.context
    ids = np.random.default_rng(0).integers(0, decoder.cfg.vocab_size, (1, context)).astype(np.int32)
    positions = np.broadcast_to(np.arange(context, dtype=np.int32), (3, 1, context))
    cache = decoder.init_cache(1, context + 4 * args.steps + 8 if full_attention else None)
    logits, cache = engine.prefill(cache, positions, input_ids=ids, donate=True)
    greedy = SamplingConfig()
    state = dict(cache=cache, tokens=engine.sample(logits, None, greedy), counts=np.array([context], np.int32),
                 key=jax.random.key(0))
    deltas = np.zeros(1, np.int32)

    def decode(block=True):
        s = state
        s["tokens"], s["counts"], s["key"], s["cache"] = engine.decode_step(s["cache"], s["tokens"], s["counts"],
                                                                            deltas, s["key"], greedy)
        if block:
            jax.block_until_ready(s["tokens"])

    decode()  # compiles
    start = time.perf_counter()  # back to back, as benchmarks/inference_gpu times them
    for _ in range(args.steps):
        decode(block=False)
    jax.block_until_ready(state["tokens"])
    back_to_back_ms = (time.perf_counter() - start) / args.steps * 1e3
    rows = [profile("decode", decode, args.steps)]
    rows[-1]["back_to_back_ms"] = back_to_back_ms
    rows[-1].update(parameter_bytes=cache_bytes(nnx.state(decoder, nnx.Param)), unrolled=isinstance(decoder.blocks, nnx.List))
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        text = engine.compiled_decode(state["cache"], greedy).as_text()
        with open(os.path.join(hlo_dir, f"{kind}_decode_step.hlo.txt"), "w") as f:
            f.write(text)
    if kind != "hybrid":
        return [dict(model=kind, **r) for r in rows]

    chunk_ids = ids[:, :args.chunk] if context >= args.chunk else np.resize(ids, (1, args.chunk))
    chunk_positions = np.broadcast_to(np.arange(args.chunk, dtype=np.int32), (3, 1, args.chunk))

    def prefill_chunk():
        logits, state["cache"] = engine.prefill(state["cache"], chunk_positions + int(state["counts"][0]),
                                                input_ids=chunk_ids, donate=True)
        jax.block_until_ready(logits)

    prefill_hlo = engine.compiled_prefill(state["cache"], args.chunk).as_text()
    if hlo_dir:
        with open(os.path.join(hlo_dir, f"{kind}_prefill_chunk.hlo.txt"), "w") as f:
            f.write(prefill_hlo)
    rows.append(profile("prefill_chunk", prefill_chunk, 3, prefill_hlo))
    if streaming:
        from infinitevl_jax.data.tokenizer import ByteTokenizer
        from infinitevl_jax.infer import StreamingSession
        from infinitevl_jax.infer.generate import image_processor_for
        from infinitevl_jax.infer.vision_encoder import VisionEncoder

        frame = np.random.default_rng(1).integers(0, 256, (args.frame_size, args.frame_size, 3), dtype=np.uint8)
        chunk = max(64, (args.frame_size // 28) ** 2)
        for name, unrolled in (("frame", None), ("frame_scanned", False)):
            frame_engine = DecoderEngine(model.language_model, chunk_size=chunk, min_bucket=64, unroll_layers=unrolled)
            vision = VisionEncoder(model.visual, image_processor_for(model), unroll_layers=unrolled)
            session = StreamingSession(model, ByteTokenizer(), engine=frame_engine, vision=vision,
                                       frame_size=args.frame_size)
            clock, host_s = iter(range(10 ** 6)), []

            def push_frame():
                start = time.perf_counter()
                session.push_frame(frame, next(clock) / 2)
                host_s.append(time.perf_counter() - start)
                session.synchronize()

            for _ in range(2):
                push_frame()
            rows.append(profile(name, push_frame, args.frames))
            rows[-1].update(unrolled=frame_engine.unroll_layers, host_ms=float(np.median(host_s[2:])) * 1e3)
            del frame_engine, vision, session
    return [dict(model=kind, **r) for r in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=8192, help="hybrid prefill chunk (tokens)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled")
    parser.add_argument("--frames", type=int, default=8, help="streamed frames profiled (0: skip)")
    parser.add_argument("--frame-size", type=int, default=448)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--hlo-dir", default=None, help="write the compiled decode steps' (and the hybrid's "
                                                        "prefill chunk's) HLO text here")
    add_out_argument(parser, "decode_profile_gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny presets and sizes; runs on the CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.context, args.chunk, args.steps, args.frames, args.frame_size = 64, 64, 2, 1, 112

    from benchmarks.common import announce_device, out_path, print_table, write_json

    device = announce_device(args.smoke)
    rows = []
    for kind in args.models:
        rows += profile_model(kind, args, args.hlo_dir)
    print()
    print_table([dict(r, host_ms=r.get("host_ms", "")) for r in rows],
                ["model", "workload", "wall_ms", "busy_ms", "host_ms", "kernels_per_call"])
    print("decode back to back (ms per token):", {r["model"]: round(r["back_to_back_ms"], 3) for r in rows
                                                  if r["workload"] == "decode"})
    for r in rows:
        print(f"\n{r['model']} {r['workload']}: kernel time by kind")
        print_table(r["by_kind"], ["kind", "us_per_call"])
        print(f"\n{r['model']} {r['workload']}: top kernels")
        print_table(r["top"], ["kernel", "us_per_call", "launches_per_call", "op"])
    out = out_path(args, "decode_profile_gpu")
    write_json(out, dict(benchmark="decode_profile_gpu", device=device, smoke=args.smoke,
                         settings=dict(context=args.context, chunk=args.chunk, steps=args.steps, frames=args.frames,
                                       frame_size=args.frame_size, dtype="bfloat16 params and compute"),
                         rows=rows))


if __name__ == "__main__":
    main()
