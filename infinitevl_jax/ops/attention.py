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
- ``"auto"``: cuDNN where it applies, dense up to ``DENSE_MAX_LEN`` tokens, blockwise beyond;
- ``"pallas"``: ``"auto"`` here; it differs on the short cache path (below).

``masked_attention`` is the short cache path (a decode step, a short chunk): explicit query/key
token indices and key validity (XLA; when asked for, see ``masked_impl``: cuDNN with the mask
as a bias, or the Pallas flash kernel of ``masked_flash``). ``chunk_attention`` is the long
one (a prefill chunk after a cache): keys in stream order with a per-row first visible key; it
runs flash attention (``attention``) where the chunk allows, else an online softmax over the
visible key blocks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from infinitevl_jax.ops.masked_flash import masked_flash_attention

DENSE_MAX_LEN = 1024
# masked_attention joins its key/value parts (not their logits) from this many queries on.
CONCAT_PARTS_MIN_QUERIES = 16
_MASKED = -1e30

IMPLS = ("auto", "dense", "cudnn", "blockwise", "pallas")


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


def masked_impl(impl, q):
    """The ``masked_attention`` impl for attention impl ``impl`` and q ``[B, T, Hq, D]``:
    ``"cudnn"`` or ``"pallas"`` only when asked for (``impl`` the same) and there are at least
    ``CONCAT_PARTS_MIN_QUERIES`` queries (a chunk, e.g. a streamed frame), else ``"xla"``.

    ``"auto"`` keeps XLA: on an H200 the cuDNN form of a frame's window attention was 2.8x faster
    alone but a streamed 448x448 frame took 0.5-0.9 ms longer with it (18.1-18.2 vs 17.3-17.6 ms,
    benchmarks/RESULTS.md; why was not profiled)."""
    _check_impl(impl)
    return impl if impl in ("cudnn", "pallas") and q.shape[1] >= CONCAT_PARTS_MIN_QUERIES else "xla"


