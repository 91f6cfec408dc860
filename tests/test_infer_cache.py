"""Cache features for inference: chunk attention after a cache, left/right padding in cache mode."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.config import load_config
from infinitevl_jax.models import Decoder, DecoderConfig
from infinitevl_jax.models import sliding_attention
from infinitevl_jax.ops.attention import chunk_attention
from infinitevl_jax.ops.conv import causal_conv1d
from tests.reference.attention import attention_ref


def tiny_config(**changes):
    return dataclasses.replace(DecoderConfig.from_dict(load_config("tiny").model), **changes)


def chunk_attention_ref(q, k, v, past_k, past_v, first_visible, window):
    """Float64, row by row: queries at key positions P + t over concat(past, new) keys."""
    past = past_k.shape[1]
    keys, values = np.concatenate([past_k, k], 1), np.concatenate([past_v, v], 1)
    positions = np.arange(keys.shape[1])
    return np.concatenate([
        attention_ref(q[b:b + 1], keys[b:b + 1], values[b:b + 1], window=window, q_index=past + np.arange(q.shape[1]),
                      k_index=positions, k_valid=positions >= first_visible[b])
        for b in range(q.shape[0])])


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("first_visible", [(11, 11), (0, -3), (4, 13), (2, 11)], ids=["fresh", "full", "mixed", "pads"])
@pytest.mark.parametrize("impl", ["auto", "blockwise"])
def test_chunk_attention_matches_float64_reference(window, first_visible, impl):
    """fresh: no past key visible (self-attention branch); full: every past key visible (prefix
    branch when windowed); mixed/pads: a row with empty slots, and a row whose first new tokens
    are left padding (blockwise branch). Blocks of 4 queries x 3 keys cross every boundary."""
    rng = np.random.default_rng(0)
    past, t = 11, 9
    q = rng.normal(size=(2, t, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(2, t, 2, 8)).astype(np.float32) for _ in range(2))
    past_k, past_v = (rng.normal(size=(2, past, 2, 8)).astype(np.float32) for _ in range(2))
    first = np.asarray(first_visible, np.int32)
    out = chunk_attention(q, k, v, past_k, past_v, first_visible=first, window=window, impl=impl, block_q=4, block_k=3)
    ref = chunk_attention_ref(q, k, v, past_k, past_v, first, window)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    if first[1] > past:  # row 1's first new tokens are padding: they see nothing and return zeros
        np.testing.assert_array_equal(np.asarray(out)[1, :first[1] - past], 0.0)


def test_chunk_attention_rejects_bad_inputs():
    q = jnp.zeros((1, 4, 2, 8))
    k = jnp.zeros((1, 4, 1, 8))
    with pytest.raises(ValueError, match="past_k and past_v"):
        chunk_attention(q, k, k, jnp.zeros((1, 5, 2, 8)), jnp.zeros((1, 5, 2, 8)), first_visible=0)
    with pytest.raises(ValueError, match="impl"):
        chunk_attention(q, k, k, jnp.zeros((1, 5, 1, 8)), jnp.zeros((1, 5, 1, 8)), first_visible=0, impl="dense")


def test_conv_cache_ends_at_valid_len():
    """Right padding never enters the conv cache: it equals the cache of the unpadded call."""
    rng = np.random.default_rng(1)
    x, w, cache = rng.normal(size=(2, 7, 5)), rng.normal(size=(4, 5)), rng.normal(size=(2, 3, 5))
    for valid in (0, 2, 7):
        y, new = causal_conv1d(jnp.asarray(x), jnp.asarray(w), cache=jnp.asarray(cache), valid_len=valid)
        expected = np.concatenate([cache, x[:, :valid]], axis=1)[:, -3:]
        np.testing.assert_allclose(new, expected, rtol=1e-6)
        if valid:
            y_ref, _ = causal_conv1d(jnp.asarray(x[:, :valid]), jnp.asarray(w), cache=jnp.asarray(cache))
            np.testing.assert_allclose(np.asarray(y)[:, :valid], y_ref, rtol=1e-6)


@nnx.jit
def cached_call(model, ids, cache, positions=None, valid_len=None):
    return model(ids, cache=cache, position_ids=positions, valid_len=valid_len)


@nnx.jit
def full_forward(model, ids):
    return model(ids)[0]


MODELS = {"hybrid": tiny_config(), "teacher": tiny_config(layer_types=("full_attention",) * 2),
          "hybrid_blockwise": tiny_config(attention_impl="blockwise"),
          "hybrid_pallas": tiny_config(attention_impl="pallas")}  # cached chunks of >= 16 queries: Pallas flash


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return Decoder(MODELS[request.param], rngs=nnx.Rngs(3))


def test_right_padding_changes_nothing(model):
    """A call with 5 real tokens right-padded to 12 leaves the same cache and logits as the
    5-token call (GDN: g = beta = 0 at pads, conv tails cut at valid_len; SWA: pads not written)."""
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 512, (2, 30)))
    cache = cached_call(model, ids[:, :20], model.init_cache(2, 40))[1]
    plain_logits, plain = cached_call(model, ids[:, 20:25], cache)
    padded_ids = jnp.concatenate([ids[:, 20:25], jnp.full((2, 7), 9)], axis=1)
    padded_logits, padded = cached_call(model, padded_ids, cache, valid_len=jnp.int32(5))  # traced
    assert int(padded.index) == 25
    np.testing.assert_allclose(padded_logits[:, :5], plain_logits, atol=2e-5 * np.abs(plain_logits).max())
    for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_equal_rows_alone(model):
    """Rows of 23 and 9 real tokens, left-padded to 23 and fed in pieces of 8 (the last right-padded):
    each row's logits equal its own unpadded full forward (pads invisible, GDN state untouched)."""
    rng = np.random.default_rng(4)
    long, short = rng.integers(0, 512, 23), rng.integers(0, 512, 9)
    ids = jnp.asarray(np.stack([long, np.concatenate([np.full(14, 7), short])]))
    positions = jnp.asarray(np.stack([np.arange(23), np.concatenate([np.zeros(14, int), np.arange(9)])]))
    cache = model.init_cache(2, 23, left_padding=[0, 14])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 24 - x.shape[1])))
    ids, positions = pad(ids), pad(positions)
    outs = []
    for start in (0, 8, 16):
        logits, cache = cached_call(model, ids[:, start:start + 8], cache, positions[:, start:start + 8],
                                    jnp.int32(min(8, 23 - start)))
        outs.append(np.asarray(logits))
    out = np.concatenate(outs, axis=1)[:, :23]
    assert int(cache.index) == 23
    for row, alone in ((0, long), (1, short)):
        ref = np.asarray(full_forward(model, jnp.asarray(alone[None])))[0]
        np.testing.assert_allclose(out[row, -len(alone):], ref, atol=3e-5 * np.abs(ref).max(), rtol=0)


