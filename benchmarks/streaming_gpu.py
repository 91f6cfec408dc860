"""Streaming latency of the hybrid (InfiniteVL-4B) under XLA flag and model settings, one process each.

    python -m benchmarks.streaming_gpu [--settings default cublas_gemms ...] [--frames 32] [--out FILE]
    python -m benchmarks.streaming_gpu --smoke      # tiny preset, 112x112 frames, any backend

A streamed 448x448 frame (``StreamingSession.push_frame``: resize on the host, ViT, one decoder
chunk of 256 tokens on the constant cache) is ~2,200 kernel launches when the layers are
unrolled; its latency is bound by the host's dispatch as much as by the kernels
(benchmarks/RESULTS.md). Each setting in ``SETTINGS`` runs ``inference_gpu``'s
``measure_streaming`` in a fresh process with its ``XLA_FLAGS`` (read once per process) and model
overrides: per-frame latency, the host time until ``push_frame`` returns, pipelined FPS. A setting
whose process fails (e.g. a flag this XLA does not know) is a row with its error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from benchmarks.common import add_out_argument, model_worker_args, run_if_worker, run_worker_process

# name -> XLA_FLAGS added to the process's own (see xla/debug_options_flags.cc for each flag) and
# ``--config.`` overrides of the model preset.
SETTINGS = {
    "default": dict(),
    "xla_cached_attention": dict(overrides=["--config.model.attention_impl=dense"]),  # frame SWA: XLA (as auto)
    "cudnn_cached_attention": dict(overrides=["--config.model.attention_impl=cudnn"]),  # frame SWA: cuDNN + bias
    "no_command_buffers": dict(xla_flags="--xla_gpu_enable_command_buffer="),  # every thunk launched one by one
    "small_command_buffers": dict(xla_flags="--xla_gpu_graph_min_graph_size=1"),  # graphs even for short runs
    "cublas_gemms": dict(xla_flags="--xla_gpu_enable_triton_gemm=false"),  # cuBLAS for every GEMM
    "cublaslt": dict(xla_flags="--xla_gpu_enable_cublaslt=true"),  # cuBLASLt (epilogues fused) for cuBLAS GEMMs
    "no_dot_merger": dict(xla_flags="--xla_gpu_dot_merger_threshold_mb=0"),  # dots sharing an operand stay apart
}
SMOKE = dict(frames=4, frame_size=112)
TARGET_FPS = 60.0


def worker(args) -> dict:
    """``measure_streaming`` on the hybrid with its layers as ``DecoderEngine`` runs them."""
    import jax
    from flax import nnx

    from benchmarks.inference_gpu import build_model, measure_streaming
    from infinitevl_jax.infer import DecoderEngine

    model = build_model("tiny" if args.smoke else "infinitevl_4b", SETTINGS[args.worker].get("overrides", []),
                        with_vision=True)
    model.language_model = DecoderEngine(model.language_model).decoder  # unstacked on GPU: one copy of the weights
    jax.block_until_ready(nnx.state(model))
    return measure_streaming(model, args.frames, args.frame_size)


def run_setting(name: str, args) -> dict:
    """One setting's worker in a fresh process; a failure (its stderr is on the console) is a row."""
    setting = SETTINGS[name]
    env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {setting.get('xla_flags', '')}".strip()}
    try:
        result = run_worker_process("benchmarks.streaming_gpu", name, [
            "--frames", str(args.frames), "--frame-size", str(args.frame_size)] + (["--smoke"] if args.smoke else []),
            env=env)
    except subprocess.CalledProcessError as error:
        result = dict(error=f"worker exited with status {error.returncode} (its stderr is above)")
    return dict(setting=name, **setting, **result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--frames", type=int, default=32, help="timed frames per setting (after 3 warm-up frames)")
    parser.add_argument("--frame-size", type=int, default=448)
    add_out_argument(parser, "streaming_gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny preset and frames; runs on the CPU")
    args = model_worker_args(parser, argv, SETTINGS, SMOKE)
    if run_if_worker(args, worker):
        return

    from benchmarks.common import announce_device, out_path, print_table, write_json

    device = announce_device(args.smoke)
    rows = []
    for name in args.settings:
        print(f"setting {name} ...", file=sys.stderr, flush=True)
        rows.append(run_setting(name, args))
    columns = ["setting", "frame_ms_mean", "frame_ms_max", "host_ms_mean", "fps_latency", "fps_pipelined", "error"]
    print_table([{c: r.get(c, "") for c in columns} for r in rows], columns)
    for r in rows:
        if "fps_latency" in r:
            print(f"target streaming {r['setting']}: {'MET' if r['fps_latency'] >= TARGET_FPS else 'MISSED'} "
                  f"({r['fps_latency']:.1f} FPS per frame, target {TARGET_FPS:.0f})")
    out = out_path(args, "streaming_gpu")
    write_json(out, dict(benchmark="streaming_gpu", device=device, smoke=args.smoke,
                         settings=dict(frames=args.frames, frame_size=args.frame_size), rows=rows))


if __name__ == "__main__":
    main()
