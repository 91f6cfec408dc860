"""The hybrid decoder: float64 reference forward, caches, packing, presets."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.config import load_config
from infinitevl_jax.models import Decoder, DecoderConfig
from tests.reference.decoder import decoder_logits_ref

T = 40


def tiny_config(**changes):
    return dataclasses.replace(DecoderConfig.from_dict(load_config("tiny").model), **changes)


def make_model(cfg, seed=0):
    return Decoder(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def hybrid():
    cfg = tiny_config()
    return cfg, make_model(cfg)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, T)))


@nnx.jit
def full_forward(model, ids):
    return model(ids)[0]


@nnx.jit
def cached_forward(model, ids, cache):
    return model(ids, cache=cache)


def run_in_pieces(model, ids, sizes, max_len=None):
    cache = model.init_cache(ids.shape[0], max_len)
    outs, start = [], 0
    for size in sizes:
        logits, cache = cached_forward(model, ids[:, start:start + size], cache)
        outs.append(logits)
        start += size
    assert start == ids.shape[1]
    return jnp.concatenate(outs, axis=1), cache


def test_hybrid_pattern_and_blocks(hybrid):
    cfg, _ = hybrid
    assert cfg.block_pattern == ("sliding_attention", "linear_attention", "linear_attention", "linear_attention")
    assert cfg.num_blocks == 2


def test_full_forward_matches_float64_reference(hybrid, ids):
    cfg, model = hybrid
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ref = decoder_logits_ref(params, cfg, ids)
    out = np.asarray(full_forward(model, ids))
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_token_by_token_equals_full_forward(hybrid, ids):
    """T = 40 > window 16: the SWA ring buffer wraps several times."""
    _, model = hybrid
    full = np.asarray(full_forward(model, ids))
    stepped, cache = run_in_pieces(model, ids, [1] * T)
    np.testing.assert_allclose(stepped, full, atol=2e-5 * np.abs(full).max(), rtol=0)
    assert int(cache.index) == T


def test_uneven_prefill_chunks_equal_full_forward(hybrid, ids):
    _, model = hybrid
    full = np.asarray(full_forward(model, ids))
    pieces, _ = run_in_pieces(model, ids, [5, 17, 1, 2, 15])
    np.testing.assert_allclose(pieces, full, atol=2e-5 * np.abs(full).max(), rtol=0)


def test_unstacked_decoder_matches_float64_reference(hybrid, ids):
    """``Decoder.unstacked`` (separate blocks, unrolled: the GPU inference form) computes the same
    function, whole and in cached pieces, and copies the block weights instead of sharing them."""
    cfg, model = hybrid
    unstacked = model.unstacked()
    assert isinstance(unstacked.blocks, nnx.List) and len(unstacked.blocks) == cfg.num_blocks
    assert not isinstance(model.blocks, nnx.List) and unstacked.unstacked() is unstacked
    assert unstacked.embed_tokens[...] is model.embed_tokens[...]
    ref = decoder_logits_ref(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, ids)
    tolerance = dict(atol=2e-5 * np.abs(ref).max(), rtol=0)
    np.testing.assert_allclose(np.asarray(full_forward(unstacked, ids)), ref, **tolerance)
    pieces, cache = run_in_pieces(unstacked, ids, [5, 17, 1, 2, 15])
    np.testing.assert_allclose(pieces, ref, **tolerance)
    assert jax.tree.map(lambda a: a.shape, cache) == jax.tree.map(lambda a: a.shape, model.init_cache(2))
    stacked_q = model.blocks.layers[1].mixer.q_proj.kernel[...]
    np.testing.assert_array_equal(unstacked.blocks[1].layers[1].mixer.q_proj.kernel[...], stacked_q[1])


def test_cache_size_does_not_grow(hybrid, ids):
    _, model = hybrid
    empty = model.init_cache(2)
    _, after = run_in_pieces(model, ids, [T])
    size = lambda c: sum(x.nbytes for x in jax.tree.leaves(c))
    assert size(after) == size(empty)
    assert jax.tree.map(lambda a: a.shape, after) == jax.tree.map(lambda a: a.shape, empty)


def test_teacher_all_full_attention(ids):
    cfg = tiny_config(layer_types=("full_attention",) * 3)
    model = make_model(cfg, seed=1)
    assert cfg.num_blocks == 3 and cfg.block_pattern == ("full_attention",)
    ref = decoder_logits_ref(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg, ids)
    full = np.asarray(full_forward(model, ids))
    np.testing.assert_allclose(full, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)
    stepped, _ = run_in_pieces(model, ids, [7, 1, 1, 31], max_len=T)
    np.testing.assert_allclose(stepped, full, atol=2e-5 * np.abs(full).max(), rtol=0)
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(2)


def test_packed_segments_equal_separate_runs(hybrid, ids):
    """Two sequences packed in one row with segment ids give each one's logits alone."""
    _, model = hybrid
    a, b = ids[:1, :23], ids[1:, :17]
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[0] * 23 + [1] * 17])
    positions = jnp.asarray([list(range(23)) + list(range(17))])
    out = np.asarray(model(packed, segment_ids=segments, position_ids=positions)[0])
    np.testing.assert_allclose(out[:, :23], full_forward(model, a), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 23:], full_forward(model, b), atol=1e-5, rtol=1e-5)


