"""A streamed frame's sliding-window attention over its ring cache: XLA masked softmax vs cuDNN
vs the Pallas flash kernel.

    python -m benchmarks.frame_attention_gpu [--out FILE]
    python -m benchmarks.frame_attention_gpu --smoke     # small shapes, XLA and Pallas (interpreted), any backend

One SWA layer of InfiniteVL-4B during streaming: T = 256 new tokens (a 448x448 frame) attend
over a full ring of W - 1 = 8191 cached keys and themselves, Hq 16, Hkv 2, D 128, bf16, at stream
index 100,000 (every slot holds a token; the window cuts each query's oldest keys). Both impls
of ``masked_attention`` get the same explicit mask (``visibility`` over the slots' token
indices, as ``SelfAttention`` builds it). Checks: cuDNN and Pallas vs XLA (max relative error),
and a row whose keys are all masked (left padding) returns zeros. Median ms of the jitted call. (In the
model the XLA form wins end to end, ``masked_impl``: see ``benchmarks.streaming_gpu``.)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import add_out_argument, announce_device, median_ms, out_path, print_table, write_json
from infinitevl_jax.models.sliding_attention import slot_token_index
from infinitevl_jax.ops.attention import masked_attention, visibility

SHAPES = dict(tokens=256, window=8192, q_heads=16, kv_heads=2, head_dim=128, index=100_000)
SMOKE_SHAPES = dict(tokens=32, window=256, q_heads=4, kv_heads=2, head_dim=64, index=1_000)


def frame_inputs(tokens, window, q_heads, kv_heads, head_dim, index):
    """q ``[2, T, Hq, D]``, (ring, new) keys and values, mask ``[2, T, W - 1 + T]``; row 1 is all padding."""
    keys = jax.random.split(jax.random.key(0), 5)
    capacity = window - 1
    q = jax.random.normal(keys[0], (2, tokens, q_heads, head_dim), jnp.bfloat16)
    k = (jax.random.normal(keys[1], (2, capacity, kv_heads, head_dim), jnp.bfloat16),
         jax.random.normal(keys[2], (2, tokens, kv_heads, head_dim), jnp.bfloat16))
    v = (jax.random.normal(keys[3], (2, capacity, kv_heads, head_dim), jnp.bfloat16),
         jax.random.normal(keys[4], (2, tokens, kv_heads, head_dim), jnp.bfloat16))
    k_index = jnp.concatenate([slot_token_index(index, capacity), index + jnp.arange(tokens)])
    start = jnp.asarray([0, index + tokens])  # row 1: every key before its start (left padding)
    mask = visibility(index + jnp.arange(tokens), k_index, window, k_index[None] >= start[:, None])
    return q, k, v, mask


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(parser, "frame_attention_gpu")
    parser.add_argument("--smoke", action="store_true", help="small shapes, no cuDNN; runs on the CPU")
    args = parser.parse_args(argv)
    device = announce_device(args.smoke)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    q, k, v, mask = frame_inputs(**shapes)
    impls = ["xla", "pallas"] if args.smoke else ["xla", "cudnn", "pallas"]
    outputs, rows = {}, []
    for impl in impls:
        fn = jax.jit(lambda q, k, v, mask, impl=impl: masked_attention(q, k, v, mask, impl=impl))
        outputs[impl] = np.asarray(fn(q, k, v, mask), np.float32)
        rows.append(dict(impl=impl, ms=median_ms(fn, q, k, v, mask, warmup=3, iters=20),
                         padding_row_max_abs=float(np.abs(outputs[impl][1]).max())))
    reference = outputs["xla"][0]
    for row in rows:
        row["max_rel_err_vs_xla"] = float(np.abs(outputs[row["impl"]][0] - reference).max() / np.abs(reference).max())
        row["speedup_vs_xla"] = rows[0]["ms"] / row["ms"]
    print_table(rows, list(rows[0]))
    out = out_path(args, "frame_attention_gpu")
    write_json(out, dict(benchmark="frame_attention_gpu", device=device, smoke=args.smoke, shapes=shapes, rows=rows))


if __name__ == "__main__":
    main()
