"""Constant-memory inference on one GPU: InfiniteVL-4B (hybrid) vs its full-attention teacher.

    python -m benchmarks.inference_gpu [--contexts 4096 16384 65536 262144] [--out FILE]
    python -m benchmarks.inference_gpu --smoke      # tiny presets, short contexts, any backend

Both models have random weights (bfloat16 parameters and compute), batch 1, text-only prompts of
random ids. Per model and context L:

- prefill: L tokens through ``DecoderEngine.prefill`` (cache donated), timed on a second run
  (``first_call_s``: the first one, compile and first-execution costs included). The hybrid runs
  chunks of ``--chunk`` tokens (its cache is fixed, so one program serves every L); the teacher
  runs the whole prompt in one call from an empty cache, i.e. causal cuDNN flash attention as in
  a FlashAttention-2 ``transformers`` prefill, into a KV cache of L + decode tokens (it grows
  with L; the teacher runs until it is out of memory).
- decode: mean per-token latency of ``--decode-tokens`` greedy ``decode_step`` calls after
  ``DECODE_WARMUP`` steps (one token per call, dispatched back to back, synchronised at the end).
- memory: the cache's exact bytes, the decode step's XLA temp buffer (``decode_step_temp_bytes``:
  close to the cache's size if a step copies its cache), and ``peak_bytes_in_use`` of the
  device; each model runs in a fresh process with contexts in increasing order, so the peak is
  the running maximum of that model's cases so far (the largest case's own peak for increasing
  workloads; on GPU it includes the engine's one-time copy of the block weights out of their
  stack, see ``DecoderEngine``); ``bytes_in_use``: the device's live bytes after the case
  (weights, cache, compiled buffers).
- ``e2e_s``: prefill + ``--decode-tokens`` tokens; the ratios (teacher / hybrid) come from the
  same run.

Streaming (hybrid): ``--frames`` random 448x448 frames through ``StreamingSession.push_frame``
(image processor on the host, ViT, decoder chunk of 256 tokens on the constant cache) after 3
warm-up frames: ``fps_latency`` waits for each frame before the next (per-frame latency), and
``fps_pipelined`` lets the host prepare frame i + 1 while the device runs frame i; ``host_ms_mean``
is the time ``push_frame`` takes to return (resize, dispatch), which latency mode cannot hide.

Targets (issue 7, H100/H200): decode latency flat within 10% from 4K to 256K; constant cache;
prefill + decode at 64K at least 3.6x faster than the teacher; streaming at least 60 FPS.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks.common import add_out_argument, device_memory_bytes, model_worker_args, rows_until_oom, run_if_worker

SMOKE = dict(contexts=[64, 256], chunk=64, decode_tokens=4, frames=4, frame_size=112)
MODELS = {"hybrid": "infinitevl_4b", "teacher": "qwen2_5_vl_3b"}
SMOKE_MODELS = {"hybrid": ("tiny", []),
                "teacher": ("tiny", [f"--config.model.layer_types={('full_attention',) * 8!r}"])}
TARGETS = dict(decode_flat_within=0.10, e2e_speedup_at_65536=3.6, streaming_fps=60.0)
DECODE_WARMUP = 4


def _build(kind: str, smoke: bool, with_vision: bool):
    """The model (VLM for the hybrid's streaming, decoder only otherwise) with bf16 parameters."""
    preset, overrides = SMOKE_MODELS[kind] if smoke else (MODELS[kind], [])
    return build_model(preset, overrides, with_vision)


def build_model(preset: str, overrides: list[str], with_vision: bool = False):
    """``preset`` (with ``--config.`` overrides) as a VLM, or its decoder only, with bf16 parameters and compute."""
    from flax import nnx

    from infinitevl_jax.config import load_config
    from infinitevl_jax.models import Decoder
    from infinitevl_jax.models.config import VisionLanguageConfig
    from infinitevl_jax.models.vlm import VisionLanguageModel

    cfg = VisionLanguageConfig.from_config(load_config(preset, overrides)).with_dtypes("bfloat16", "bfloat16")
    if with_vision:
        return VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
    return Decoder(cfg.decoder, rngs=nnx.Rngs(0))


def measure_context(engine, context: int, decode_tokens: int) -> dict:
    """Prefill of ``context`` random tokens (chunks of ``engine.chunk_size``, at most the context)
    twice -- the first run compiles and pays first-execution costs, the second is timed -- then
    ``decode_tokens`` timed decode steps after ``DECODE_WARMUP``."""
    import jax

    from infinitevl_jax.infer import SamplingConfig, cache_bytes

    decoder = engine.decoder
    full_attention = "full_attention" in decoder.cfg.layer_types
    if context % min(engine.chunk_size, context):
        raise ValueError(f"context {context} is not a multiple of the prefill chunk {engine.chunk_size}")
    ids = np.random.default_rng(context).integers(0, decoder.cfg.vocab_size, (1, context)).astype(np.int32)
    positions = np.broadcast_to(np.arange(context, dtype=np.int32), (3, 1, context))

    def prefill():
        cache = decoder.init_cache(1, context + DECODE_WARMUP + decode_tokens + 1 if full_attention else None)
        start = time.perf_counter()
        logits, cache = engine.prefill(cache, positions, input_ids=ids, donate=True)
        jax.block_until_ready(logits)
        return time.perf_counter() - start, logits, cache

    first_call_s = prefill()[0]
    prefill_s, logits, cache = prefill()

    greedy = SamplingConfig()
    tokens = engine.sample(logits, None, greedy)
    counts, deltas, key = np.array([context], np.int32), np.zeros(1, np.int32), jax.random.key(0)
    for _ in range(DECODE_WARMUP):  # the first step compiles
        tokens, counts, key, cache = engine.decode_step(cache, tokens, counts, deltas, key, greedy)
    jax.block_until_ready(tokens)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        tokens, counts, key, cache = engine.decode_step(cache, tokens, counts, deltas, key, greedy)
    jax.block_until_ready(tokens)
    decode_ms = (time.perf_counter() - start) / decode_tokens * 1e3
    step_memory = engine.compiled_decode(cache, greedy).memory_analysis()
    return dict(context=context, prefill_chunk=min(engine.chunk_size, context), first_call_s=first_call_s,
                prefill_s=prefill_s, prefill_tokens_per_s=context / prefill_s, decode_ms_per_token=decode_ms,
                e2e_s=prefill_s + decode_tokens * decode_ms / 1e3, cache_bytes=cache_bytes(cache),
                decode_step_temp_bytes=step_memory.temp_size_in_bytes, peak_bytes_so_far=device_memory_bytes("peak_bytes_in_use"),
                bytes_in_use=device_memory_bytes("bytes_in_use"))


def measure_streaming(model, frames: int, frame_size: int) -> dict:
    """FPS of ``push_frame`` on random frames (see the module docstring)."""
    from infinitevl_jax.data.tokenizer import ByteTokenizer
    from infinitevl_jax.infer import DecoderEngine, StreamingSession, cache_bytes

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (frame_size, frame_size, 3), dtype=np.uint8) for _ in range(frames + 3)]
    tokens_per_frame = (frame_size // 28) ** 2
    # One program for every text piece (the prompt's start, <|vision_start|>: buckets of 64) and one per frame.
    engine = DecoderEngine(model.language_model, chunk_size=max(64, tokens_per_frame), min_bucket=64)
    session = StreamingSession(model, ByteTokenizer(), engine=engine, frame_size=frame_size)
    start = time.perf_counter()
    for i in range(3):  # compiles: ViT, the frame chunk, <|vision_start|>
        session.push_frame(images[i], i / 2)
        session.synchronize()
    warmup_s = time.perf_counter() - start
    latencies, host_latencies = [], []
    for i in range(3, frames + 3):
        start = time.perf_counter()
        session.push_frame(images[i], i / 2)
        host_latencies.append(time.perf_counter() - start)
        session.synchronize()
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(frames):
        session.push_frame(images[i], (frames + 3 + i) / 2)
    session.synchronize()
    pipelined_s = time.perf_counter() - start
    return dict(frame_size=frame_size, frames=frames, tokens_per_frame=tokens_per_frame,
                warmup_compile_s=warmup_s, frame_ms_mean=float(np.mean(latencies)) * 1e3,
                frame_ms_max=float(np.max(latencies)) * 1e3, host_ms_mean=float(np.mean(host_latencies)) * 1e3,
                fps_latency=1 / float(np.mean(latencies)),
                fps_pipelined=frames / pipelined_s, stream_tokens=session.tokens_seen,
                cache_bytes=cache_bytes(session.cache))


def worker(args) -> dict:
    """One model's cases in this process (``--worker hybrid|teacher``)."""
    import jax
    from flax import nnx

    from infinitevl_jax.infer import DecoderEngine

    kind = args.worker
    streaming = kind == "hybrid" and args.frames > 0
    start = time.perf_counter()
    model = _build(kind, args.smoke, with_vision=streaming)
    engine = DecoderEngine(model.language_model if streaming else model, chunk_size=args.chunk)
    decoder = engine.decoder  # unstacked on GPU; the stacked original is dropped: one copy of the weights
    if streaming:
        model.language_model = decoder
    else:
        model = decoder
    jax.block_until_ready(nnx.state(decoder))
    build_s = time.perf_counter() - start

    def measure(context):
        nonlocal engine
        if kind == "teacher":  # the whole prompt in one call; its cache (and programs) grow with the context
            engine = DecoderEngine(decoder, chunk_size=context)
        return measure_context(engine, context, args.decode_tokens)

    rows = rows_until_oom(kind, args.contexts, measure)
    result = dict(model=kind, build_s=build_s, rows=rows, last_engine_compiles=engine.compile_counts())
    if streaming:
        result["streaming"] = measure_streaming(model, args.frames, args.frame_size)
    return result


def summarise(results: dict, args) -> dict:
    """Ratios teacher / hybrid per context and the target verdicts."""
    hybrid = {r["context"]: r for r in results["hybrid"]["rows"] if not r.get("oom")}
    teacher = {r["context"]: r for r in results["teacher"]["rows"]}
    ratios = []
    for context, ours in hybrid.items():
        row = dict(context=context)
        theirs = teacher.get(context)
        if theirs is None or theirs.get("oom"):
            row.update(teacher="out of memory" if theirs else "not run")
        else:
            row.update(prefill_speedup=theirs["prefill_s"] / ours["prefill_s"],
                       decode_speedup=theirs["decode_ms_per_token"] / ours["decode_ms_per_token"],
                       e2e_speedup=theirs["e2e_s"] / ours["e2e_s"],
                       cache_ratio=theirs["cache_bytes"] / ours["cache_bytes"])
        ratios.append(row)
    decode = [r["decode_ms_per_token"] for r in hybrid.values()]
    spread = (max(decode) - min(decode)) / min(decode)
    verdicts = dict(decode_flat=dict(spread=spread, met=spread <= TARGETS["decode_flat_within"]),
                    cache_constant=dict(met=len({r["cache_bytes"] for r in hybrid.values()}) == 1))
    at_64k = next((r for r in ratios if r["context"] == 65536 and "e2e_speedup" in r), None)
    if at_64k is not None:
        verdicts["e2e_speedup_at_65536"] = dict(value=at_64k["e2e_speedup"],
                                                met=at_64k["e2e_speedup"] >= TARGETS["e2e_speedup_at_65536"])
    stream = results["hybrid"].get("streaming")
    if stream is not None:
        verdicts["streaming_fps"] = dict(fps_latency=stream["fps_latency"], fps_pipelined=stream["fps_pipelined"],
                                         met=stream["fps_latency"] >= TARGETS["streaming_fps"])
    return dict(ratios=ratios, verdicts=verdicts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser, "inference_gpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--chunk", type=int, default=8192, help="hybrid prefill chunk (tokens; contexts must be "
                                                                 "multiples of it or smaller)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--frames", type=int, default=64, help="streamed frames (0: skip streaming)")
    parser.add_argument("--frame-size", type=int, default=448)
    parser.add_argument("--smoke", action="store_true", help="tiny presets and sizes; runs on the CPU")
    args = model_worker_args(parser, argv, MODELS, SMOKE)
    if run_if_worker(args, worker):
        return

    from benchmarks.common import announce_device, out_path, print_table, run_worker_process, write_json

    device = announce_device(args.smoke)
    results = {}
    for kind in MODELS:  # a fresh process per model: its own memory peak, no leftovers
        results[kind] = run_worker_process("benchmarks.inference_gpu", kind, [
            "--contexts", *map(str, args.contexts), "--chunk", str(args.chunk),
            "--decode-tokens", str(args.decode_tokens), "--frames", str(args.frames),
            "--frame-size", str(args.frame_size)] + (["--smoke"] if args.smoke else []))
    rows = [r for kind in MODELS for r in results[kind]["rows"]]
    columns = ["model", "context", "prefill_s", "decode_ms_per_token", "e2e_s", "cache_bytes", "peak_bytes_so_far",
               "bytes_in_use", "first_call_s"]
    print()
    print_table([{c: r.get(c, "OOM" if r.get("oom") else "") for c in columns} for r in rows], columns)
    summary = summarise(results, args)
    print()
    print_table(summary["ratios"], sorted({k for r in summary["ratios"] for k in r}, key=["context", "teacher",
                "prefill_speedup", "decode_speedup", "e2e_speedup", "cache_ratio"].index))
    if "streaming" in results["hybrid"]:
        print()
        print_table([results["hybrid"]["streaming"]], list(results["hybrid"]["streaming"]))
    print()
    for name, verdict in summary["verdicts"].items():
        print(f"target {name}: {'MET' if verdict['met'] else 'MISSED'} {verdict}")
    out = out_path(args, "inference_gpu")
    write_json(out, dict(benchmark="inference_gpu", device=device, smoke=args.smoke, targets=TARGETS,
                         settings=dict(contexts=args.contexts, hybrid_chunk=args.chunk, teacher_chunk="whole prompt",
                                       decode_tokens=args.decode_tokens, dtype="bfloat16 params and compute",
                                       batch=1, peak_memory="running max per model process, contexts ascending"),
                         models=results, **summary))


if __name__ == "__main__":
    main()
