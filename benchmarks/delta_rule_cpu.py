"""Chunked vs recurrent gated delta rule on the CPU (forward, and forward + backward).

    python -m benchmarks.delta_rule_cpu [--lengths 1024 4096] [--out benchmarks/results/delta_rule_cpu.json]

Shapes (B1, float32): InfiniteVL's head dims (H2, d_k 128, d_v 256) and small heads (H4, d_k 64,
d_v 64). Forward+backward runs only up to ``--backward-max-len`` tokens: the recurrent
baseline's reverse pass keeps one state per token (T * H * d_k * d_v floats: 1 GiB at T=4096).
Target (issue 2): chunked at least 10x faster than recurrent at T = 4096 (forward).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks.common import device_description, median_ms, print_table, write_json
from benchmarks.delta_rule_setup import forward, forward_backward, make_inputs

SHAPES = {"infinitevl_heads": (2, 128, 256), "small_heads": (4, 64, 64)}  # (H, d_k, d_v)
TARGET = 10.0


def inputs(seq_len, heads, d_k, d_v):
    x = make_inputs(1, seq_len, heads, d_k, d_v)
    return tuple(jnp.asarray(x[name]) for name in ("q", "k", "v", "g", "beta"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/delta_rule_cpu.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--backward-max-len", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)

    rows = []
    for shape_name, (heads, d_k, d_v) in SHAPES.items():
        for seq_len in args.lengths:
            x = inputs(seq_len, heads, d_k, d_v)
            modes = [("fwd", forward)] + ([("fwd+bwd", forward_backward)] if seq_len <= args.backward_max_len else [])
            for mode, make in modes:
                ms = {impl: median_ms(make(impl), *x, warmup=1, iters=args.iters) for impl in ("recurrent", "chunked")}
                rows.append(dict(shape=shape_name, H=heads, d_k=d_k, d_v=d_v, T=seq_len, mode=mode,
                                 recurrent_ms=ms["recurrent"], chunked_ms=ms["chunked"],
                                 speedup=ms["recurrent"] / ms["chunked"]))
                print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    print()
    for r in rows:
        if r["T"] == 4096 and r["mode"] == "fwd":
            verdict = "MET" if r["speedup"] >= TARGET else "MISSED"
            print(f"target chunked >= {TARGET:.0f}x recurrent, T=4096 fwd, {r['shape']}: {verdict} ({r['speedup']:.1f}x)")
    write_json(args.out, dict(benchmark="delta_rule_cpu", device=device_description(), dtype="float32", batch=1,
                              target=dict(chunked_over_recurrent_fwd_T4096=TARGET), rows=rows))


if __name__ == "__main__":
    main()
