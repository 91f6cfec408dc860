"""Shared by the chunk-parallel scans (``ops.delta_rule.chunked``, ``ops.ssm``): their matmul
precision rule, time-axis padding and the chunk layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def matmul_dtype_for(dtype):
    """Operand dtype of the chunk-parallel matmuls for inputs of ``dtype``: the 16-bit type
    itself (float32 accumulation, FLA's choice), else float32."""
    return dtype if dtype in (jnp.bfloat16, jnp.float16) else jnp.float32


def mm(spec, *operands, dtype=jnp.float32):
    """einsum with float32 results: float32 operands at HIGHEST precision, or operands cast to a
    16-bit ``dtype`` (tensor-core rate) with float32 accumulation."""
    if dtype == jnp.float32:
        return jnp.einsum(spec, *operands, precision=_HIGHEST)
    return jnp.einsum(spec, *(x.astype(dtype) for x in operands), preferred_element_type=jnp.float32)


def pad_time(x, pad):
    """``x [B, T, ...]`` with ``pad`` zeros appended on the time axis."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def pad_to_chunks(xs, chunk_size):
    """``[B, T, ...]`` arrays zero-padded on the time axis to N * ``chunk_size`` tokens; returns
    them and N."""
    seq_len = xs[0].shape[1]
    pad = (-seq_len) % chunk_size
    return [pad_time(x, pad) for x in xs], (seq_len + pad) // chunk_size


def to_chunks(x, chunk_size):
    """``[B, N*C, H, ...]`` -> ``[B, H, N, C, ...]``."""
    batch, length, heads = x.shape[:3]
    return jnp.moveaxis(x.reshape(batch, length // chunk_size, chunk_size, heads, *x.shape[3:]), 3, 1)
