"""Time to first token on one GPU: LinMU (36 M-MATE layers) vs its full-attention teacher, Qwen2.5-VL-3B.

    python -m benchmarks.linmu_prefill_gpu [--contexts 4096 16384 65536] [--iters 3] [--out FILE]
    python -m benchmarks.linmu_prefill_gpu --smoke      # tiny presets, short contexts, any backend

LinMU's claim: up to 2.7x lower time-to-first-token than the teacher on minute-length videos.

Time to first token = the prefill of a prompt of L tokens, batch 1, through
``DecoderEngine.prefill`` (cache donated) up to the last token's logits. Both decoders have
random weights (bfloat16 parameters and compute); the vision tower is left out (it is the same
in both models, so it adds the same time to both). The prompt imitates a question about a video:

- 16 text tokens (ids 0..15 on all three mRoPE axes),
- a video run of L - 48 vision tokens (``vision_mask`` True), frames of ``--grid`` (16 x 16)
  merged tokens, the last frame possibly partial, with Qwen2.5-VL's mRoPE ids
  (start + 2 * frame, start + row, start + col), start = 16,
- 32 text tokens continuing after the largest id.

Token ids are random (the decoder embeds them). Both models get the same ids, positions and
vision mask (attention layers ignore the mask). Per model and context L:

- LinMU: the whole prompt in one prefill chunk (``chunk_size`` = L: M-MATE layers take a vision
  run whole), from ``init_cache(1)`` (its fixed-size state);
- teacher: the whole prompt in one call from an empty cache of L + 16 tokens, i.e. causal
  (cuDNN flash, ``attention_impl="auto"``) attention as in a ``transformers`` prefill;
- ``first_call_s``: the first prefill (compile and first-execution costs included), then
  ``ttft_ms``: the median of ``--iters`` timed prefills, each on a fresh cache made before the
  clock starts and synchronised with ``jax.block_until_ready``;
- memory: ``peak_bytes_in_use`` of the device; each model runs in a fresh process with contexts
  in increasing order, so it is the running maximum of that model's cases so far. Out of memory:
  recorded as such, and that model's larger contexts are skipped.

``speedup`` = teacher TTFT / LinMU TTFT at each context (same run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import add_out_argument, device_memory_bytes, model_worker_args, rows_until_oom, run_if_worker
from benchmarks.inference_gpu import build_model
from infinitevl_jax.models.config import mmate_layer_types

TEXT_BEFORE, TEXT_AFTER = 16, 32  # text tokens before and after the video run
SMOKE = dict(contexts=[300, 600], grid=[4, 4])
MODELS = {"teacher": ("qwen2_5_vl_3b", []), "linmu": ("linmu", [])}
SMOKE_MODELS = {"teacher": ("tiny", [f"--config.model.layer_types={('full_attention',) * 8!r}"]),
                "linmu": ("tiny", [f"--config.model.layer_types={mmate_layer_types(8)!r}"])}
CLAIM_SPEEDUP = 2.7  # LinMU: "up to 2.7x" lower time to first token than the teacher
TEACHER_SPARE_TOKENS = 16  # the teacher's KV cache holds L + this many tokens


def video_prompt(context: int, grid: tuple[int, int], vocab_size: int):
    """``(input_ids [1, L], position_ids [3, 1, L], vision_mask [1, L])`` of the prompt in the module docstring."""
    rows, cols = grid
    video = context - TEXT_BEFORE - TEXT_AFTER
    if video < 1:
        raise ValueError(f"context {context} leaves no vision tokens (it needs more than {TEXT_BEFORE + TEXT_AFTER})")
    frame, cell = np.divmod(np.arange(video), rows * cols)
    row, col = np.divmod(cell, cols)
    video_ids = TEXT_BEFORE + np.stack([2 * frame, row, col])  # [3, video]: temporal, height, width
    after = video_ids.max() + 1 + np.arange(TEXT_AFTER)
    positions = np.concatenate([np.broadcast_to(np.arange(TEXT_BEFORE), (3, TEXT_BEFORE)), video_ids,
                                np.broadcast_to(after, (3, TEXT_AFTER))], axis=1).astype(np.int32)[:, None]
    vision_mask = np.zeros((1, context), bool)
    vision_mask[0, TEXT_BEFORE:TEXT_BEFORE + video] = True
    ids = np.random.default_rng(context).integers(0, vocab_size, (1, context)).astype(np.int32)
    return ids, positions, vision_mask


def measure_context(engine, context: int, grid: tuple[int, int], iters: int) -> dict:
    """One prefill of the ``context``-token video prompt (compiles), then ``iters`` timed ones."""
    import jax

    from infinitevl_jax.infer import cache_bytes

    decoder = engine.decoder
    ids, positions, vision_mask = video_prompt(context, grid, decoder.cfg.vocab_size)
    max_len = context + TEACHER_SPARE_TOKENS if "full_attention" in decoder.cfg.layer_types else None

    def prefill():
        """Seconds of one prefill on a fresh cache (made and ready before the clock starts), and its logits."""
        cache = jax.block_until_ready(decoder.init_cache(1, max_len))
        start = time.perf_counter()
        logits, cache = engine.prefill(cache, positions, input_ids=ids, vision_mask=vision_mask, donate=True)
        jax.block_until_ready((logits, cache))
        return time.perf_counter() - start, np.asarray(logits), cache_bytes(cache)

    first_call_s, logits, cache_size = prefill()
    times = [prefill()[0] for _ in range(iters)]
    ttft = statistics.median(times)
    return dict(context=context, vision_tokens=int(vision_mask.sum()), prefill_chunk=engine.chunk_size,
                first_call_s=first_call_s, ttft_ms=ttft * 1e3, times_ms=[t * 1e3 for t in times],
                prefill_tokens_per_s=context / ttft, prefill_programs=engine.compile_counts()["prefill"],
                logits_finite=bool(np.isfinite(logits).all()), cache_bytes=cache_size,
                peak_bytes_so_far=device_memory_bytes("peak_bytes_in_use"))


def worker(args) -> dict:
    """One model's contexts in this process (``--worker teacher|linmu``)."""
    import jax
    from flax import nnx

    from infinitevl_jax.infer import DecoderEngine

    kind = args.worker
    preset, overrides = (SMOKE_MODELS if args.smoke else MODELS)[kind]
    start = time.perf_counter()
    decoder = DecoderEngine(build_model(preset, overrides)).decoder  # unstacked once on GPU, shared by the engines
    jax.block_until_ready(nnx.state(decoder))
    build_s = time.perf_counter() - start
    rows = rows_until_oom(kind, args.contexts, lambda context: measure_context(
        DecoderEngine(decoder, chunk_size=context), context, tuple(args.grid), args.iters))  # one chunk, no padding
    return dict(model=kind, preset=preset, overrides=overrides, layers=decoder.cfg.num_layers,
                build_s=build_s, rows=rows)


