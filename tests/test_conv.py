"""Tests for ``infinitevl_jax.ops.conv`` (depthwise causal short conv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinitevl_jax.ops.conv import causal_conv1d, init_conv_cache

B, C, W = 2, 5, 4
conv = jax.jit(causal_conv1d)  # one compile per shape instead of one per eager op (keeps the suite fast)


def _random(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def reference_conv(x, weight, cache=None, segment_ids=None):
    """float64 loops: y[b,t,c] = sum_i w[i,c] * x[b, t-(W-1)+i, c], cache for negative times."""
    batch, seq_len, channels = x.shape
    width = weight.shape[0]
    history = np.zeros((batch, width - 1, channels)) if cache is None else np.asarray(cache, np.float64)
    y = np.zeros((batch, seq_len, channels))
    for b in range(batch):
        for t in range(seq_len):
            for i in range(width):
                src = t - (width - 1) + i
                if segment_ids is not None:
                    src_segment = segment_ids[b, max(src, 0)]
                    if src_segment != segment_ids[b, t]:
                        continue
                row = x[b, src] if src >= 0 else history[b, width - 1 + src]
                for c in range(channels):
                    y[b, t, c] += float(weight[i, c]) * float(row[c])
    return y


def test_matches_float64_reference():
    rng = np.random.default_rng(0)
    x, weight, cache = _random(rng, B, 9, C), _random(rng, W, C), _random(rng, B, W - 1, C)
    for c in (None, cache):
        y, _ = conv(jnp.asarray(x), jnp.asarray(weight), cache=None if c is None else jnp.asarray(c))
        np.testing.assert_allclose(np.asarray(y), reference_conv(x, weight, c), rtol=1e-5, atol=1e-5)


def test_matches_torch_conv1d():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x, weight = _random(rng, B, 17, C), _random(rng, W, C)
    torch_weight = torch.from_numpy(weight.T.copy())[:, None, :]  # [C, 1, W]: torch_w[c, 0, i] = weight[i, c]
    torch_x = torch.nn.functional.pad(torch.from_numpy(x).transpose(1, 2), (W - 1, 0))  # [B, C, W-1+T]
    expected = torch.nn.functional.conv1d(torch_x, torch_weight, groups=C).transpose(1, 2).numpy()
    y, _ = conv(jnp.asarray(x), jnp.asarray(weight))
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


def test_pieces_with_cache_equal_one_call():
    rng = np.random.default_rng(2)
    pieces = (1, 3, 1, 7, 2, 5)
    x, weight = jnp.asarray(_random(rng, B, sum(pieces), C)), jnp.asarray(_random(rng, W, C))
    y_full, cache_full = conv(x, weight)

    cache, outputs, start = init_conv_cache(B, W, C, x.dtype), [], 0
    for size in pieces:
        y, cache = conv(x[:, start:start + size], weight, cache=cache)
        assert cache.shape == (B, W - 1, C)
        outputs.append(y)
        start += size
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outputs, axis=1)), np.asarray(y_full), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cache), np.asarray(cache_full))
    np.testing.assert_array_equal(np.asarray(cache_full), np.asarray(x[:, -(W - 1):]))


def test_single_token_decode():
    rng = np.random.default_rng(3)
    cache, x, weight = _random(rng, B, W - 1, C), _random(rng, B, 1, C), _random(rng, W, C)
    y, new_cache = conv(jnp.asarray(x), jnp.asarray(weight), cache=jnp.asarray(cache))
    window = np.concatenate([cache, x], axis=1)  # [B, W, C], oldest first
    np.testing.assert_allclose(np.asarray(y)[:, 0], np.einsum("bic,ic->bc", window, weight), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_cache), window[:, 1:])


def test_bfloat16_dtypes():
    rng = np.random.default_rng(4)
    x = jnp.asarray(_random(rng, B, 6, C), jnp.bfloat16)
    weight = jnp.asarray(_random(rng, W, C), jnp.bfloat16)
    cache = jnp.asarray(_random(rng, B, W - 1, C))  # float32 cache is rounded to x's dtype
    y, new_cache = conv(x, weight, cache=cache)
    assert y.dtype == jnp.bfloat16 and new_cache.dtype == jnp.bfloat16
    expected = reference_conv(np.asarray(x, np.float32), np.asarray(weight, np.float32),
                              np.asarray(cache.astype(jnp.bfloat16), np.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=1e-2, atol=1e-2)


def test_segment_ids_do_not_leak():
    rng = np.random.default_rng(5)
    lengths = ((2, 6, 1, 3), (5, 7))
    seq_len = sum(lengths[0])
    x, weight = _random(rng, B, seq_len, C), _random(rng, W, C)
    segment_ids = np.stack([np.repeat(np.arange(len(ls)), ls) for ls in lengths]).astype(np.int32)
    y, _ = conv(jnp.asarray(x), jnp.asarray(weight), segment_ids=jnp.asarray(segment_ids))

    for b, segment_lengths in enumerate(lengths):
        start = 0
        for size in segment_lengths:
            alone, _ = conv(jnp.asarray(x[b:b + 1, start:start + size]), jnp.asarray(weight))
            np.testing.assert_allclose(np.asarray(y)[b, start:start + size], np.asarray(alone)[0], atol=1e-6)
            start += size
    np.testing.assert_allclose(np.asarray(y), reference_conv(x, weight, segment_ids=segment_ids), atol=1e-5)


def test_segment_ids_with_cache_treat_cache_as_first_segment():
    rng = np.random.default_rng(6)
    x, weight, cache = _random(rng, 1, 6, C), _random(rng, W, C), _random(rng, 1, W - 1, C)
    segment_ids = np.array([[3, 3, 3, 4, 4, 4]], np.int32)
    y, _ = conv(jnp.asarray(x), jnp.asarray(weight), cache=jnp.asarray(cache),
                         segment_ids=jnp.asarray(segment_ids))
    first, _ = conv(jnp.asarray(x[:, :3]), jnp.asarray(weight), cache=jnp.asarray(cache))
    second, _ = conv(jnp.asarray(x[:, 3:]), jnp.asarray(weight))
    np.testing.assert_allclose(np.asarray(y), np.concatenate([first, second], axis=1), atol=1e-6)


@pytest.mark.parametrize(
    "x_shape, w_shape, cache_shape, seg_shape, match",
    [
        ((B, 6), (W, C), None, None, "x must be"),
        ((B, 6, C), (W, C + 1), None, None, "weight has"),
        ((B, 6, C), (C,), None, None, "weight must be"),
        ((B, 6, C), (W, C), (B, W, C), None, "cache must be"),
        ((B, 6, C), (W, C), (B + 1, W - 1, C), None, "cache must be"),
        ((B, 6, C), (W, C), None, (B, 5), "segment_ids must be"),
    ],
)
def test_bad_shapes_raise(x_shape, w_shape, cache_shape, seg_shape, match):
    cache = None if cache_shape is None else jnp.zeros(cache_shape)
    segment_ids = None if seg_shape is None else jnp.zeros(seg_shape, jnp.int32)
    with pytest.raises(ValueError, match=match):
        causal_conv1d(jnp.zeros(x_shape), jnp.zeros(w_shape), cache=cache, segment_ids=segment_ids)


def test_float_segment_ids_raise():
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        causal_conv1d(jnp.zeros((B, 3, C)), jnp.zeros((W, C)), segment_ids=jnp.zeros((B, 3)))
