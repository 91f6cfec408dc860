"""Gated delta rule on an NVIDIA GPU: Pallas vs our chunked JAX impl vs FLA 0.6.0 (Triton).

    python -m benchmarks.delta_rule_gpu [--out benchmarks/results/delta_rule_gpu.json] [--no-fla]
        [--shapes 1x4096 1x65536 ...] [--impls pallas pallas_triton_fused_backward pallas_triton_unfused ...]

1. Correctness on the GPU: Pallas (and any other Pallas impl timed) against the pure-JAX chunked
   impl (relative max error of the outputs, final state and all gradients) at B1 T4096 and at a
   ragged B2 T300 (5 chunks).
2. Timing, forward and forward+backward, at B1 T4096, B1 T16384, B1 T65536, B8 T4096 with
   H16 d_k 128 d_v 256, bf16 q/k/v/beta and float32 g (InfiniteVL's GDN shapes); q, k unit-norm.
   Medians of wall-clock timed calls after warm-up (outputs synchronised).
3. A table with ratios to FLA and the fraction of the roofline floor (spec/kernels.md section 6:
   312.7 kFLOP and 1542 B per token-head forward, 852 kFLOP and ~4.6 KB backward), and JSON,
   rewritten after every timed row (``complete`` turns true at the end).

FLA refuses its gated backward on Hopper with Triton < 3.7.1 (its issue 640: wrong values); the
guard is lifted for timing only (``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1 = True``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import delta_rule_setup
from benchmarks.common import device_description, median_ms, print_table, write_json
from benchmarks.delta_rule_setup import forward, forward_backward

H, K, V = 16, 128, 256
SHAPES = [(1, 4096), (1, 16384), (1, 65536), (8, 4096)]
IMPLS = ("pallas", "chunked")  # timed by default; --impls also takes the Triton variants below
IMPL_CHOICES = ("pallas", "pallas_mosaic_gpu", "pallas_triton_fused_backward", "pallas_triton",
                "pallas_triton_unfused", "pallas_triton_xla_terms", "chunked")
FWD_FLOP, FWD_BYTES = 312.7e3, 1542.0  # per token and head
BWD_FLOP, BWD_BYTES = 852.0e3, 4600.0
PEAKS = {"H100": (798e12, 3.0e12), "H200": (790e12, 4.3e12)}  # measured bf16 FLOP/s, copy B/s


def make_inputs(batch, seq_len, seed=0):
    return delta_rule_setup.make_inputs(batch, seq_len, H, K, V, seed)


def jax_args(x):
    bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    return bf16(x["q"]), bf16(x["k"]), bf16(x["v"]), jnp.asarray(x["g"]), bf16(x["beta"])


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_against_chunked(x, impl):
    """Relative max errors of ``impl``'s outputs, final state and gradients against ``chunked``'s."""
    args = jax_args(x)
    out = {name: forward(name)(*args) for name in (impl, "chunked")}
    grads = {name: forward_backward(name)(*args) for name in (impl, "chunked")}
    errors = dict(o=rel_err(out[impl][0], out["chunked"][0]), final_state=rel_err(out[impl][1], out["chunked"][1]))
    for name, gp, gc in zip(("dq", "dk", "dv", "dg", "dbeta"), grads[impl], grads["chunked"]):
        errors[name] = rel_err(gp, gc)
    return errors


class FLA:
    """FLA 0.6.0's chunk_gated_delta_rule on torch tensors with the same values."""

    def __init__(self):
        import torch
        import fla.ops.common.chunk_o as chunk_o
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only; see the module docstring
        self.torch, self.op = torch, chunk_gated_delta_rule

    def tensors(self, x, grad):
        t = self.torch
        to = lambda a, dtype: t.tensor(a, dtype=dtype, device="cuda").requires_grad_(grad)
        return (to(x["q"], t.bfloat16), to(x["k"], t.bfloat16), to(x["v"], t.bfloat16),
                to(x["g"], t.float32), to(x["beta"], t.bfloat16))

    def median_ms(self, x, backward, iters=10):
        q, k, v, g, beta = self.tensors(x, backward)

        def call():
            o, state = self.op(q, k, v, g, beta, output_final_state=True)
            if backward:
                (o.float().pow(2).sum() + state.sum()).backward()

        for _ in range(3):
            call()
        self.torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            call()
            self.torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return float(np.median(times))


