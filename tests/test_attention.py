"""Causal / sliding-window attention against the float64 dense reference."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp

from infinitevl_jax.ops.attention import CONCAT_PARTS_MIN_QUERIES, attention, masked_attention, masked_impl, visibility
from infinitevl_jax.models.sliding_attention import slot_token_index
from tests.reference.attention import attention_ref

B, T, HQ, HKV, D = 2, 150, 4, 2, 16


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, HQ, D)).astype(np.float32)
    k = rng.normal(size=(B, T, HKV, D)).astype(np.float32)
    v = rng.normal(size=(B, T, HKV, D)).astype(np.float32)
    segments = np.stack([np.repeat([0, 1, 2], [40, 70, 40]), np.repeat([5, 6], [100, 50])]).astype(np.int32)
    return q, k, v, segments


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
@pytest.mark.parametrize("window", [None, 1, 16, 37, 1000])
def test_matches_dense_reference(qkv, impl, window):
    q, k, v, _ = qkv
    out = attention(q, k, v, window=window, impl=impl, block_size=32)
    np.testing.assert_allclose(out, attention_ref(q, k, v, window=window), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_segments_never_cross(qkv, impl):
    q, k, v, segments = qkv
    out = attention(q, k, v, window=37, segment_ids=segments, impl=impl, block_size=32)
    np.testing.assert_allclose(out, attention_ref(q, k, v, window=37, segment_ids=segments), atol=2e-5, rtol=2e-5)


def test_blockwise_long_sequence_window_semantics():
    """T = 4 W: a window of W keys includes the query itself (FA2's (W-1, W-1) causal window)."""
    rng = np.random.default_rng(1)
    t, w = 256, 64
    q, k, v = (rng.normal(size=(1, t, 2, 8)).astype(np.float32) for _ in range(3))
    out = attention(q, k, v, window=w, impl="blockwise", block_size=48)
    np.testing.assert_allclose(out, attention_ref(q, k, v, window=w), atol=2e-5, rtol=2e-5)
    # Changing a key exactly W tokens back must not change the query's output; W - 1 back must.
    k2 = k.copy()
    k2[0, 100 - w] += 10.0
    same = attention(q, k2, v, window=w, impl="blockwise", block_size=48)
    np.testing.assert_array_equal(np.asarray(same)[0, 100], np.asarray(out)[0, 100])
    k2[0, 100 - w + 1] += 10.0
    moved = attention(q, k2, v, window=w, impl="blockwise", block_size=48)
    assert np.abs(np.asarray(moved)[0, 100] - np.asarray(out)[0, 100]).max() > 1e-3


def test_blockwise_gradients_match_dense(qkv):
    q, k, v, segments = qkv
    loss = lambda impl: lambda q, k, v: jnp.sum(
        attention(q, k, v, window=20, segment_ids=segments, impl=impl, block_size=32) ** 2)
    dense = jax.grad(loss("dense"), argnums=(0, 1, 2))(q, k, v)
    block = jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(dense, block):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


def test_masked_impl_takes_cudnn_or_pallas_only_when_asked_for_a_chunk():
    chunk, step = jnp.zeros((1, CONCAT_PARTS_MIN_QUERIES, 2, 8)), jnp.zeros((1, 1, 2, 8))
    assert [masked_impl(impl, chunk) for impl in ("auto", "dense", "blockwise", "cudnn", "pallas")] == \
        ["xla"] * 3 + ["cudnn", "pallas"]
    assert masked_impl("cudnn", step) == masked_impl("pallas", step) == "xla"
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        masked_impl("flash", chunk)
    with pytest.raises(ValueError, match="must be 'xla', 'cudnn' or 'pallas'"):
        masked_attention(chunk, chunk, chunk, jnp.ones((1, 16, 16), bool), impl="dense")


def test_masked_attention_with_ring_indices():
    """The cache path: keys in ring slots with derived token indices plus the new tokens."""
    rng = np.random.default_rng(2)
    capacity, index, t, w = 7, 12, 3, 8
    slots = np.asarray(slot_token_index(index, capacity))
    assert sorted(slots) == list(range(index - capacity, index))
    k_index = np.concatenate([slots, index + np.arange(t)])
    q_index = index + np.arange(t)
    q = rng.normal(size=(1, t, 4, 8)).astype(np.float32)
    k, v = (rng.normal(size=(1, capacity + t, 2, 8)).astype(np.float32) for _ in range(2))
    out = masked_attention(q, k, v, visibility(jnp.asarray(q_index), jnp.asarray(k_index), w)[None])
    ref = attention_ref(q, k, v, window=w, q_index=q_index, k_index=k_index)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def _ring_rows(seed, index, capacity, t, window, d):
    """Two rows of a cached call: q ``[2, t, 4, d]``, k and v ``[2, capacity + t, 2, d]`` (ring
    slots at stream ``index[b]``, then the new tokens) and per row the visibility mask (empty
    slots invisible) and the float64 reference."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, t, 4, d)).astype(np.float32)
    k, v = (rng.normal(size=(2, capacity + t, 2, d)).astype(np.float32) for _ in range(2))
    masks, refs = [], []
    for b in range(2):
        k_index = np.concatenate([np.asarray(slot_token_index(index[b], capacity)), index[b] + np.arange(t)])
        q_index = index[b] + np.arange(t)
        masks.append(np.array(visibility(jnp.asarray(q_index), jnp.asarray(k_index), window, k_index >= 0)))
        refs.append(attention_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], window=window, q_index=q_index,
                                  k_index=k_index, k_valid=k_index >= 0))
    return q, k, v, np.stack(masks), np.concatenate(refs)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("t", [3, 20], ids=["parts_apart", "parts_joined"])
def test_masked_attention_over_cache_parts(t, impl):
    """Cache and new tokens as separate parts, per row a full ring and one with empty slots, one
    query that sees nothing (zeros): below and above CONCAT_PARTS_MIN_QUERIES (16) queries; the
    XLA form and the Pallas flash kernel (interpreted; head dim 8 padded to 16)."""
    capacity = 9
    q, k, v, mask, ref = _ring_rows(3, np.array([15, 4]), capacity, t, window=6, d=8)
    mask[:, 1] = False
    ref[:, 1] = 0.0
    out = masked_attention(q, (k[:, :capacity], k[:, capacity:]), (v[:, :capacity], v[:, capacity:]), mask,
                           impl=impl)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    assert not np.any(np.asarray(out)[:, 1])


def test_empty_slots_are_invisible():
    slots = np.asarray(slot_token_index(2, 5))
    assert (slots < 0).sum() == 3 and sorted(slots[slots >= 0]) == [0, 1]


def test_bad_inputs_name_the_problem(qkv):
    q, k, v, segments = qkv
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="segment_ids"):
        attention(q, k, v, segment_ids=segments[:, :10])
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, impl="flash")


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 10_000), capacity=st.integers(1, 300))
def test_ring_slots_hold_exactly_the_newest_tokens(index, capacity):
    """After `index` tokens, the filled slots hold token indices max(0, index - capacity) .. index - 1,
    token n in slot n % capacity, and the rest are marked empty (< 0)."""
    slots = np.asarray(slot_token_index(index, capacity))
    filled = slots[slots >= 0]
    assert sorted(filled) == list(range(max(0, index - capacity), index))
    assert all(slots[n % capacity] == n for n in filled)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 2e-2)])
def test_masked_flash_kernel_over_several_blocks_matches_reference(dtype, tol):
    """The Pallas flash kernel (interpreted) where its online softmax spans several key blocks
    and its grid several query blocks: 70 queries (2 blocks of 64) over a 150-slot ring plus
    themselves (220 keys, 4 blocks), GQA 4:2, head dim 24 (padded to 32), window 100, empty ring
    slots in one row; float64 reference. bf16: the inputs and p rounded to bf16 (errors ~4e-3
    of the largest output)."""
    q, k, v, mask, ref = _ring_rows(7, np.array([400, 60]), capacity=150, t=70, window=100, d=24)
    cast = lambda x: jnp.asarray(x, dtype)
    out = masked_attention(cast(q), cast(k), cast(v), mask, impl="pallas")
    assert out.dtype == jnp.dtype(dtype) and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=tol * np.abs(ref).max(), rtol=0)


def test_masked_flash_kernel_lowers_for_cuda_at_a_streamed_frame(monkeypatch):
    """A 448x448 frame's call in InfiniteVL-4B's SWA layers: 256 queries, 16 query and 2 KV heads
    of 128, over 8,191 ring slots plus the frame (8,447 keys, padded to 8,448), bf16: one Triton
    kernel (lowered for CUDA on any host; PTX is compiled on the GPU)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    q, k = shape(1, 256, 16, 128), shape(1, 8447, 2, 128)
    fn = lambda q, k, v, mask: masked_attention(q, k, v, mask, impl="pallas")
    text = jax.jit(fn).trace(q, k, k, shape(1, 256, 8447, dtype=jnp.bool_)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and 'name = "masked_flash_attention"' in text
