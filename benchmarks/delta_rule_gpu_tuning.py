"""How the Pallas delta-rule path spends its time on a GPU, and how its settings were chosen.

    python -m benchmarks.delta_rule_gpu_tuning [--out benchmarks/results/delta_rule_gpu_tuning.json]
        [--sections stages kernels precision launch terms_backward mosaic terms_launch gradients]

1. stages: B1 T65536 forward split into prepare_chunks (XLA, and the Pallas terms kernel that
   ``pallas`` uses for forward-only calls), the walk (Pallas kernel, and the XLA ``lax.scan`` walk for
   comparison) and the outputs (XLA, and the Pallas outputs kernel of ``pallas``); the walk
   forward+backward; then the top device kernels of the whole forward and forward+backward
   (``jax.profiler``; ``pallas`` forms the outputs of forward-only calls inside the walk), and
   of the forward with the walk and the outputs in separate kernels (``pallas_triton_unfused``)
   and of the forward+backward whose reverse walk forms the outputs' cotangents
   (``pallas_triton_fused_backward``).
2. precision: the in-kernel matmul precision (``pallas_gpu.GPU_PRECISION``) against the
   float32-exact chunked impl, float32 inputs, B1 T16384 forward: error and time.
3. launch: V-block width, warps and pipeline stages of the walk kernels (``MAX_BLOCK_V``,
   ``TRITON_PARAMS``, ``NUM_STAGES_16BIT``), B1 T65536 forward, which runs the walk with the
   outputs formed on the way (bf16 inputs, so bf16 chunk terms and matmul operands).
4. terms_backward: forward+backward at B1 T65536 and B8 T4096 with the chunk terms' VJP by XLA
   and by the Triton backward kernel (``pallas_gpu_terms.TERMS_BACKWARD``, at 4 and 8 warps:
   ``TERMS_NUM_WARPS``), and each one's largest gradient error against the chunked impl at B1
   T4096.
5. mosaic: the Mosaic GPU walk (``pallas_mosaic_gpu``) per V-block width, TMA ring slots,
   cluster size and V-blocks per program (``BLOCK_V``, ``STAGES``, ``CLUSTER``, ``WARPGROUPS``;
   with 1 and 1 every V-block reads every K-wide tile, as the Triton walk does): its largest
   error against the Triton fused walk on the same XLA chunk terms at B1 T4096 (relative to the
   largest entry), then the walk alone (and the Triton fused walk alone, its peer in the same
   process) and the whole forward at B1 T65536, the whole forward at B8 T4096, and
   forward+backward (both Mosaic walks) at B1 T65536.
6. terms_launch: warps per program of the Triton chunk-terms kernel
   (``pallas_gpu_terms.TERMS_NUM_WARPS``; the walk keeps its own): the kernel alone (bf16
   inputs, as forward-only calls run it) at B1 T65536 and B8 T4096, beside XLA's
   ``prepare_chunks`` in the same process, and the whole forward at B1 T65536.
7. gradients: forward+backward of ``pallas_triton``, ``pallas_triton_fused_backward`` and
   ``pallas_mosaic_gpu`` (the same walks in Mosaic GPU kernels) with the
   per-chunk gradients after the reverse walk in XLA or in one kernel
   (``pallas_gpu.CHUNK_GRADIENTS``, ``pallas_gpu_grads``' V-block and warps), at B1 T65536 and B8
   T4096, and the largest gradient error against the chunked impl at B1 T4096.

Pallas caches traced kernels, so every setting of the precision, launch, terms_backward, mosaic,
terms_launch and gradients sweeps runs in a fresh process (a setting that hangs or fails is recorded as such and the sweep goes on),
and each is saved as soon as it is measured.
The split walk's sweep (``--sections split``) ran at commit c886313 and was removed with that
walk (benchmarks/RESULTS.md).
H16 d_k 128 d_v 256 as in benchmarks/delta_rule_gpu.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import device_description, median_ms, print_table, write_json
from benchmarks.delta_rule_gpu import H, K, V, jax_args, make_inputs
from benchmarks.delta_rule_setup import forward, forward_backward
from benchmarks.kernel_profile import profile
from infinitevl_jax.ops.delta_rule import (gated_delta_rule, pallas_gpu, pallas_gpu_grads, pallas_gpu_terms,
                                           pallas_mosaic_gpu, segment_resets)
from infinitevl_jax.ops.delta_rule.chunked import CHUNK_SIZE, chunk_outputs, prepare_chunks, walk_states

PRECISIONS = {
    "DEFAULT": jax.lax.Precision.DEFAULT,
    "HIGH": jax.lax.Precision.HIGH,
    "TF32_TF32_F32_X3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "F32_F32_F32": jax.lax.DotAlgorithmPreset.F32_F32_F32,
    "HIGHEST": jax.lax.Precision.HIGHEST,
}
# (V-block, num_warps, num_stages); session 9 swept 32-128 x 4/8 warps x 2/3 stages on the unfused walk
LAUNCHES = [(32, 4, 3), (16, 4, 3), (16, 2, 3), (32, 2, 3), (32, 4, 4), (64, 4, 3), (64, 8, 3), (128, 8, 2)]
# (V-block, ring slots, cluster, warpgroups) of the Mosaic GPU walks; the first is their default
# (3 slots of 64-wide V-blocks, 4 of 32-wide, or 3 with 2 warpgroups exceed a block's shared
# memory: smem_bytes). Clusters of 4 and 8 were 1.5x slower in session 15; one stays as a check.
MOSAIC_LAUNCHES = [(32, 3, 1, 1), (32, 2, 1, 2), (32, 2, 1, 1), (64, 2, 1, 1), (32, 3, 8, 1)]
# (impl, per-chunk gradients, the kernel's V-block, warps); a V-block of 128 at 8 warps needs
# 272 KiB of shared memory (failed on an H200)
GRADIENTS = [("pallas_triton", "xla", 64, 8), ("pallas_triton", "kernel", 64, 8),
             ("pallas_triton_fused_backward", "xla", 64, 8), ("pallas_triton_fused_backward", "kernel", 64, 8),
             ("pallas_triton_fused_backward", "kernel", 32, 4), ("pallas_mosaic_gpu", "xla", 64, 8),
             ("pallas_mosaic_gpu", "kernel", 64, 8)]
TERMS_WARPS = [4, 8, 2]  # the first is today's setting (the walk's TRITON_PARAMS)
PROFILE_CALLS = 5
SETTING_TIMEOUT_S = 300  # per fresh-process setting
ERROR_TAIL_LINES = 40
MAX_TIMEOUTS = 2  # per sweep
MOSAIC_TIMEOUT_S = 200  # a Mosaic setting compiles and runs in well under this; a hang costs no more
SECTIONS = ("stages", "kernels", "precision", "launch", "terms_backward", "mosaic", "terms_launch", "gradients")
# (terms' VJP, warps of the terms kernels): measured so far at the walk's 4 warps
TERMS_BACKWARDS = [("xla", 4), ("kernel", 4), ("kernel", 8)]


def xla_terms_setup(batch, seq_len):
    """B x T inputs as ``gated_delta_rule`` passes them on (bf16 q/k/v, float32 g and beta), no
    resets, a zero start state, and ``prepare(*inputs)``: XLA's bf16 chunk terms, jitted.
    Returns ``(inputs, reset, s0, prepare)``."""
    q, k, v, g, beta = jax_args(make_inputs(batch, seq_len))
    inputs = (q, k, v, g, beta.astype(jnp.float32))
    reset = segment_resets(None, seq_len, batch)
    prepare = jax.jit(lambda *a: prepare_chunks(*a, K ** -0.5, reset, matmul_dtype=jnp.bfloat16))
    return inputs, reset, jnp.zeros((batch, H, K, V), jnp.float32), prepare


def stages():
    seq_len = 65536
    inputs, reset, s0, prepare = xla_terms_setup(1, seq_len)
    prepare_kernel = jax.jit(lambda *a: pallas_gpu_terms.gpu_prepare_chunks(*a, K ** -0.5, reset, CHUNK_SIZE,
                                                                            jnp.bfloat16))
    terms = prepare(*inputs)
    walk_pallas, walk_scan = jax.jit(pallas_gpu.gpu_walk_states), jax.jit(walk_states)
    states, v_new, _ = walk_pallas(terms, s0)
    outputs = jax.jit(lambda t, s, vn: chunk_outputs(t, s, vn, seq_len, jnp.bfloat16))
    outputs_kernel = jax.jit(lambda t, s, vn: pallas_gpu.gpu_chunk_outputs(t, s, vn, seq_len, jnp.bfloat16))

    def walk_loss(t, s):
        st, vn, final = pallas_gpu.gpu_walk_states(t, s)
        return jnp.sum(st) + jnp.sum(vn) + jnp.sum(final)

    rows = [dict(stage=name, ms=median_ms(fn, *args, iters=10)) for name, fn, args in (
        ("prepare_chunks (XLA)", prepare, inputs),
        ("prepare_chunks (Pallas terms kernel)", prepare_kernel, inputs),
        ("walk (Pallas)", walk_pallas, (terms, s0)),
        ("walk (XLA lax.scan)", walk_scan, (terms, s0)),
        ("chunk_outputs (XLA)", outputs, (terms, states, v_new)),
        ("chunk_outputs (Pallas outputs kernel)", outputs_kernel, (terms, states, v_new)),
        ("walk fwd+bwd (Pallas)", jax.jit(jax.grad(walk_loss, argnums=(0, 1))), (terms, s0)))]
    gib = (sum(x.nbytes for x in jax.tree.leaves(terms)) + states.nbytes + v_new.nbytes) / 2**30
    return rows, gib


def kernel_profiles():
    """Top device kernels of the whole Pallas forward and forward+backward, of the unfused
    forward and of the fused-backward forward+backward, B1 T65536, with the JAX operation each XLA fusion came from."""
    args = jax_args(make_inputs(1, 65536))
    profiles = []
    for name, fn in (("forward", forward("pallas")), ("forward+backward", forward_backward("pallas")),
                     ("forward, walk and outputs unfused", forward("pallas_triton_unfused")),
                     ("forward+backward, outputs' cotangents in the reverse walk",
                      forward_backward("pallas_triton_fused_backward"))):
        compiled = fn.lower(*args).compile()  # one compile: profiled, and its HLO names the kernels
        run = lambda: jax.block_until_ready(compiled(*args))
        profiles.append(profile(name, run, PROFILE_CALLS, hlo_text=compiled.as_text()))
    return profiles


def precision_row(name):
    pallas_gpu.GPU_PRECISION = PRECISIONS[name]
    args = [x.astype(jnp.float32) for x in jax_args(make_inputs(1, 16384, seed=3))]
    reference = jax.jit(lambda *a: gated_delta_rule(*a, impl="chunked"))(*args)
    fn = jax.jit(lambda *a: gated_delta_rule(*a, impl="pallas"))
    o, state = fn(*args)
    err = lambda a, b: float(jnp.abs(a - b).max() / jnp.abs(b).max())
    return dict(o_rel_err=err(o, reference[0]), state_rel_err=err(state, reference[1]),
                ms=median_ms(fn, *args, iters=10))


def launch_row(block_v, warps, num_stages):
    """The settings apply to every Triton kernel of the call (terms and walk): ``ms`` is the whole
    forward, ``walk_ms`` the walk with the outputs alone, on chunk terms formed by XLA (both B1
    T65536), and ``B8_T4096_ms`` the whole forward of the batched case (1024 walk programs at
    32-wide V-blocks: 8 waves on an H200, where wider blocks may win)."""
    pallas_gpu.MAX_BLOCK_V = block_v
    pallas_gpu.TRITON_PARAMS = dict(num_warps=warps)
    pallas_gpu.NUM_STAGES_16BIT = num_stages
    inputs, _, s0, prepare = xla_terms_setup(1, 65536)
    args = (*inputs[:4], inputs[4].astype(jnp.bfloat16))  # bf16 beta, as jax_args gives it (exact)
    walk = jax.jit(lambda t, s: pallas_gpu.gpu_walk_outputs(t, s, 65536))
    return dict(ms=median_ms(jax.jit(lambda *a: gated_delta_rule(*a, impl="pallas")), *args, iters=10),
                walk_ms=median_ms(walk, prepare(*inputs), s0, iters=10),
                B8_T4096_ms=median_ms(forward("pallas"), *jax_args(make_inputs(8, 4096)), iters=10))


def mosaic_row(block_v, stages, cluster, warpgroups):
    """The Mosaic GPU walk at one launch setting: its error against the Triton fused walk on the
    same chunk terms (B1 T4096), then ms of the walk alone, of the Triton fused walk alone (its
    peer in the same process), of the whole forward and of forward+backward (both walks)."""
    settings = dict(BLOCK_V=block_v, STAGES=stages, CLUSTER=cluster, WARPGROUPS=warpgroups)
    for name, value in settings.items():
        setattr(pallas_mosaic_gpu, name, value)
    walks = {name: jax.jit(lambda t, s, fn=fn: fn(t, s, 4096))
             for name, fn in (("mosaic", pallas_mosaic_gpu.mosaic_walk_outputs), ("triton", pallas_gpu.gpu_walk_outputs))}
    inputs, _, s0, prepare = xla_terms_setup(1, 4096)
    terms = prepare(*inputs)
    (o, final), (want_o, want_final) = (walks[name](terms, s0 + 1.0) for name in ("mosaic", "triton"))
    err = lambda a, b: float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b.astype(jnp.float32)).max())
    row = dict(o_rel_err=err(o, want_o), state_rel_err=err(final, want_final))
    inputs, _, s0, prepare = xla_terms_setup(1, 65536)
    terms = prepare(*inputs)
    for name, fn in (("walk_ms", pallas_mosaic_gpu.mosaic_walk_outputs), ("triton_walk_ms", pallas_gpu.gpu_walk_outputs)):
        row[name] = median_ms(jax.jit(lambda t, s, fn=fn: fn(t, s, 65536)), terms, s0, iters=10)
    forward_ms = lambda batch, seq_len: median_ms(forward("pallas_mosaic_gpu"),
                                                  *jax_args(make_inputs(batch, seq_len)), iters=10)
    fwd_bwd_ms = median_ms(forward_backward("pallas_mosaic_gpu"), *jax_args(make_inputs(1, 65536)), iters=10)
    return dict(row, ms=forward_ms(1, 65536), B8_T4096_ms=forward_ms(8, 4096), fwd_bwd_ms=fwd_bwd_ms)


def terms_launch_row(num_warps):
    """The chunk-terms kernel with ``num_warps`` per program: ms alone at two shapes (XLA's
    ``prepare_chunks`` beside it) and of the whole forward at B1 T65536."""
    pallas_gpu_terms.TERMS_NUM_WARPS = num_warps
    row = {}
    for batch, seq_len in ((1, 65536), (8, 4096)):
        inputs, reset, _, prepare = xla_terms_setup(batch, seq_len)
        inputs = (*inputs[:4], inputs[4].astype(jnp.bfloat16))
        kernel = jax.jit(lambda *a, reset=reset: pallas_gpu_terms.gpu_prepare_chunks(*a, K ** -0.5, reset, CHUNK_SIZE,
                                                                                     jnp.bfloat16))
        row[f"B{batch}_T{seq_len}_ms"] = median_ms(kernel, *inputs, iters=10)
        row[f"B{batch}_T{seq_len}_xla_ms"] = median_ms(prepare, *inputs, iters=10)
    row["ms"] = median_ms(forward("pallas"), *jax_args(make_inputs(1, 65536)), iters=10)
    return row


def forward_backward_row(impl):
    """Forward+backward of ``impl`` at its module settings: ms at two shapes, and the largest
    relative gradient error against the chunked impl."""
    row = {}
    for batch, seq_len in ((1, 65536), (8, 4096)):
        args = jax_args(make_inputs(batch, seq_len))
        row[f"B{batch}_T{seq_len}_ms"] = median_ms(forward_backward(impl), *args, iters=10)
    args = jax_args(make_inputs(1, 4096, seed=3))
    grads = [[x.astype(jnp.float32) for x in forward_backward(name)(*args)] for name in (impl, "chunked")]
    errors = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(*grads)]
    return dict(row, max_grad_rel_err=max(errors))


def terms_backward_row(mode, num_warps):
    """Forward+backward with the chunk terms' VJP ``mode`` and ``num_warps`` per terms-kernel
    program (``forward_backward_row``)."""
    pallas_gpu_terms.TERMS_BACKWARD, pallas_gpu_terms.TERMS_NUM_WARPS = mode, int(num_warps)
    return forward_backward_row("pallas")


def gradients_row(impl, mode, block_v, warps):
    """Forward+backward of ``impl`` with the per-chunk gradients in ``mode`` (and the kernel's
    V-block and warps) (``forward_backward_row``)."""
    pallas_gpu.CHUNK_GRADIENTS = mode
    pallas_gpu_grads.BLOCK_V, pallas_gpu_grads.NUM_WARPS = int(block_v), int(warps)
    return forward_backward_row(impl)


def in_fresh_process(*setting, timeout_s=SETTING_TIMEOUT_S):
    """One setting in a new process; a setting that fails to compile or run (e.g. shared memory
    exceeded) or takes over ``timeout_s`` is a result of the sweep, recorded with the last
    exception line of its error (and the JSON keeps the last ``ERROR_TAIL_LINES`` lines of its
    stderr, to debug a kernel from one run)."""
    command = [sys.executable, "-m", "benchmarks.delta_rule_gpu_tuning", "--one", *map(str, setting)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(ms=None, error=f"timed out after {timeout_s} s", timed_out=True)
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    lines = done.stderr.strip().splitlines() or ["no output"]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)]  # not JAX's notes
    return dict(ms=None, error=(raised or lines)[-1][:200], stderr_tail="\n".join(lines[-ERROR_TAIL_LINES:]))


def fresh_process_sweep(kind, settings, label, save, timeout_s=SETTING_TIMEOUT_S):
    """``in_fresh_process(kind, *setting)`` for each setting, as rows ``{**label(setting), ...}``;
    each row is printed and ``save(rows)`` called as soon as it is measured, so a run cut short
    keeps every finished setting. After ``MAX_TIMEOUTS`` settings have timed out (a kernel that
    hangs, e.g. a barrier never reached) the rest are recorded as skipped rather than each
    spending ``timeout_s`` of device time."""
    rows = []
    for setting in settings:
        if sum(row.get("timed_out", False) for row in rows) >= MAX_TIMEOUTS:
            result = dict(ms=None, error=f"skipped after {MAX_TIMEOUTS} settings timed out")
        else:
            result = in_fresh_process(kind, *setting, timeout_s=timeout_s)
        rows.append(dict(label(setting), **result))
        print(rows[-1], flush=True)
        save(rows)
    return rows


def print_rows(rows):
    """A sweep's rows as a table of every key any row has but the stderr tail ("-" where a row
    lacks it: a failed setting has only its settings, ms and error)."""
    columns = list(dict.fromkeys(key for row in rows for key in row if key != "stderr_tail"))
    print_table([{key: row.get(key, "-") for key in columns} for row in rows], columns)


def _shown(row):
    """A table row with failed settings marked, and float errors in scientific notation."""
    if row["ms"] is None:
        shown = ("walk_ms", "triton_walk_ms", "o_rel_err", "state_rel_err", "B8_T4096_ms", "fwd_bwd_ms")
        return {**dict.fromkeys(shown, "-"), **row, "ms": "failed"}
    return {k: (f"{v:.1e}" if k.endswith("rel_err") else v) for k, v in row.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/delta_rule_gpu_tuning.json")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to run (default: all; the JSON holds only these)")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # internal: one setting, JSON on stdout
    args = parser.parse_args(argv)
    if args.one:
        kind, *rest = args.one
        rows = dict(precision=lambda: precision_row(*rest), terms_backward=lambda: terms_backward_row(*rest),
                    launch=lambda: launch_row(*map(int, rest)), mosaic=lambda: mosaic_row(*map(int, rest)),
                    terms_launch=lambda: terms_launch_row(int(*rest)), gradients=lambda: gradients_row(*rest))
        print(json.dumps(rows[kind]()))
        return
    if jax.default_backend() != "gpu":
        raise SystemExit(f"error: this benchmark needs a GPU (backend is {jax.default_backend()!r})")
    device = device_description()
    print(f"device: {device}")
    results = dict(benchmark="delta_rule_gpu_tuning", device=device, complete=False)

    def save(**section):  # after every section: a run cut short keeps what it measured
        results.update(section)
        write_json(args.out, results)

    if "stages" in args.sections:
        stage_rows, gib = stages()
        print_table(stage_rows, ["stage", "ms"])
        print(f"per-chunk terms + entry states + V': {gib:.2f} GiB\n")
        save(stages=stage_rows, terms_gib=gib)
    if "kernels" in args.sections:
        profiles = kernel_profiles()
        for p in profiles:
            print(f"{p['workload']}: wall {p['wall_ms']:.2f} ms, kernels {p['busy_ms']:.2f} ms, "
                  f"{p['kernels_per_call']:.0f} launches")
            print_table(p["top"][:12], ["kernel", "us_per_call", "launches_per_call", "op"])
            print()
        save(kernels=profiles)
    if "precision" in args.sections:
        precision_rows = fresh_process_sweep("precision", [(name,) for name in PRECISIONS],
                                             lambda s: dict(precision=s[0]), lambda rows: save(precision=rows))
        print_table([_shown(r) for r in precision_rows], ["precision", "o_rel_err", "state_rel_err", "ms"])
        print()
    if "launch" in args.sections:
        launch_columns = ("block_v", "num_warps", "num_stages")
        launch_rows = fresh_process_sweep("launch", LAUNCHES, lambda s: dict(zip(launch_columns, s)),
                                          lambda rows: save(launch=rows))
        print_table([_shown(r) for r in launch_rows], [*launch_columns, "ms", "walk_ms", "B8_T4096_ms"])
    if "terms_backward" in args.sections:
        backward_rows = fresh_process_sweep("terms_backward", TERMS_BACKWARDS,
                                            lambda s: dict(terms_backward=s[0], num_warps=s[1]),
                                            lambda rows: save(terms_backward=rows))
        print_rows(backward_rows)
    if "mosaic" in args.sections:
        mosaic_columns = ("block_v", "stages", "cluster", "warpgroups")
        mosaic_rows = fresh_process_sweep("mosaic", MOSAIC_LAUNCHES, lambda s: dict(zip(mosaic_columns, s)),
                                          lambda rows: save(mosaic=rows), timeout_s=MOSAIC_TIMEOUT_S)
        print_table([_shown(r) for r in mosaic_rows],
                    [*mosaic_columns, "o_rel_err", "state_rel_err", "walk_ms", "triton_walk_ms", "ms",
                     "B8_T4096_ms", "fwd_bwd_ms"])
    if "terms_launch" in args.sections:
        terms_rows = fresh_process_sweep("terms_launch", [(warps,) for warps in TERMS_WARPS],
                                         lambda s: dict(num_warps=s[0]), lambda rows: save(terms_launch=rows))
        print_rows(terms_rows)
    if "gradients" in args.sections:
        gradient_columns = ("impl", "chunk_gradients", "block_v", "num_warps")
        gradient_rows = fresh_process_sweep("gradients", GRADIENTS, lambda s: dict(zip(gradient_columns, s)),
                                            lambda rows: save(gradients=rows))
        print_rows(gradient_rows)
    save(sections=args.sections, complete=True)


if __name__ == "__main__":
    main()