def floor_ms(tokens, flop, byte, device):
    peak_flops, peak_bw = next((v for name, v in PEAKS.items() if name in device), PEAKS["H100"])
    return tokens * H * max(flop / peak_flops, byte / peak_bw) * 1e3


def _shape(text):
    """``"1x65536"`` -> (1, 65536)."""
    try:
        batch, seq_len = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH such as 1x65536, got {text!r}") from None
    return batch, seq_len


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/delta_rule_gpu.json")
    parser.add_argument("--no-fla", action="store_true", help="skip FLA (not installed)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="BxT",
                        help="batch x length cases to time (default: %(default)s)")
    parser.add_argument("--impls", nargs="+", choices=IMPL_CHOICES, default=list(IMPLS),
                        help="our impls to time (each Pallas impl timed, and pallas, is first checked against chunked)")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        raise SystemExit("error: this benchmark needs a GPU (jax.default_backend() is "
                         f"{jax.default_backend()!r}); run benchmarks.delta_rule_cpu on the CPU")
    device = device_description()
    print(f"device: {device}")

    errors = {}  # f"{impl}_vs_chunked_rel_err" -> shape -> errors, for every Pallas impl timed (and pallas)
    for impl in [name for name in dict.fromkeys(["pallas", *args.impls]) if name != "chunked"]:
        errors[f"{impl}_vs_chunked_rel_err"] = checks = {
            f"B{b}_T{t}": check_against_chunked(make_inputs(b, t, seed=1), impl) for b, t in ((1, 4096), (2, 300))}
        for shape, errs in checks.items():
            print(f"{impl} vs chunked on the GPU at {shape}, relative max error:",
                  {k: f"{v:.2e}" for k, v in errs.items()})

    fla = None if args.no_fla else FLA()
    rows = []
    # Saved after every row (complete=False until the end): a run cut short keeps what it timed.
    save = lambda complete: write_json(args.out, dict(
        benchmark="delta_rule_gpu", device=device, shape=dict(H=H, K=K, V=V), dtypes="bf16 q/k/v/beta, float32 g",
        **errors, rows=rows, complete=complete))
    for batch, seq_len in args.shapes:
        x = make_inputs(batch, seq_len)
        args_jax = jax_args(x)
        for mode, make, flop, byte in (("fwd", forward, FWD_FLOP, FWD_BYTES),
                                       ("fwd+bwd", forward_backward, FWD_FLOP + BWD_FLOP, FWD_BYTES + BWD_BYTES)):
            row = dict(B=batch, T=seq_len, mode=mode)
            for impl in args.impls:
                row[f"{impl}_ms"] = median_ms(make(impl), *args_jax, warmup=2, iters=args.iters)
            if fla is not None:
                row["fla_ms"] = fla.median_ms(x, backward=mode == "fwd+bwd", iters=args.iters)
                for impl in args.impls:
                    row[f"{impl}_speedup_vs_fla"] = row["fla_ms"] / row[f"{impl}_ms"]
            row["floor_ms"] = floor_ms(batch * seq_len, flop, byte, device)
            for impl in args.impls:
                row[f"{impl}_roofline_fraction"] = row["floor_ms"] / row[f"{impl}_ms"]
            rows.append(row)
            print_table(rows[-1:], list(rows[-1]))
            save(complete=False)
    print()
    print_table(rows, list(rows[0]))
    save(complete=True)


if __name__ == "__main__":
    main()