def masked_attention(q, k, v, mask, impl="xla"):
    """Softmax attention under an explicit boolean mask.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]``, or tuples of parts ``[B, S_i, Hkv, D]`` that
        form the S keys in order (e.g. a cache and the new tokens); mask: ``[B, T, S]`` (or
        broadcastable).
      impl: ``"xla"``: logits, masked softmax and the weighted sum in XLA; ``"cudnn"`` (GPU, bf16
        or fp16): cuDNN flash attention with the mask as an additive bias (one kernel; the XLA
        form of a streamed frame, 256 queries over an 8K window, writes and re-reads 138 MB of
        float32 logits per layer); ``"pallas"`` (GPU, or interpreted on CPU): the flash kernel
        of ``masked_flash``, the mask read as int8.
    Returns ``[B, T, Hq, D]`` in q's dtype. Rows with no visible key return zeros.

    Below ``CONCAT_PARTS_MIN_QUERIES`` queries (a decode step) the XLA form reads each part
    where it lies and joins their logits; from there on the parts are joined first, since joining
    the logits instead copies ``Hq * T * S`` floats where joining keys and values copies
    ``2 * S * Hkv * D``.
    """
    if impl not in ("xla", "cudnn", "pallas"):
        raise ValueError(f"masked_attention impl must be 'xla', 'cudnn' or 'pallas'; got {impl!r}")
    k_parts, v_parts = (tuple(x) if isinstance(x, (tuple, list)) else (x,) for x in (k, v))
    if len(k_parts) > 1 and (impl != "xla" or q.shape[1] >= CONCAT_PARTS_MIN_QUERIES):
        k_parts = (jnp.concatenate([part.astype(k_parts[0].dtype) for part in k_parts], axis=1),)
        v_parts = (jnp.concatenate([part.astype(v_parts[0].dtype) for part in v_parts], axis=1),)
    if impl != "xla":  # one kernel over the joined parts and the full mask
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[1], k_parts[0].shape[1]))
        if impl == "pallas":
            return masked_flash_attention(q, k_parts[0], v_parts[0], mask)
        out = jax.nn.dot_product_attention(q, k_parts[0], v_parts[0], mask=mask[:, None], implementation="cudnn")
        return jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, jnp.zeros((), out.dtype))
    batch, t, hq, d = q.shape
    hkv = k_parts[0].shape[2]
    qg = q.reshape(batch, t, hkv, hq // hkv, d)
    logits = jnp.concatenate([jnp.einsum("bthgd,bshd->bhgts", qg, part, preferred_element_type=jnp.float32)
                              for part in k_parts], axis=-1) / math.sqrt(d)
    mask = jnp.broadcast_to(mask, (batch, t, logits.shape[-1]))[:, None, None]
    logits = jnp.where(mask, logits, _MASKED)
    probs = jnp.where(mask, jax.nn.softmax(logits, axis=-1), 0.0)
    out, start = 0.0, 0
    for part in v_parts:
        p = probs[..., start:start + part.shape[1]].astype(part.dtype)
        out = out + jnp.einsum("bhgts,bshd->bthgd", p, part, preferred_element_type=jnp.float32)
        start += part.shape[1]
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
            j = i - (span - 1) + step
            jc = jnp.maximum(j, 0)
            k_j, v_j, s_j = kb[:, jc], vb[:, jc], sb[:, jc]
            k_index = jc * block + jnp.arange(block)
            mask = visibility(q_index, k_index, window) & (j >= 0)
            mask = mask[None] & (s_i[:, :, None] == s_j[:, None, :])  # [B, bq, bk]
            return online_softmax_step(carry, q_i, k_j, v_j, mask), None

        carry, _ = jax.lax.scan(key_block, online_softmax_init(batch, hkv, hq // hkv, block, d), jnp.arange(span))
        return online_softmax_finish(carry)

    out = jax.lax.map(query_block, jnp.arange(n))  # [N, B, Hkv, G, bq, D]
    return from_query_blocks(out, t).astype(q.dtype)


def online_softmax_init(batch, hkv, groups, block, d):
    """Running max, normaliser and weighted sum of values for ``block`` queries, before any key."""
    shape = (batch, hkv, groups, block)
    return (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, d), jnp.float32))


def online_softmax_step(carry, q_blk, k_blk, v_blk, mask):
    """Folds one key block into the running softmax (FlashAttention's online rescaling).

    carry: ``(m, l, acc)`` with m, l ``[B, Hkv, G, bq]`` and acc ``[B, Hkv, G, bq, D]``; q_blk
    ``[B, bq, Hkv, G, D]`` (already scaled); k_blk, v_blk ``[B, bk, Hkv, D]``; mask ``[B, bq, bk]``.
    With ``s`` the block's logits, ``m' = max(m, max_visible s)``, ``p = exp(s - m')`` on visible
    keys (0 elsewhere), ``l' = l e^{m - m'} + sum p``, ``acc' = acc e^{m - m'} + p v``.
    """
    m, l, acc = carry
    logits = jnp.einsum("bthgd,bshd->bhgts", q_blk, k_blk, preferred_element_type=jnp.float32)
    visible = mask[:, None, None]
    logits = jnp.where(visible, logits, _MASKED)  # finite everywhere: no inf under exp, in either mode
    m_new = jnp.maximum(m, logits.max(-1))
    p = jnp.where(visible, jnp.exp(logits - m_new[..., None]), 0.0)
    rescale = jnp.exp(m - m_new)
    l = l * rescale + p.sum(-1)
    acc = acc * rescale[..., None] + jnp.einsum(
        "bhgts,bshd->bhgtd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
    return m_new, l, acc


def online_softmax_finish(carry):
    """``acc / l`` ``[B, Hkv, G, bq, D]``; queries that saw no key get zeros."""
    _, l, acc = carry
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


def from_query_blocks(out, t):
    """``[N, B, Hkv, G, bq, D]`` per query block -> ``[B, t, Hq, D]`` (padding rows dropped)."""
    n, batch, hkv, groups, block, d = out.shape
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(batch, n * block, hkv * groups, d)
    return out[:, :t]


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")


def _resolve(impl, q, window, segment_ids):
    _check_impl(impl)
    if impl not in ("auto", "pallas"):
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



def chunk_attention(q, k, v, past_k, past_v, *, first_visible, window=None, impl="auto", block_q=512,
                    block_k=1024):
    """Attention of T new tokens over P earlier ones and themselves (a prefill chunk after a cache).

    Keys are ``concat(past_k, k)`` in stream order: key position ``p < P`` is the token
    ``P - p`` places before the first new one, key ``P + t`` is new token t, and query t sits at
    key position ``P + t``. Key p is visible to query t iff ``first_visible[b] <= p <= P + t``
    and ``P + t - p < window`` (None: unbounded): the visibility rule of ``attention`` on stream
    indices, with every key before ``first_visible[b]`` (empty cache slots, left padding) masked.

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]`` (the new tokens' keys and values).
      past_k, past_v: ``[B, P, Hkv, D]``, oldest first.
      first_visible: int ``[B]`` (may be traced): key position of each row's first real key.
      window: keys per query including itself, or None.
      impl: ``"blockwise"``: online softmax over ``block_q x block_k`` tiles, visiting per query
        block only the key blocks from its first possibly visible one to its last causal one
        (O(T * min(P + T, W)) work, bounded memory). ``"auto"`` / ``"cudnn"``: decided at run
        time: (a) no past key visible and no new token padding (``first_visible == P``): causal
        self-attention of the new tokens, ``attention(q, k, v, impl=impl)`` (cuDNN flash
        attention on GPU); (b) sliding window, ``2 T >= P`` (static) and every past key visible
        (``first_visible <= 0``): self-attention over all ``P + T`` tokens with zero queries for
        the past ones, keeping the last T outputs (``(P + T) W`` work, at most 3x the useful
        ``T W``, at flash-attention speed); (c) otherwise blockwise.
    Returns ``[B, T, Hq, D]`` in q's dtype; queries with no visible key (padding) get zeros.
    """
    _check(q, k, v, window, None)
    if past_k.ndim != 4 or past_k.shape != past_v.shape or past_k.shape[0] != k.shape[0] \
            or past_k.shape[2:] != k.shape[2:]:
        raise ValueError(f"past_k and past_v must both be [B, P, Hkv, D] matching k {k.shape}; "
                         f"got {past_k.shape} and {past_v.shape}")
    if impl not in ("auto", "cudnn", "blockwise", "pallas"):
        raise ValueError(f"chunk_attention impl must be 'auto', 'cudnn', 'blockwise' or 'pallas' (= 'auto'); "
                         f"got {impl!r}")
    impl = "auto" if impl == "pallas" else impl
    past = past_k.shape[1]
    first_visible = jnp.broadcast_to(jnp.asarray(first_visible, jnp.int32), (q.shape[0],))
    keys = lambda: jnp.concatenate([past_k, k.astype(past_k.dtype)], axis=1)
    values = lambda: jnp.concatenate([past_v, v.astype(past_v.dtype)], axis=1)

    def blockwise():
        return _offset_blockwise(q, keys(), values(), past, first_visible, window, block_q, block_k)

    if impl == "blockwise":
        return blockwise()

    def new_only():
        return attention(q, k, v, window=window, impl=impl)

    def with_prefix():
        queries = jnp.concatenate([jnp.zeros((q.shape[0], past, *q.shape[2:]), q.dtype), q], axis=1)
        return attention(queries, keys(), values(), window=window, impl=impl)[:, past:]

    case = jnp.where(jnp.all(first_visible == past), 0, 1)
    if window is None or 2 * q.shape[1] < past:
        return jax.lax.switch(case, [new_only, blockwise])
    case = jnp.where(jnp.all(first_visible <= 0) & (case == 1), 2, case)
    return jax.lax.switch(case, [new_only, blockwise, with_prefix])


def _offset_blockwise(q, k, v, query_offset, first_visible, window, block_q, block_k):
    """``chunk_attention``'s online softmax: query t at key position ``query_offset + t``;
    each query block loops (``fori_loop`` with run-time bounds) over the key blocks from the
    first one it may see (window start or the batch's first visible key) to its last causal one."""
    batch, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    q = jnp.pad(q, ((0, 0), (0, nq * bq - t), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0))) for x in (k, v))  # past every query: invisible
    qb = q.reshape(batch, nq, bq, hkv, hq // hkv, d) / math.sqrt(d)
    kb, vb = (x.reshape(batch, nk, bk, hkv, d) for x in (k, v))
    lowest = jnp.maximum(jnp.min(first_visible), 0)

    def query_block(i):
        first_query = query_offset + i * bq
        q_index = first_query + jnp.arange(bq)
        first_key = lowest if window is None else jnp.maximum(lowest, first_query - (window - 1))
        last_key = jnp.minimum(first_query + bq - 1, s - 1)

        def key_block(j, carry):
            k_index = j * bk + jnp.arange(bk)
            mask = visibility(q_index, k_index, window)[None] & (k_index[None, None, :] >= first_visible[:, None, None])
            return online_softmax_step(carry, qb[:, i], kb[:, j], vb[:, j], mask)

        init = online_softmax_init(batch, hkv, hq // hkv, bq, d)
        return online_softmax_finish(jax.lax.fori_loop(first_key // bk, last_key // bk + 1, key_block, init))

    return from_query_blocks(jax.lax.map(query_block, jnp.arange(nq)), t).astype(q.dtype)
