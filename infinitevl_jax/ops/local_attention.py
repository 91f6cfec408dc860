"""Grouped local attention: the "Local-Swin" branch of LinMU's M-MATE mixer.

The T queries are the last T tokens of a key sequence of S = P + T tokens (P >= 0 cached keys in
front; P = 0 for plain self-attention): query i sits at key position ``P + i``. Every token carries
integer metadata: ``pos`` (stream index), ``group`` (window id: >= 0 for a windowed vision token,
< 0 for a text token) and ``segment`` (packed sequence / validity id).

Visibility rule: key j is visible to query i iff ``k_segment[j] == q_segment[i]`` and
- windowed query (``q_group[i] >= 0``): ``k_group[j] == q_group[i]`` (bidirectional in the window);
- text query (``q_group[i] < 0``): ``0 <= q_pos[i] - k_pos[j] < text_window`` (a causal sliding
  window of ``text_window`` keys counting the query itself, over keys of any group).
A query with no visible key outputs zeros.

Locality promise (made by the caller, used by ``"banded"``): every visible key of query i lies
within ``radius`` places of it in the key sequence, ``|(P + i) - j| <= radius``. Where the promise
is broken, ``"banded"`` drops the visible keys outside each query block's key slice (see
``_banded``); ``"dense"`` applies the rule alone.

GQA: query head h reads KV head ``h // (Hq // Hkv)``, as in ``ops.attention``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinitevl_jax.ops.attention import (
    from_query_blocks,
    online_softmax_finish,
    online_softmax_init,
    online_softmax_step,
)

IMPLS = ("auto", "dense", "banded")
DENSE_MAX_ELEMENTS = 1 << 20  # "auto" goes dense while T * S stays at or below this
QUERIES_PER_STEP = 4096  # "banded": queries per lax.map step (blocks vmapped together)


def local_visibility(q_pos, k_pos, q_group, k_group, q_segment, k_segment, text_window):
    """Boolean ``[B, T, S]`` mask of the visibility rule from ``[B, T]`` query and ``[B, S]`` key metadata."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    text = (diff >= 0) & (diff < text_window)
    window = q_group[:, :, None] == k_group[:, None, :]
    rule = jnp.where(q_group[:, :, None] >= 0, window, text)
    return rule & (q_segment[:, :, None] == k_segment[:, None, :])


def _check(q, k, v, meta, text_window, radius, impl, block):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"local_attention needs q [B,T,Hq,D], k and v [B,S,Hkv,D]; "
                         f"got ranks {q.ndim}, {k.ndim}, {v.ndim}")
    if v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on the batch size")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on the head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"S < T: the queries are the last T of the S keys; got T={q.shape[1]}, S={k.shape[1]}")
    batch, t, s = q.shape[0], q.shape[1], k.shape[1]
    for name, x in meta.items():
        axis, want = ("T", (batch, t)) if name.startswith("q_") else ("S", (batch, s))
        if tuple(x.shape) != want:
            raise ValueError(f"{name} must be [B, {axis}] = {want}; got {tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must hold integers; got {x.dtype}")
    if text_window < 1:
        raise ValueError(f"text_window must be >= 1; got {text_window}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0; got {radius}")
    if impl not in IMPLS:
        raise ValueError(f"unknown local_attention impl {impl!r}; choose one of {IMPLS}")
    if block < 1:
        raise ValueError(f"block must be >= 1; got {block}")


def _attend(q, k, v, mask):
    """Masked softmax of pre-scaled ``q [B, T, Hkv, G, D]`` over ``k, v [B, S, Hkv, D]`` under
    ``mask [B, T, S]`` (one step of the online softmax); ``[B, Hkv, G, T, D]`` float32, zero rows
    where nothing is visible."""
    batch, t, hkv, groups, d = q.shape
    carry = online_softmax_init(batch, hkv, groups, t, d)
    return online_softmax_finish(online_softmax_step(carry, q, k, v, mask))


def _dense(q, k, v, meta, text_window):
    mask = local_visibility(meta["q_pos"], meta["k_pos"], meta["q_group"], meta["k_group"],
                            meta["q_segment"], meta["k_segment"], text_window)
    out = _attend(q, k, v, mask)  # [B, Hkv, G, T, D]
    return from_query_blocks(out[None], q.shape[1])


