"""Flash attention under an explicit mask, as a Pallas (Triton) kernel: the cached-chunk path of
``attention.masked_attention`` (``impl="pallas"``), e.g. a streamed frame's 256 queries over the
8,447 keys of an 8K sliding window (the ring and the new tokens).

XLA's form of that call writes the ``[B, Hq, T, S]`` logits and probabilities to HBM, transposes
them and pads the keys for its GEMM (on an H200: ~254 us per layer, benchmarks/RESULTS.md). Here
one program per (batch, query head, block of ``BLOCK_Q`` queries) walks the keys in blocks of
``BLOCK_K`` with an online softmax; logits never leave the chip:

    s = scale q k_j^T (masked to -1e30)       m' = max(m, rowmax s)
    p = exp(s - m') (masked to 0)             l' = e^(m - m') l + rowsum p
    acc' = e^(m - m') acc + p v_j             o = acc / l   (0 where no key is visible)

Query head h reads KV head ``h // (Hq // Hkv)`` (GQA). The mask arrives as int8 ``[B, T, S]``;
keys, values and mask are padded to a multiple of ``BLOCK_K`` keys (masked), queries to a
multiple of ``BLOCK_Q``, the head dim to a power of two (zeros change no dot product). q k^T and
p v take the inputs' dtype with float32 accumulation (p rounded to v's dtype, as XLA's form
does). Backend and lowering: ``triton_launch``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from infinitevl_jax.ops.triton_launch import next_power_of_two, triton_backend

BLOCK_Q = 64
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 2
_MASKED = -1e30


def _kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, *, scale):
    """q ``[BQ, D]``, k and v ``[S, D]``, mask ``[BQ, S]`` (int8), o ``[BQ, D]``."""
    q = q_ref[...]
    block_q, d = q.shape

    def key_block(j, carry):
        acc, row_max, row_sum = carry
        keys = pl.ds(j * BLOCK_K, BLOCK_K)
        visible = mask_ref[:, keys] != 0
        s = jax.lax.dot_general(q, k_ref[keys, :], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
        s = jnp.where(visible, s, _MASKED)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=1))
        p = jnp.where(visible, jnp.exp(s - new_max[:, None]), 0.0)
        alpha = jnp.exp(row_max - new_max)
        values = v_ref[keys, :]
        pv = jax.lax.dot_general(p.astype(values.dtype), values, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, new_max, row_sum * alpha + jnp.sum(p, axis=1)

    start = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), _MASKED, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    acc, _, row_sum = jax.lax.fori_loop(0, k_ref.shape[0] // BLOCK_K, key_block, start)
    seen = row_sum > 0
    o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, row_sum, 1.0)[:, None], 0.0).astype(o_ref.dtype)


def _pad_axis(x, axis, size):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def masked_flash_attention(q, k, v, mask):
    """Softmax attention of q ``[B, T, Hq, D]`` over k, v ``[B, S, Hkv, D]`` under the boolean
    mask ``[B, T, S]``; returns ``[B, T, Hq, D]`` in q's dtype, zeros for rows with no visible
    key (``masked_attention``'s contract). Softmax scale ``D ** -0.5``."""
    batch, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if mask.shape != (batch, t, s):
        raise ValueError(f"mask must be [B, T, S] = {(batch, t, s)}; got {mask.shape}")
    interpret, params = triton_backend(NUM_WARPS, NUM_STAGES)
    groups = hq // hkv
    t_pad, s_pad, d_pad = -(-t // BLOCK_Q) * BLOCK_Q, -(-s // BLOCK_K) * BLOCK_K, next_power_of_two(d)
    q = _pad_axis(_pad_axis(q, 1, t_pad), 3, d_pad)
    k, v = (_pad_axis(_pad_axis(x.astype(q.dtype), 1, s_pad), 3, d_pad) for x in (k, v))
    mask = _pad_axis(_pad_axis(mask.astype(jnp.int8), 1, t_pad), 2, s_pad)
    per_query_block = lambda: pl.BlockSpec((pl.squeezed, BLOCK_Q, pl.squeezed, d_pad), lambda b, h, i: (b, i, h, 0))
    kv_head = pl.BlockSpec((pl.squeezed, s_pad, pl.squeezed, d_pad), lambda b, h, i: (b, 0, h // groups, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, scale=1.0 / math.sqrt(d)),
        grid=(batch, hq, t_pad // BLOCK_Q),
        in_specs=[per_query_block(), kv_head, kv_head,
                  pl.BlockSpec((pl.squeezed, BLOCK_Q, s_pad), lambda b, h, i: (b, i, 0))],
        out_specs=per_query_block(),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=params, name="masked_flash_attention",
    )(q, k, v, mask)
    return out[:, :t, :, :d]