def test_left_padding_keeps_gdn_state_exactly_zero():
    cfg = tiny_config()
    model = Decoder(cfg, rngs=nnx.Rngs(5))
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 512, (2, 8)))
    _, cache = cached_call(model, ids, model.init_cache(2, left_padding=[8, 3]))
    for layer_type, layer_cache in zip(cfg.block_pattern, cache.layers):
        if layer_type == "linear_attention":
            for name in ("conv_q", "conv_k", "conv_v", "state"):
                row0, row1 = np.asarray(getattr(layer_cache, name))[:, 0], np.asarray(getattr(layer_cache, name))[:, 1]
                np.testing.assert_array_equal(row0, 0.0)  # all 8 tokens are pads
                assert np.abs(row1).max() > 0  # 5 real tokens


def test_long_chunk_paths_through_the_decoder(monkeypatch):
    """Chunks too long for the dense cache path take chunk_attention's run-time branches
    (fresh, every past key visible, some visible) and still equal the full forward."""
    monkeypatch.setattr(sliding_attention, "DENSE_CACHED_MAX_ELEMENTS", 0)
    model = Decoder(tiny_config(), rngs=nnx.Rngs(7))
    ids = jnp.asarray(np.random.default_rng(8).integers(0, 512, (1, 45)))
    ref = np.asarray(full_forward(model, ids))
    step = nnx.jit(lambda m, x, c: m(x, cache=c))  # traced here, with the patched threshold
    cache, outs = model.init_cache(1), []
    for start, stop in ((0, 9), (9, 16), (16, 45)):  # fresh; 9 < window - 1 keys cached; ring full
        logits, cache = step(model, ids[:, start:stop], cache)
        outs.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), ref, atol=3e-5 * np.abs(ref).max(), rtol=0)


def test_padding_arguments_are_checked():
    model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="left_padding"):
        model.init_cache(2, left_padding=[1, 2, 3])
    with pytest.raises(ValueError, match="valid_len"):
        model(ids, cache=model.init_cache(2), valid_len=5)
    with pytest.raises(ValueError, match="valid_len"):
        model(ids, valid_len=2)
    with pytest.raises(ValueError, match="rows"):
        model(ids, cache=model.init_cache(3))