def _banded(q, k, v, meta, text_window, radius, block):
    """Query blocks of ``block`` tokens, each against the keys within ``radius`` of it.

    Block i (key positions ``P + i*block ..``) reads the key slice ``[P + i*block - radius,
    P + (i+1)*block + radius)``; keys are padded by ``radius`` at both ends (and queries up to a
    multiple of ``block``), the padding masked out by position, not by a sentinel segment id.
    The overlapping slices are gathered once (``[N, B, block + 2 radius, ...]``, so the backward
    pass scatter-adds their cotangents once) and ``lax.map`` runs ``QUERIES_PER_STEP / block``
    blocks per step (vmapped): per step O(B Hq QUERIES_PER_STEP (block + 2 radius)) logits,
    O(T (block + 2 radius)) in all under ``jax.grad``.
    """
    batch, t, hkv, groups, d = q.shape
    s = k.shape[1]
    past = s - t
    block = min(block, t)
    n = -(-t // block)
    pad_q = n * block - t
    span = block + 2 * radius
    # Padded key index r + j holds key j; block i reads padded keys past + i*block + arange(span).
    pad_k = ((0, 0), (radius, radius + pad_q))
    k = jnp.pad(k, (*pad_k, (0, 0), (0, 0)))
    v = jnp.pad(v, (*pad_k, (0, 0), (0, 0)))
    k_meta = {name: jnp.pad(meta[name], pad_k) for name in ("k_pos", "k_group", "k_segment")}
    index = past + block * jnp.arange(n)[:, None] + jnp.arange(span)[None, :]  # [N, span]
    k_valid = (index >= radius) & (index < radius + s)

    def slices(x):  # [B, S_pad, ...] -> [N, B, span, ...]
        return jnp.moveaxis(jnp.take(x, index, axis=1), 1, 0)

    def query_blocks(x):  # [B, T, ...] -> [N, B, block, ...]
        x = jnp.pad(x, ((0, 0), (0, pad_q)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(batch, n, block, *x.shape[2:]), 1, 0)

    xs = (query_blocks(q), slices(k), slices(v), k_valid,
          *(query_blocks(meta[name]) for name in ("q_pos", "q_group", "q_segment")),
          *(slices(k_meta[name]) for name in ("k_pos", "k_group", "k_segment")))

    def one_block(x):
        q_i, k_i, v_i, valid_i, q_pos, q_group, q_seg, k_pos, k_group, k_seg = x
        mask = local_visibility(q_pos, k_pos, q_group, k_group, q_seg, k_seg, text_window)
        return _attend(q_i, k_i, v_i, mask & valid_i[None, None, :])

    per_step = max(1, min(n, QUERIES_PER_STEP // block))
    out = jax.lax.map(one_block, xs, batch_size=per_step)  # [N, B, Hkv, G, block, D]
    return from_query_blocks(out, t)


def local_attention(q, k, v, *, q_pos, k_pos, q_group, k_group, q_segment, k_segment, text_window: int,
                    radius: int, impl: str = "auto", block: int = 128, scale=None):
    """Grouped local attention of the last T tokens over all S = P + T keys (module docstring's rule).

    Args:
      q: ``[B, T, Hq, D]``; k, v: ``[B, S, Hkv, D]`` with ``S >= T``.
      q_pos, q_group, q_segment: int ``[B, T]``; k_pos, k_group, k_segment: int ``[B, S]``.
      text_window: keys a text query sees, itself included (>= 1).
      radius: the caller's locality bound (>= 0): every visible key is within ``radius`` places
        of its query in the key sequence. Only ``"banded"`` relies on it.
      impl: ``"dense"`` (explicit ``[B, T, S]`` mask), ``"banded"`` (query blocks of ``block``
        tokens against ``block + 2 radius`` keys each) or ``"auto"`` (dense while
        ``T * S <= 2**20``, banded beyond).
      scale: softmax scale, default ``D ** -0.5`` (applied to q in its dtype).
    Returns ``[B, T, Hq, D]`` in q's dtype (logits and softmax in float32); queries with no
    visible key get zeros.
    """
    meta = dict(q_pos=q_pos, k_pos=k_pos, q_group=q_group, k_group=k_group, q_segment=q_segment,
                k_segment=k_segment)
    meta = {name: jnp.asarray(x) for name, x in meta.items()}
    _check(q, k, v, meta, text_window, radius, impl, block)
    batch, t, hq, d = q.shape
    hkv = k.shape[2]
    if impl == "auto":
        impl = "dense" if t * k.shape[1] <= DENSE_MAX_ELEMENTS else "banded"
    if t == 0:
        return jnp.zeros(q.shape, q.dtype)
    scale = d ** -0.5 if scale is None else scale
    qs = (q * scale).astype(q.dtype).reshape(batch, t, hkv, hq // hkv, d)
    if impl == "dense":
        out = _dense(qs, k, v, meta, text_window)
    else:
        out = _banded(qs, k, v, meta, text_window, radius, block)
    return out.astype(q.dtype)