def _gib(row: dict | None):
    """The row's peak memory in GiB, "oom", or "n/a" (not run, or a backend without memory stats)."""
    if row is None:
        return "n/a"
    if row.get("oom"):
        return "oom"
    peak = row.get("peak_bytes_so_far")
    return "n/a" if peak is None else peak / 2**30


def summarise(results: dict, contexts: list[int]) -> dict:
    """Per context: both TTFTs, the speedup (teacher / LinMU), both peaks; and the claim's verdict."""
    by_context = {kind: {r["context"]: r for r in results[kind]["rows"]} for kind in MODELS}
    ratios = []
    for context in contexts:
        teacher, linmu = by_context["teacher"].get(context), by_context["linmu"].get(context)
        ttft = {kind: ("not run" if row is None else "oom" if row.get("oom") else row["ttft_ms"])
                for kind, row in (("teacher", teacher), ("linmu", linmu))}
        both = all(isinstance(v, float) for v in ttft.values())
        ratios.append(dict(context=context, teacher_ttft_ms=ttft["teacher"], linmu_ttft_ms=ttft["linmu"],
                           speedup=ttft["teacher"] / ttft["linmu"] if both else "n/a",
                           teacher_peak_gib=_gib(teacher), linmu_peak_gib=_gib(linmu)))
    measured = [r for r in ratios if isinstance(r["speedup"], float)]
    best = max(measured, key=lambda r: r["speedup"], default=None)
    claim = dict(claimed_speedup=CLAIM_SPEEDUP, best_speedup=None if best is None else best["speedup"],
                 at_context=None if best is None else best["context"],
                 met=best is not None and best["speedup"] >= CLAIM_SPEEDUP)
    return dict(ratios=ratios, claim=claim)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser, "linmu_prefill_gpu")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--grid", type=int, nargs=2, default=[16, 16], metavar=("ROWS", "COLS"),
                        help="merged tokens per video frame")
    parser.add_argument("--iters", type=int, default=3, help="timed prefills per context (the median is reported)")
    parser.add_argument("--smoke", action="store_true", help="tiny presets and sizes; runs on the CPU")
    args = model_worker_args(parser, argv, MODELS, SMOKE)
    args.contexts = sorted(args.contexts)  # increasing: the running peak is the largest case's own
    if run_if_worker(args, worker):
        return

    from benchmarks.common import announce_device, out_path, print_table, run_worker_process, write_json

    for context in args.contexts:
        video_prompt(context, tuple(args.grid), 1)  # fails early on a context too short for the prompt
    device = announce_device(args.smoke)
    results = {}
    for kind in MODELS:  # a fresh process per model: its own memory peak, no leftovers
        results[kind] = run_worker_process("benchmarks.linmu_prefill_gpu", kind, [
            "--contexts", *map(str, args.contexts), "--grid", *map(str, args.grid),
            "--iters", str(args.iters)] + (["--smoke"] if args.smoke else []))
    rows = [r for kind in MODELS for r in results[kind]["rows"]]
    columns = ["model", "context", "first_call_s", "ttft_ms", "prefill_tokens_per_s", "cache_bytes",
               "peak_bytes_so_far", "logits_finite"]
    print()
    print_table([{c: r.get(c, "OOM" if r.get("oom") else "") for c in columns} for r in rows], columns)
    summary = summarise(results, args.contexts)
    print()
    print_table(summary["ratios"], list(summary["ratios"][0]))
    claim = summary["claim"]
    print()
    print(f"claim (up to {CLAIM_SPEEDUP}x lower TTFT): {'MET' if claim['met'] else 'MISSED'} {claim}")
    out = out_path(args, "linmu_prefill_gpu")
    write_json(out, dict(benchmark="linmu_prefill_gpu", device=device, smoke=args.smoke,
                         args=dict(contexts=args.contexts, grid=args.grid, iters=args.iters, smoke=args.smoke),
                         settings=dict(prompt=f"{TEXT_BEFORE} text + (L - {TEXT_BEFORE + TEXT_AFTER}) video "
                                              f"({args.grid[0]}x{args.grid[1]} frames) + {TEXT_AFTER} text tokens",
                                       linmu_chunk="whole prompt", teacher_chunk="whole prompt",
                                       teacher_cache_tokens=f"L + {TEACHER_SPARE_TOKENS}",
                                       dtype="bfloat16 params and compute", batch=1, vision_tower="excluded",
                                       ttft="median of iters prefills after a first (compiling) one",
                                       peak_memory="running max per model process, contexts ascending"),
                         models=results, **summary))


if __name__ == "__main__":
    main()
