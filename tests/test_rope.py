"""Tests for ``infinitevl_jax.ops.rope`` (1-D RoPE and Qwen2.5-VL mRoPE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinitevl_jax.ops.rope import apply_rope, rope_cos_sin, rope_inv_freq

HEAD_DIM, THETA, SECTION = 128, 1e6, (16, 24, 24)
B, T, H = 2, 11, 3
# Jitted once per shape instead of one compile per eager op (keeps the suite fast).
cos_sin = jax.jit(rope_cos_sin, static_argnums=(1, 2), static_argnames=("mrope_section", "dtype"))
rope = jax.jit(apply_rope)


def _mrope_position_ids(rng, high=300):
    """``[3, B, T]`` int ids in ``[0, high)`` with distinct temporal / height / width components."""
    return np.stack([rng.integers(0, high, size=(B, T)) for _ in range(3)]).astype(np.int32)


def _hf_rotary(dtype_name="float32"):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding, apply_rotary_pos_emb

    config = Qwen2_5_VLTextConfig(
        hidden_size=HEAD_DIM * 2, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "mrope_section": list(SECTION)})
    rotary = Qwen2_5_VLRotaryEmbedding(config)
    dtype = getattr(torch, dtype_name)

    def hf_tables(position_ids):
        return rotary(torch.zeros(1, dtype=dtype), torch.from_numpy(np.asarray(position_ids, np.int64)))

    return torch, hf_tables, apply_rotary_pos_emb


def reference_mrope(x, position_ids):
    """float64 from the spec's dim layout: dims [0,16)+[64,80) temporal, [16,40)+[80,104) height, rest width."""
    half = HEAD_DIM // 2
    inv_freq = THETA ** (-np.arange(half) * 2.0 / HEAD_DIM)
    component = np.empty(HEAD_DIM, int)
    for lo, hi, c in ((0, 16, 0), (16, 40, 1), (40, 64, 2)):
        component[lo:hi] = component[half + lo:half + hi] = c
    positions = np.moveaxis(np.asarray(position_ids, np.float64)[component], 0, -1)  # [B, T, D]
    angles = positions * np.concatenate([inv_freq, inv_freq])
    x = np.asarray(x, np.float64)
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * np.cos(angles)[:, :, None] + rotated * np.sin(angles)[:, :, None]


def test_inv_freq():
    expected = THETA ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    inv_freq = rope_inv_freq(HEAD_DIM, THETA)
    assert inv_freq.dtype == jnp.float32 and inv_freq.shape == (HEAD_DIM // 2,)
    np.testing.assert_allclose(np.asarray(inv_freq), expected, rtol=2 ** -24)  # correctly rounded
    jitted = jax.jit(rope_inv_freq, static_argnums=(0, 1))(HEAD_DIM, THETA)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(inv_freq))


def test_mrope_matches_float64_reference():
    rng = np.random.default_rng(0)
    position_ids = _mrope_position_ids(rng)
    x = rng.standard_normal((B, T, H, HEAD_DIM)).astype(np.float32)
    cos, sin = cos_sin(jnp.asarray(position_ids), HEAD_DIM, THETA, mrope_section=SECTION)
    assert cos.shape == sin.shape == (B, T, HEAD_DIM) and cos.dtype == jnp.float32
    out = rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(np.asarray(out), reference_mrope(x, position_ids), atol=2e-4)


def test_mrope_matches_transformers_qwen2_5_vl():
    torch, hf_cos_sin, hf_apply = _hf_rotary()
    rng = np.random.default_rng(1)
    # inv_freq tables may differ by one float32 ulp from PyTorch's, i.e. angles by position * 2^-24:
    # positions below 128 keep cos/sin within 1e-5 (and rotated unit-variance vectors within 4e-5).
    position_ids = _mrope_position_ids(rng, high=128)
    q = rng.standard_normal((B, T, 16, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((B, T, 2, HEAD_DIM)).astype(np.float32)

    hf_cos, hf_sin = hf_cos_sin(position_ids)
    hf_q, hf_k = hf_apply(torch.from_numpy(q), torch.from_numpy(k), hf_cos, hf_sin, unsqueeze_dim=2)

    cos, sin = cos_sin(jnp.asarray(position_ids), HEAD_DIM, THETA, mrope_section=SECTION)
    np.testing.assert_allclose(np.asarray(cos), hf_cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin), hf_sin.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rope(jnp.asarray(q), cos, sin)), hf_q.numpy(), atol=4e-5)
    np.testing.assert_allclose(np.asarray(rope(jnp.asarray(k), cos, sin)), hf_k.numpy(), atol=4e-5)


