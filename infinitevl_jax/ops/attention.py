"""Causal softmax attention with an optional sliding window, GQA and packed segments.

Visibility rule (token indices, not RoPE positions): key j is visible to query i iff
``j <= i`` and ``i - j < window`` (``window=None``: unbounded) and both lie in the same segment.
A window of W therefore holds W keys including the query itself (FlashAttention-2's
``window_size=(W - 1, W - 1)`` with ``causal=True``).

GQA: query head h reads KV head ``h // (Hq // Hkv)`` (repeat-interleave, never tiling).

Impls of ``attention`` (self-attention over one sequence, no cache):
- ``"dense"``: ``jax.nn.dot_product_attention`` (XLA) with an explicit ``[T, T]`` mask; short T only;
- ``"cudnn"``: cuDNN flash attention with ``local_window_size`` (GPU, bf16/fp16, no segments);
- ``"blockwise"``: query blocks x key blocks with an online softmax; only the key blocks a query
  block can see are visited (O(T * min(T, W)) work, O(block^2) memory per step);
- ``"auto"``: cuDNN where it applies, dense up to ``DENSE_MAX_LEN`` tokens, blockwise beyond.

``masked_attention`` is the cache path: explicit query/key token indices and key validity,
bounded sizes (a decode step or one prefill chunk against a window cache).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DENSE_MAX_LEN = 1024
_MASKED = -1e30

IMPLS = ("auto", "dense", "cudnn", "blockwise")


def visibility(q_index, k_index, window, k_valid=None):
    """Boolean ``[..., T, S]`` mask of the visibility rule from token indices ``[..., T]``, ``[..., S]``."""
    diff = q_index[..., :, None] - k_index[..., None, :]
    mask = diff >= 0
    if window is not None:
        mask = mask & (diff < window)
    if k_valid is not None:
        mask = mask & k_valid[..., None, :]
    return mask


def _check(q, k, v, window, segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention needs q [B,T,Hq,D], k and v [B,S,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None; got {window}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [batch, time] = {q.shape[:2]}; got {segment_ids.shape}")


def masked_attention(q, k, v, mask):
    """Softmax attention under an explicit boolean mask.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]``; mask: ``[B, T, S]`` (or broadcastable).
    Returns ``[B, T, Hq, D]`` in q's dtype. Rows with no visible key return zeros.
    """
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(batch, t, hkv, hq // hkv, d)
    logits = jnp.einsum("bthgd,bshd->bhgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    mask = jnp.broadcast_to(mask, (batch, t, k.shape[1]))[:, None, None]
    logits = jnp.where(mask, logits, _MASKED)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out = jnp.einsum("bhgts,bshd->bthgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, t, hq, d).astype(q.dtype)


def _dense(q, k, v, window, segment_ids):
    index = jnp.arange(q.shape[1])
    mask = visibility(index, index, window)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def _cudnn(q, k, v, window):
    local = None if window is None else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation="cudnn")


def _blockwise(q, k, v, window, segment_ids, block):
    """Online-softmax attention over (query block, visible key block) pairs."""
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    block = min(block, t)
    pad = (-t) % block
    n = (t + pad) // block
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, t), jnp.int32)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    # Key blocks a query block can see: itself and the ones within the window before it.
    span = n if window is None else min(n, -(-(window - 1) // block) + 1)
    qb = q.reshape(batch, n, block, hkv, hq // hkv, d) / math.sqrt(d)
    kb, vb = (x.reshape(batch, n, block, hkv, d) for x in (k, v))
    sb = segment_ids.reshape(batch, n, block)

    def query_block(i):
        q_i, s_i = qb[:, i], sb[:, i]
        q_index = i * block + jnp.arange(block)

        def key_block(carry, step):
            m, l, acc = carry
            j = i - (span - 1) + step
            jc = jnp.maximum(j, 0)
            k_j, v_j, s_j = kb[:, jc], vb[:, jc], sb[:, jc]
            k_index = jc * block + jnp.arange(block)
            mask = visibility(q_index, k_index, window) & (j >= 0)
            mask = mask[None] & (s_i[:, :, None] == s_j[:, None, :])  # [B, bq, bk]
            logits = jnp.einsum("bthgd,bshd->bhgts", q_i, k_j, preferred_element_type=jnp.float32)
            logits = jnp.where(mask[:, None, None], logits, _MASKED)
            m_new = jnp.maximum(m, logits.max(-1))
            p = jnp.exp(logits - m_new[..., None])
            rescale = jnp.exp(m - m_new)
            l = l * rescale + p.sum(-1)
            acc = acc * rescale[..., None] + jnp.einsum(
                "bhgts,bshd->bhgtd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        shape = (batch, hkv, hq // hkv, block)
        init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, d), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(key_block, init, jnp.arange(span))
        return acc / l[..., None]  # [B, Hkv, G, bq, D]

    out = jax.lax.map(query_block, jnp.arange(n))  # [N, B, Hkv, G, bq, D]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(batch, n * block, hq, d)
    return out[:, :t].astype(q.dtype)


def _resolve(impl, q, window, segment_ids):
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and segment_ids is None and q.dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "dense" if q.shape[1] <= DENSE_MAX_LEN else "blockwise"


def attention(q, k, v, *, window=None, segment_ids=None, impl="auto", block_size=512):
    """Causal (optionally sliding-window) self-attention with GQA and packed segments.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (same T: one sequence, no cache).
      window: keys per query including itself, or None for full causal attention.
      segment_ids: optional ``[B, T]`` ints; attention never crosses a segment boundary.
      impl: one of ``IMPLS``; block_size: query/key block for ``"blockwise"``.
    Returns ``[B, T, Hq, D]`` in q's dtype; softmax scale ``D ** -0.5``.
    """
    _check(q, k, v, window, segment_ids)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"attention is self-attention: q has {q.shape[1]} tokens, k has {k.shape[1]}")
    impl = _resolve(impl, q, window, segment_ids)
    if impl == "dense":
        return _dense(q, k, v, window, segment_ids)
    if impl == "cudnn":
        if segment_ids is not None:
            raise ValueError("the cudnn attention impl does not take segment_ids; use 'blockwise'")
        return _cudnn(q, k, v, window)
    return _blockwise(q, k, v, window, segment_ids, block_size)
