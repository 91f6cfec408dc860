"""Softmax self-attention layer (spec section 3): GQA, q/k/v biases, mRoPE, optional window.

The same module serves InfiniteVL's sliding-window layers (``window = sliding_window``) and the
teacher's full-attention layers (``window = None``).

Cache: a ring buffer of post-RoPE keys/values with ``capacity`` slots (``window - 1`` for a
sliding layer: with the current token that is exactly ``window`` keys). Token ``n`` (counted
over the whole stream) lives in slot ``n % capacity``; the stream length is the decoder's
cache index, so slot positions are derived, never stored. A full-attention layer's cache holds
``capacity`` tokens at most, chosen by the caller.

Padding in cache mode: tokens before a row's ``start`` (stream index of its first real token)
are left padding, never visible as keys; tokens of a call from ``valid_len`` on are right padding,
never written to the cache (and, coming after every real query, never visible either).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.models.config import DecoderConfig
from infinitevl_jax.models.layers import Dense
from infinitevl_jax.ops.attention import attention, chunk_attention, masked_attention, masked_impl, visibility
from infinitevl_jax.ops.rope import apply_rope


# Query x key entries up to which a cached call attends through one dense mask: decode steps, and
# a 448 px frame's 256 tokens over an 8K window (at most 256 MiB of float32 logits over 16 heads
# in XLA; ``attention_impl="cudnn"``: one cuDNN kernel, see ``masked_impl``).
DENSE_CACHED_MAX_ELEMENTS = 1 << 22


class KVCache(NamedTuple):
    """Ring buffer of post-RoPE keys and values, each ``[B, capacity, Hkv, head_dim]``."""

    k: jax.Array
    v: jax.Array


def slot_token_index(index, capacity):
    """``[capacity]`` stream index of the token held in each slot after ``index`` tokens; < 0 if empty."""
    slots = jnp.arange(capacity)
    return index - 1 - jnp.mod(index - 1 - slots, capacity)


def ring_in_stream_order(cache: KVCache, index):
    """The ring's keys and values in stream order: place p < capacity holds token
    ``index - capacity + p`` (slot ``(index + p) % capacity``; negative tokens are empty slots)."""
    capacity = cache.k.shape[1]
    order = jnp.mod(index + jnp.arange(capacity), capacity)
    return jnp.take(cache.k, order, axis=1), jnp.take(cache.v, order, axis=1)


def ring_write(cache: KVCache, k, v, index, valid_len) -> KVCache:
    """The ring after a call of ``k``/``v`` ``[B, T, Hkv, D]`` at stream ``index``: the newest
    ``min(valid_len, capacity)`` real tokens go into their slots, the rest is dropped."""
    capacity = cache.k.shape[1]
    t = jnp.arange(k.shape[1])
    keep = (t < valid_len) & (t >= valid_len - capacity)
    slots = jnp.where(keep, jnp.mod(index + t, capacity), capacity)
    return KVCache(cache.k.at[:, slots].set(k.astype(cache.k.dtype), mode="drop"),
                   cache.v.at[:, slots].set(v.astype(cache.v.dtype), mode="drop"))


def init_kv_cache(cfg: DecoderConfig, window: int | None, batch: int, max_len: int | None = None) -> KVCache:
    """Empty ring buffer: ``window - 1`` slots for a sliding layer (fewer if ``max_len`` is
    smaller), ``max_len`` slots for a full-attention layer (required there)."""
    if window is not None:
        capacity = window - 1 if max_len is None else min(window - 1, max_len)
    elif max_len is None:
        raise ValueError("a full-attention layer's cache needs max_len (the most tokens it must hold)")
    else:
        capacity = max_len
    shape = (batch, max(capacity, 1), cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))


class SelfAttention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, window: int | None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.window = window
        d, hq, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.q_proj = Dense(d, hq * hd, axes=("embed", "heads"), use_bias=True, **dense)
        self.k_proj = Dense(d, hkv * hd, axes=("embed", "kv_heads"), use_bias=True, **dense)
        self.v_proj = Dense(d, hkv * hd, axes=("embed", "kv_heads"), use_bias=True, **dense)
        self.o_proj = Dense(hq * hd, d, axes=("heads", "embed"), **dense)

    def project(self, x, cos, sin):
        """Post-RoPE ``q [B, T, Hq, head_dim]`` and ``k``, ``v`` ``[B, T, Hkv, head_dim]`` of x ``[B, T, D]``."""
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).reshape(batch, seq_len, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, seq_len, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, seq_len, cfg.num_key_value_heads, cfg.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(self, x, cos, sin, *, cache: KVCache | None = None, index=0, start=None, valid_len=None,
                 segment_ids=None):
        """x ``[B, T, D]``, cos/sin ``[B, T, head_dim]``.

        With a cache: ``index`` = tokens seen before x (int32 scalar), ``start`` int32 ``[B]`` =
        stream index of each row's first real token (earlier ones are left padding; None: 0),
        ``valid_len`` = real tokens of x, a prefix (None: all T).
        """
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is None:
            o = attention(q, k, v, window=self.window, segment_ids=segment_ids, impl=cfg.attention_impl)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a decode cache; pad "
                                 "instead: the cache's start (left padding) and valid_len (right padding)")
            start = jnp.zeros((batch,), jnp.int32) if start is None else start
            valid_len = seq_len if valid_len is None else valid_len
            o, cache = self._attend_cached(q, k, v, cache, index, start, valid_len)
        return self.o_proj(o.reshape(batch, seq_len, -1)), cache

    def _attend_cached(self, q, k, v, cache: KVCache, index, start, valid_len):
        capacity = cache.k.shape[1]
        seq_len = q.shape[1]
        impl = self.cfg.attention_impl
        if impl == "dense" or (impl != "blockwise" and seq_len * (capacity + seq_len) <= DENSE_CACHED_MAX_ELEMENTS):
            # Slots as they lie (no reordering of the ring): explicit token indices.
            k_index = jnp.concatenate([slot_token_index(index, capacity), index + jnp.arange(seq_len)])
            mask = visibility(index + jnp.arange(seq_len), k_index, self.window, k_index[None] >= start[:, None])
            o = masked_attention(q, (cache.k, k.astype(cache.k.dtype)), (cache.v, v.astype(cache.v.dtype)), mask,
                                 impl=masked_impl(impl, q))
        else:
            # Stream order: position p < capacity holds token index - capacity + p, in slot (index + p) % capacity;
            # token start[b] sits at position start - index + capacity (start >= 0: empty slots are masked too).
            past_k, past_v = ring_in_stream_order(cache, index)
            o = chunk_attention(q, k, v, past_k, past_v, first_visible=start - index + capacity,
                                window=self.window, impl=impl)
        return o, ring_write(cache, k, v, index, valid_len)
