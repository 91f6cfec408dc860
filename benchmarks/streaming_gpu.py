"""Streaming latency of the hybrid (InfiniteVL-4B) under XLA flag and model settings, one process each.

    python -m benchmarks.streaming_gpu [--settings default cublas_gemms ...] [--frames 32] [--context 8192]
                                       [--out FILE]
    python -m benchmarks.streaming_gpu --smoke      # tiny preset, 112x112 frames, any backend

A streamed 448x448 frame (``StreamingSession.push_frame``: resize on the host, ViT, one decoder
chunk of 256 tokens on the constant cache) is ~1,700 kernel launches when the layers are
unrolled; since the session donates its cache the latency is bound by the kernels, no longer by
the host's dispatch (benchmarks/RESULTS.md). Each setting in ``SETTINGS`` runs ``inference_gpu``'s
``measure_streaming`` in a fresh process with its ``XLA_FLAGS`` (read once per process), model
overrides and module constants: per-frame latency, the host time until ``push_frame`` returns,
pipelined FPS. So that a setting is judged on every inference workload it touches, the same
process then times a ``--context``-token prefill (one chunk) and 32 decode steps after it
(``measure_context``). A setting whose process fails (e.g. a flag this XLA does not know) is a
row with its error. The JSON is rewritten after every setting (``complete`` turns true at
the end).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

from benchmarks.common import add_out_argument, model_worker_args, run_if_worker, run_worker_process

# name -> XLA_FLAGS added to the process's own (see xla/debug_options_flags.cc for each flag),
# ``--config.`` overrides of the model preset and module constants set before the model is traced.
SETTINGS = {
    "default": dict(),
    "xla_cached_attention": dict(overrides=["--config.model.attention_impl=dense"]),  # frame SWA: XLA (as auto)
    "cudnn_cached_attention": dict(overrides=["--config.model.attention_impl=cudnn"]),  # frame SWA: cuDNN + bias
    "pallas_cached_attention": dict(overrides=["--config.model.attention_impl=pallas"]),  # frame SWA: Pallas flash
    "no_command_buffers": dict(xla_flags="--xla_gpu_enable_command_buffer="),  # every thunk launched one by one
    "small_command_buffers": dict(xla_flags="--xla_gpu_graph_min_graph_size=1"),  # graphs even for short runs
    "cublas_gemms": dict(xla_flags="--xla_gpu_enable_triton_gemm=false"),  # cuBLAS for every GEMM
    "cublaslt": dict(xla_flags="--xla_gpu_enable_cublaslt=true"),  # cuBLASLt (epilogues fused) for cuBLAS GEMMs
    "no_dot_merger": dict(xla_flags="--xla_gpu_dot_merger_threshold_mb=0"),  # dots sharing an operand stay apart
    # projections sharing their input as XLA fuses them by default (one Triton GEMM, see layers.gemm_operands)
    "merged_gemm_operands": dict(constants={"infinitevl_jax.models.layers.SEPARATE_GEMM_OPERANDS": False}),
    # the GDN walk and outputs of forward-only calls in separate kernels (the earlier default);
    # an explicit impl also runs single-token decode steps, which "auto" gives the recurrence
    "unfused_delta_rule": dict(overrides=["--config.model.delta_rule_impl=pallas_triton_unfused"]),
}
SMOKE = dict(frames=4, frame_size=112, context=64)
DECODE_TOKENS = 32
TARGET_FPS = 60.0


def set_constants(constants: dict) -> None:
    """``{"package.module.NAME": value}``: each module's constant set (before anything is traced)."""
    for dotted, value in constants.items():
        module, name = dotted.rsplit(".", 1)
        module = importlib.import_module(module)
        if not hasattr(module, name):
            raise AttributeError(f"{module.__name__} has no constant {name}")
        setattr(module, name, value)


def worker(args) -> dict:
    """``measure_streaming`` on the hybrid with its layers as ``DecoderEngine`` runs them, then a
    ``--context`` prefill and decode steps (``measure_context``)."""
    import jax
    from flax import nnx

    from benchmarks.inference_gpu import build_model, measure_context, measure_streaming
    from infinitevl_jax.infer import DecoderEngine

    set_constants(SETTINGS[args.worker].get("constants", {}))
    model = build_model("tiny" if args.smoke else "infinitevl_4b", SETTINGS[args.worker].get("overrides", []),
                        with_vision=True)
    model.language_model = DecoderEngine(model.language_model).decoder  # unstacked on GPU: one copy of the weights
    jax.block_until_ready(nnx.state(model))
    result = measure_streaming(model, args.frames, args.frame_size)
    if args.context:
        text = measure_context(DecoderEngine(model.language_model, chunk_size=args.context), args.context,
                               DECODE_TOKENS)
        result.update(prefill_ms=text["prefill_s"] * 1e3, decode_ms=text["decode_ms_per_token"])
    return result


def run_setting(name: str, args) -> dict:
    """One setting's worker in a fresh process; a failure (its stderr is on the console) is a row."""
    setting = SETTINGS[name]
    env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {setting.get('xla_flags', '')}".strip()}
    try:
        result = run_worker_process("benchmarks.streaming_gpu", name, [
            "--frames", str(args.frames), "--frame-size", str(args.frame_size), "--context", str(args.context)]
            + (["--smoke"] if args.smoke else []), env=env)
    except subprocess.CalledProcessError as error:
        result = dict(error=f"worker exited with status {error.returncode} (its stderr is above)")
    return dict(setting=name, **setting, **result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--frames", type=int, default=32, help="timed frames per setting (after 3 warm-up frames)")
    parser.add_argument("--frame-size", type=int, default=448)
    parser.add_argument("--context", type=int, default=8192,
                        help="tokens of the prefill (one chunk) timed with the decode steps after it (0: skip)")
    add_out_argument(parser, "streaming_gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny preset and frames; runs on the CPU")
    args = model_worker_args(parser, argv, SETTINGS, SMOKE)
    if run_if_worker(args, worker):
        return

    from benchmarks.common import announce_device, out_path, print_table, write_json

    device = announce_device(args.smoke)
    out = out_path(args, "streaming_gpu")
    rows = []

    def save(complete):  # after every setting: a run cut short keeps the settings it finished
        write_json(out, dict(benchmark="streaming_gpu", device=device, smoke=args.smoke, complete=complete,
                             settings=dict(frames=args.frames, frame_size=args.frame_size, context=args.context,
                                           decode_tokens=DECODE_TOKENS), rows=rows))

    for name in args.settings:
        print(f"setting {name} ...", file=sys.stderr, flush=True)
        rows.append(run_setting(name, args))
        print(rows[-1], flush=True)
        save(complete=False)
    columns = ["setting", "frame_ms_mean", "frame_ms_max", "host_ms_mean", "fps_latency", "fps_pipelined",
               "prefill_ms", "decode_ms", "error"]
    print_table([{c: r.get(c, "") for c in columns} for r in rows], columns)
    for r in rows:
        if "fps_latency" in r:
            print(f"target streaming {r['setting']}: {'MET' if r['fps_latency'] >= TARGET_FPS else 'MISSED'} "
                  f"({r['fps_latency']:.1f} FPS per frame, target {TARGET_FPS:.0f})")
    save(complete=True)


if __name__ == "__main__":
    main()