def test_text_positions_match_transformers_and_1d_rope():
    _, hf_cos_sin, _ = _hf_rotary()
    position_ids = np.tile(np.arange(T, dtype=np.int32) + 5, (B, 1))
    hf_cos, hf_sin = hf_cos_sin(position_ids)  # HF broadcasts [B, T] to three equal components
    cos_m, sin_m = cos_sin(jnp.asarray(position_ids), HEAD_DIM, THETA, mrope_section=SECTION)
    cos_1, sin_1 = cos_sin(jnp.asarray(position_ids), HEAD_DIM, THETA)
    np.testing.assert_allclose(np.asarray(cos_m), hf_cos.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin_m), hf_sin.numpy(), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cos_m), np.asarray(cos_1))
    np.testing.assert_array_equal(np.asarray(sin_m), np.asarray(sin_1))
    stacked = jnp.asarray(np.stack([position_ids] * 3))
    np.testing.assert_array_equal(
        np.asarray(cos_sin(stacked, HEAD_DIM, THETA, mrope_section=SECTION)[0]), np.asarray(cos_1))


def test_bfloat16_tables_match_transformers():
    _, hf_cos_sin, _ = _hf_rotary("bfloat16")
    position_ids = _mrope_position_ids(np.random.default_rng(2), high=128)
    hf_cos, hf_sin = hf_cos_sin(position_ids)
    cos, sin = cos_sin(jnp.asarray(position_ids), HEAD_DIM, THETA, mrope_section=SECTION, dtype=jnp.bfloat16)
    assert cos.dtype == sin.dtype == jnp.bfloat16
    # float32 tables agree to ~1e-6, so rounding to bf16 can differ by at most one bf16 ulp (2^-8 below 1).
    np.testing.assert_allclose(np.asarray(cos, np.float32), hf_cos.float().numpy(), atol=2 ** -8)
    np.testing.assert_allclose(np.asarray(sin, np.float32), hf_sin.float().numpy(), atol=2 ** -8)


@pytest.mark.parametrize("mrope_section", [None, SECTION])
def test_norm_preserved(mrope_section):
    rng = np.random.default_rng(3)
    position_ids = _mrope_position_ids(rng) if mrope_section else rng.integers(0, 5000, (B, T)).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((B, T, H, HEAD_DIM)).astype(np.float32))
    out = rope(x, *cos_sin(jnp.asarray(position_ids), HEAD_DIM, THETA, mrope_section=mrope_section))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_1d_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(4)
    head_dim, theta = 64, 1e4
    q, k = rng.standard_normal((2, head_dim)).astype(np.float32)
    starts = np.array([0, 3, 17, 40, 123, 250], np.int32)

    def rotated(vector, positions):
        x = jnp.broadcast_to(jnp.asarray(vector), (1, len(positions), 1, head_dim))
        return rope(x, *cos_sin(jnp.asarray(positions)[None], head_dim, theta))[0, :, 0]

    scores = {}
    for offset in (0, 5, 31):
        scores[offset] = np.sum(np.asarray(rotated(q, starts + offset)) * np.asarray(rotated(k, starts)), axis=-1)
        np.testing.assert_allclose(scores[offset], scores[offset][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores[0][0], q @ k, rtol=1e-5)
    assert abs(scores[5][0] - scores[31][0]) > 1e-2


def test_apply_rope_dtypes():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 4, 2, 8)), jnp.bfloat16)
    cos, sin = cos_sin(jnp.arange(4)[None], 8, 1e4)
    assert rope(x, cos, sin).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "position_shape, head_dim, mrope_section, match",
    [
        ((B, T), 127, None, "head_dim must be even"),
        ((3, B, T), HEAD_DIM, (16, 24, 23), "must sum to head_dim // 2"),
        ((3, B, T), HEAD_DIM, (32, 32), "3 non-negative sizes"),
        ((3, B, T), HEAD_DIM, None, "pass mrope_section"),
        ((2, B, T), HEAD_DIM, SECTION, r"\[3, batch, time\]"),
        ((T,), HEAD_DIM, SECTION, r"\[3, batch, time\]"),
        ((T,), HEAD_DIM, None, r"\[batch, time\] for 1-D"),
    ],
)
def test_rope_cos_sin_validation(position_shape, head_dim, mrope_section, match):
    with pytest.raises(ValueError, match=match):
        rope_cos_sin(jnp.zeros(position_shape, jnp.int32), head_dim, THETA, mrope_section=mrope_section)


def test_apply_rope_validation():
    cos, sin = cos_sin(jnp.zeros((B, T), jnp.int32), 8, 1e4)
    with pytest.raises(ValueError, match="x must be"):
        apply_rope(jnp.zeros((B, T, 8)), cos, sin)
    with pytest.raises(ValueError, match="does not match"):
        apply_rope(jnp.zeros((B, T, H, 16)), cos, sin)
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(jnp.zeros((B, T, H, 8)), cos, sin[..., :4])
