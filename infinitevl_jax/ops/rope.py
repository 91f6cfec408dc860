"""Rotary position embeddings: 1-D RoPE and Qwen2.5-VL's multimodal RoPE (mRoPE).

With ``half = head_dim // 2`` frequencies ``inv_freq_j = theta^(-2j / head_dim)`` and a position
``p_j`` per frequency index, the angle is ``phi_j = p_j * inv_freq_j`` (float32) and

    emb = concat(phi, phi)                                   # [head_dim]
    rope(x) = x * cos(emb) + rotate_half(x) * sin(emb)
    rotate_half(x) = concat(-x[half:], x[:half])

i.e. dims ``i`` and ``i + half`` form a rotated pair (not interleaved pairs).

1-D RoPE uses the token position for every ``j``. mRoPE takes position ids ``P`` of shape
``[3, B, T]`` (temporal, height, width) and a section split ``(s0, s1, s2)`` with
``s0 + s1 + s2 = half``: frequency ``j`` uses component 0 for ``j < s0``, 1 for
``s0 <= j < s0 + s1`` and 2 otherwise. Because ``emb`` duplicates ``phi``, the split repeats in the
second half of the head: for head_dim 128 and (16, 24, 24), dims [0,16) and [64,80) are temporal,
[16,40) and [80,104) height, [40,64) and [104,128) width. Text tokens have equal components, which
reduces mRoPE to 1-D RoPE.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_inv_freq(head_dim, theta):
    """float32 ``[head_dim // 2]`` with ``inv_freq_j = theta^(-2j / head_dim)``.

    Computed in float64 on the host and rounded once to float32, so the table is the same under
    jit or eager on every backend (XLA's float32 ``pow`` differs between the two). PyTorch's float32
    ``1 / theta ** (arange / dim)`` agrees to 1 ulp, i.e. angles agree to ``position * 2^-24``.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return jnp.asarray(np.power(float(theta), -exponents).astype(np.float32))


def _section_components(mrope_section, half):
    """int ``[half]``: the position component (0, 1 or 2) used by each frequency index."""
    sections = tuple(int(s) for s in mrope_section)
    if len(sections) != 3 or min(sections) < 0:
        raise ValueError(f"mrope_section must be 3 non-negative sizes (t, h, w); got {mrope_section}")
    if sum(sections) != half:
        raise ValueError(f"mrope_section {sections} must sum to head_dim // 2 = {half}; sums to {sum(sections)}")
    return np.repeat(np.arange(3), sections)


def _frequency_positions(position_ids, mrope_section, half):
    """Positions per frequency index, ``[B, T, half]`` (integers as given)."""
    components = None if mrope_section is None else _section_components(mrope_section, half)
    if position_ids.ndim == 2:
        return jnp.broadcast_to(position_ids[..., None], position_ids.shape + (half,))
    if components is None:
        raise ValueError(
            f"position_ids must be [batch, time] for 1-D RoPE; got shape {position_ids.shape} "
            "(pass mrope_section for [3, batch, time] mRoPE ids)")
    if position_ids.ndim != 3 or position_ids.shape[0] != 3:
        raise ValueError(
            f"position_ids must be [batch, time] or [3, batch, time] for mRoPE; got shape {position_ids.shape}")
    return jnp.moveaxis(position_ids[components], 0, -1)


def rope_cos_sin(position_ids, head_dim, theta, *, mrope_section=None, dtype=jnp.float32):
    """cos and sin tables for ``apply_rope``, each ``[B, T, head_dim]`` in ``dtype``.

    Args:
      position_ids: integer ``[B, T]`` (1-D RoPE, or text-only mRoPE where all three components
        are equal) or ``[3, B, T]`` (temporal, height, width; needs ``mrope_section``).
      head_dim: even rotary dimension.
      theta: RoPE base.
      mrope_section: None for 1-D RoPE, else three sizes summing to ``head_dim // 2``.
      dtype: output dtype (the activation dtype); angles, cos and sin are computed in float32 and
        rounded once at the end, as Qwen2.5-VL does.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even; got {head_dim}")
    half = head_dim // 2
    positions = _frequency_positions(position_ids, mrope_section, half)
    angles = positions.astype(jnp.float32) * rope_inv_freq(head_dim, theta)  # [B, T, half]
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    """``concat(-x[..., D/2:], x[..., :D/2])`` over the last axis."""
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rope(x, cos, sin):
    """``x * cos + rotate_half(x) * sin`` for x ``[B, T, H, D]``, cos/sin ``[B, T, D]`` shared by heads.

    Arithmetic runs in the promoted dtype of x and cos/sin; the result is cast to x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, time, heads, head_dim]; got shape {x.shape}")
    if cos.shape != sin.shape or cos.ndim != 3:
        raise ValueError(f"cos and sin must both be [batch, time, head_dim]; got {cos.shape} and {sin.shape}")
    if cos.shape[1:] != (x.shape[1], x.shape[3]):
        raise ValueError(f"cos/sin shape {cos.shape} does not match x [batch, time, heads, head_dim] {x.shape}")
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x * cos + rotate_half(x) * sin).astype(x.dtype)
