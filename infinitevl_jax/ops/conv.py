"""Depthwise causal short convolution over time (Gated DeltaNet's q/k/v short conv).

For a kernel of width ``W`` and per-channel weights ``w[i, c]`` (tap ``W-1`` multiplies the
current token):

    y_t[c] = sum_{i=0}^{W-1} w[i, c] * x_{t-(W-1)+i}[c]

where inputs before the start of ``x`` come from a cache of the previous ``W-1`` raw inputs
(zeros at the start of a sequence). No activation is applied here; callers apply SiLU.

Layout: PyTorch's depthwise ``Conv1d`` weight ``[C, 1, W]`` maps to ``weight[i, c] = w_pt[c, 0, i]``.
FLA keeps a ``[B, C, W]`` conv state whose last ``W-1`` columns (transposed) are this module's
``[B, W-1, C]`` cache; its oldest column never influences the next token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_segment_ids(segment_ids, batch: int, seq_len: int) -> None:
    """Raises unless ``segment_ids`` is None or an integer ``[batch, seq_len]`` array (shared by
    the ops that take packed sequences: this conv, the gated delta rule, the SSD scan)."""
    if segment_ids is None:
        return
    if segment_ids.shape != (batch, seq_len):
        raise ValueError(f"segment_ids must be [batch, time] = {(batch, seq_len)}; got {segment_ids.shape}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers; got dtype {segment_ids.dtype}")


def init_conv_cache(batch, width, channels, dtype):
    """Zero cache ``[batch, width - 1, channels]`` (the state at the start of a sequence)."""
    return jnp.zeros((batch, width - 1, channels), dtype)


def _check_shapes(x, weight, cache, segment_ids):
    if x.ndim != 3:
        raise ValueError(f"x must be [batch, time, channels]; got shape {x.shape}")
    batch, seq_len, channels = x.shape
    if weight.ndim != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be [width >= 1, channels]; got shape {weight.shape}")
    if weight.shape[1] != channels:
        raise ValueError(f"weight has {weight.shape[1]} channels but x has {channels} (weight shape {weight.shape})")
    expected_cache = (batch, weight.shape[0] - 1, channels)
    if cache is not None and cache.shape != expected_cache:
        raise ValueError(f"cache must be [batch, width - 1, channels] = {expected_cache}; got {cache.shape}")
    check_segment_ids(segment_ids, batch, seq_len)


def causal_conv1d(x, weight, *, cache=None, segment_ids=None, valid_len=None):
    """Depthwise causal conv over time, as ``W`` shifted slices (no ``T x T`` matrix).

    Args:
      x: ``[B, T, C]`` inputs (any float dtype); ``T`` may be smaller than ``W - 1`` (e.g. decode).
      weight: ``[W, C]``; tap ``W - 1`` multiplies the current token.
      cache: optional ``[B, W - 1, C]`` raw inputs of the previous ``W - 1`` tokens, oldest first;
        None means zeros (start of a sequence).
      segment_ids: optional ``[B, T]`` integer ids of packed sequences. A tap whose source token is
        in a different segment than token t contributes 0. The cache carries no segment ids: its
        rows count as token 0's segment.
      valid_len: optional int scalar (may be traced), ``0 <= valid_len <= T``: only the first
        ``valid_len`` tokens of x are real, the rest is right padding that the new cache never
        holds. Default T.

    Returns:
      ``(y, new_cache)``: y ``[B, T, C]`` in x's dtype (accumulated in float32); new_cache
      ``[B, W - 1, C]`` in x's dtype = the ``W - 1`` rows of ``concat(cache, x)`` that end at
      token ``valid_len - 1`` (the last ``W - 1`` rows without padding).
    """
    _check_shapes(x, weight, cache, segment_ids)
    batch, seq_len, channels = x.shape
    width = weight.shape[0]
    if cache is None:
        cache = init_conv_cache(batch, width, channels, x.dtype)
    else:
        # XLA on GPU turns a one-row matmul into multiply + reduce and would fuse that reduce
        # into the concatenation below, a fusion it emits one output element per thread: a
        # decode step's q/k/v projections then took 143 us per 8 MB weight on an H200
        # (benchmarks/decode_profile_gpu). The barrier keeps the producer a fusion of its own.
        x = jax.lax.optimization_barrier(x)
    padded = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    source = padded.astype(jnp.float32)
    w = weight.astype(jnp.float32)

    if segment_ids is not None:
        history = jnp.broadcast_to(segment_ids[:, :1], (batch, width - 1))
        padded_ids = jnp.concatenate([history, segment_ids], axis=1)  # [B, W-1+T]

    y = jnp.zeros((batch, seq_len, channels), jnp.float32)
    for i in range(width):
        tap = source[:, i:i + seq_len] * w[i]
        if segment_ids is not None:
            same_segment = padded_ids[:, i:i + seq_len] == segment_ids
            tap = jnp.where(same_segment[..., None], tap, 0.0)
        y = y + tap

    if valid_len is None:
        new_cache = padded[:, padded.shape[1] - (width - 1):]
    else:  # rows [valid_len, valid_len + W - 1) of padded end at x[valid_len - 1]
        new_cache = jax.lax.dynamic_slice_in_dim(padded, valid_len, width - 1, axis=1)
    return y.astype(x.dtype), new_cache