def test_remat_and_untied_head_agree_with_reference(ids):
    cfg = tiny_config(remat="full", tie_word_embeddings=False)
    model = make_model(cfg, seed=2)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    ref = decoder_logits_ref(params, cfg, ids)
    loss = lambda m: jnp.mean(m(ids)[0] ** 2)
    value, grads = nnx.value_and_grad(loss)(model)
    np.testing.assert_allclose(value, np.mean(ref ** 2), rtol=1e-4)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_infinitevl_4b_preset_parameter_count():
    """Spec section 1.3: the 4B language model has 3.740 B parameters (tied head)."""
    cfg = DecoderConfig.from_dict(load_config("infinitevl_4b").model)
    assert cfg.num_blocks == 9 and cfg.block_pattern[0] == "sliding_attention"
    assert cfg.layer_types.count("sliding_attention") == 9 and cfg.layer_types[4] == "sliding_attention"
    shapes = nnx.state(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert round(count / 1e9, 3) == 3.740
    teacher = DecoderConfig.from_dict(load_config("qwen2_5_vl_3b").model)
    assert teacher.block_pattern == ("full_attention",) and teacher.num_blocks == 36


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown layer_types"):
        tiny_config(layer_types=("mamba",))
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_config(mrope_section=(1, 1, 1))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown decoder config keys"):
        DecoderConfig.from_dict({**load_config("tiny").model.to_dict(), "num_layer": 3})
    with pytest.raises(ValueError, match="no config preset"):
        load_config("nope")
    with pytest.raises(ValueError, match="no config field"):
        load_config("tiny", ["--config.model.hiden_size=3"])
    assert load_config("tiny", ["--config.model.hidden_size=128"]).model.hidden_size == 128


def test_wrong_inputs_raise(hybrid, ids):
    _, model = hybrid
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=jnp.zeros((2, T, 64)))
    with pytest.raises(ValueError, match="hidden_size"):
        model(inputs_embeds=jnp.zeros((2, T, 65)))
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=jnp.zeros((2, T), jnp.int32), cache=model.init_cache(2))


@pytest.mark.parametrize("rows", [4, 80])
def test_swiglu_operand_barrier_changes_no_value_or_gradient(rows, monkeypatch):
    """``layers.gemm_operands``: with at least SEPARATE_GEMM_MIN_ROWS rows the MLP's gate and up
    read x through an optimization barrier (fewer rows, or the switch off: none); the values equal
    a float64 NumPy SwiGLU and the input gradient equals the one without the barrier."""
    from infinitevl_jax.models import layers

    mlp = layers.SwiGLU(16, 40, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, rows // 2, 16), jnp.float32)
    weights = [np.asarray(p.kernel[...], np.float64) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    gate, up = np.asarray(x, np.float64) @ weights[0], np.asarray(x, np.float64) @ weights[1]
    expected = (gate / (1 + np.exp(-gate)) * up) @ weights[2]
    np.testing.assert_allclose(np.asarray(mlp(x)), expected, rtol=1e-5, atol=1e-5)

    loss = lambda x: jnp.sum(jnp.sin(mlp(x)))
    barriers = str(jax.make_jaxpr(loss)(x)).count("optimization_barrier")
    assert barriers == (1 if rows >= layers.SEPARATE_GEMM_MIN_ROWS else 0)
    grad = jax.grad(loss)(x)
    monkeypatch.setattr(layers, "SEPARATE_GEMM_OPERANDS", False)
    merged_loss = lambda x: jnp.sum(jnp.sin(mlp(x)))  # a new function: jax caches traces per function
    assert "optimization_barrier" not in str(jax.make_jaxpr(merged_loss)(x))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(merged_loss)(x)), rtol=1e-6, atol=1e-6)
