"""Grouped local attention (Local-Swin) against the float64 brute force; banded vs dense."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from infinitevl_jax.ops import local_attention as la
from infinitevl_jax.ops.local_attention import local_attention, local_visibility
from tests.reference.local_attention import local_attention_ref, visible_ref

HQ, HKV, D = 4, 2, 8


def _row(rng, s, past, max_window):
    """Metadata of one row of S tokens laid out like the real use.

    Optional left padding (keys of segment -1), then segments of text runs and runs of windows
    (each a contiguous run of <= ``max_window`` tokens, group id = index of its first token),
    positions counting from 0 in each segment; the first segment opens with text covering the
    ``past`` cached keys; optional right padding (segment -1 keys; their queries get -3, a segment
    no key has). Text tokens get group -1 or -2 (any negative id means text).
    """
    pos, group, seg = np.zeros(s, np.int64), np.full(s, -1, np.int64), np.full(s, -1, np.int64)
    left = int(rng.integers(1, 4)) if past > 3 else 0
    right = int(rng.integers(0, 6))
    pos[:left] = rng.integers(0, 50, left)
    n, segment = left, 0
    while n < s - right:
        end = min(s - right, n + int(rng.integers(60, 180)))
        first = n
        text_run = past - left + int(rng.integers(2, 10)) if segment == 0 else int(rng.integers(0, 12))
        while n < end:
            run = min(end - n, text_run)
            group[n:n + run] = rng.choice([-1, -2])
            n += run
            for _ in range(int(rng.integers(1, 5))):  # a run of windows
                size = min(end - n, int(rng.integers(1, max_window + 1)))
                group[n:n + size] = n
                n += size
            text_run = int(rng.integers(0, 15))
        seg[first:n] = segment + 10 * rng.integers(0, 3)
        pos[first:n] = np.arange(n - first)
        segment += 1
    pos[s - right:] = np.arange(right)
    q_seg = seg[past:].copy()
    q_seg[q_seg == -1] = -3
    return dict(q_pos=pos[past:], k_pos=pos, q_group=group[past:], k_group=group, q_segment=q_seg, k_segment=seg)


def _case(seed, batch, t, past, max_window, text_window):
    rng = np.random.default_rng(seed)
    rows = [_row(rng, past + t, past, max_window) for _ in range(batch)]
    meta = {name: np.stack([r[name] for r in rows]).astype(np.int32) for name in rows[0]}
    q = rng.normal(size=(batch, t, HQ, D)).astype(np.float32)
    k, v = (rng.normal(size=(batch, past + t, HKV, D)).astype(np.float32) for _ in range(2))
    radius = max(max_window - 1, text_window - 1)
    return q, k, v, meta, radius


def _assert_local(meta, radius, text_window):
    """The generated metadata keeps the caller's locality promise."""
    mask = np.asarray(local_visibility(**{n: jnp.asarray(x) for n, x in meta.items()}, text_window=text_window))
    past = mask.shape[2] - mask.shape[1]
    _, i, j = np.nonzero(mask)
    assert np.abs(past + i - j).max() <= radius


# (seed, batch, T, P, max window W, text_window, block): T never a multiple of block
CASES = [
    (0, 2, 301, 0, 16, 24, 64),
    (1, 2, 250, 37, 20, 9, 48),
    (2, 1, 203, 12, 40, 5, 16),  # radius (39) > block
    (3, 1, 90, 5, 8, 12, 128),  # block > T: one block
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"seed{c[0]}-T{c[2]}-P{c[3]}")
def case(request):
    seed, batch, t, past, max_window, text_window, block = request.param
    q, k, v, meta, radius = _case(seed, batch, t, past, max_window, text_window)
    _assert_local(meta, radius, text_window)
    ref = local_attention_ref(q, k, v, **meta, text_window=text_window)
    return q, k, v, meta, radius, text_window, block, ref


@pytest.mark.parametrize("impl", ["dense", "banded"])
def test_matches_reference(case, impl):
    q, k, v, meta, radius, text_window, block, ref = case
    out = local_attention(q, k, v, **meta, text_window=text_window, radius=radius, impl=impl, block=block)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_auto_picks_banded_for_long_inputs(case, monkeypatch):
    q, k, v, meta, radius, text_window, block, ref = case
    monkeypatch.setattr(la, "DENSE_MAX_ELEMENTS", 0)
    out = local_attention(q, k, v, **meta, text_window=text_window, radius=radius, block=block)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_custom_scale():
    q, k, v, meta, radius = _case(4, 1, 70, 6, 6, 7)
    ref = local_attention_ref(q, k, v, **meta, text_window=7, scale=0.3)
    for impl in ("dense", "banded"):
        out = local_attention(q, k, v, **meta, text_window=7, radius=radius, impl=impl, block=32, scale=0.3)
        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_visibility_by_hand():
    """text x3, a window of 3 (group 3), text x2: self-attention (P = 0), one segment."""
    group = jnp.asarray([[-1, -1, -1, 3, 3, 3, -1, -1]], jnp.int32)
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    seg = jnp.zeros((1, 8), jnp.int32)
    mask = np.asarray(local_visibility(pos, pos, group, group, seg, seg, 2))[0].astype(int)
    expected = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],  # window tokens: the whole window, both ways, no text
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],  # text after the window sees window tokens causally
        [0, 0, 0, 0, 0, 0, 1, 1],
    ])
    np.testing.assert_array_equal(mask, expected)
    for i in range(8):
        for j in range(8):
            assert mask[i, j] == visible_ref(i, j, int(group[0, i]), int(group[0, j]), 0, 0, 2)
    k_seg = seg.at[0, 4].set(-1)  # a padding key is seen by no one
    mask = np.asarray(local_visibility(pos, pos, group, group, seg, k_seg, 2))[0]
    assert not mask[:, 4].any() and mask[3, 3] and mask[3, 5]


def test_gradients_banded_match_dense():
    q, k, v, meta, radius = _case(5, 2, 170, 9, 12, 10)
    rng = np.random.default_rng(6)
    weights = rng.normal(size=q.shape).astype(np.float32)

    def loss(impl):
        def f(q, k, v):
            out = local_attention(q, k, v, **meta, text_window=10, radius=radius, impl=impl, block=32)
            return jnp.sum(out * weights)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    dense, banded = loss("dense")(q, k, v), loss("banded")(q, k, v)
    for a, b in zip(dense, banded):
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=2e-4)
    assert np.abs(np.asarray(dense[1])).max() > 0


@pytest.mark.parametrize("impl", ["dense", "banded"])
def test_query_without_visible_key_is_zero_with_finite_gradients(impl):
    rng = np.random.default_rng(7)
    batch, past, t = 1, 3, 40
    q = rng.normal(size=(batch, t, HQ, D)).astype(np.float32)
    k, v = (rng.normal(size=(batch, past + t, HKV, D)).astype(np.float32) for _ in range(2))
    k_pos = np.arange(past + t, dtype=np.int32)[None]
    k_group = np.full((batch, past + t), -1, np.int32)
    k_segment = np.zeros((batch, past + t), np.int32)
    q_segment = k_segment[:, past:].copy()
    q_segment[0, 10:20] = 7  # no key in segment 7
    q_group = k_group[:, past:].copy()
    q_group[0, 30:33] = 99  # a window id no key carries
    meta = dict(q_pos=k_pos[:, past:], k_pos=k_pos, q_group=q_group, k_group=k_group, q_segment=q_segment,
                k_segment=k_segment)
    call = lambda q, k, v: local_attention(q, k, v, **meta, text_window=4, radius=3, impl=impl, block=16)
    out = np.asarray(call(q, k, v))
    assert np.all(out[0, 10:20] == 0) and np.all(out[0, 30:33] == 0)
    np.testing.assert_allclose(out, local_attention_ref(q, k, v, **meta, text_window=4), atol=2e-5, rtol=2e-5)
    grads = jax.grad(lambda q, k, v: jnp.sum(call(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
    assert np.all(np.asarray(grads[0])[0, 10:20] == 0)


def test_banded_reads_only_its_key_slice():
    """The locality promise is the caller's: "banded" block i reads only keys
    [P + i*block - radius, P + (i+1)*block + radius); "dense" applies the rule alone."""
    rng = np.random.default_rng(8)
    t = 64
    q, k, v = (rng.normal(size=(1, t, 2, D)).astype(np.float32) for _ in range(3))
    pos = np.arange(t, dtype=np.int32)[None]
    meta = dict(q_pos=pos, k_pos=pos, q_group=-np.ones_like(pos), k_group=-np.ones_like(pos),
                q_segment=np.zeros_like(pos), k_segment=np.zeros_like(pos))
    call = lambda k, impl: np.asarray(local_attention(q, k, v, **meta, text_window=40, radius=3, impl=impl, block=16))
    k2 = k.copy()
    k2[0, 20] += 10.0  # visible to queries 20..59 by the rule; outside the slice [29, 51) of block 2
    np.testing.assert_array_equal(call(k2, "banded")[0, 32:48], call(k, "banded")[0, 32:48])
    assert np.abs(call(k2, "dense")[0, 32:48] - call(k, "dense")[0, 32:48]).min() > 0
    assert np.abs(call(k2, "banded")[0, 20:24] - call(k, "banded")[0, 20:24]).min() > 0


def test_jit_with_traced_metadata():
    q, k, v, meta, radius = _case(9, 1, 120, 4, 10, 6)
    fn = jax.jit(lambda q, k, v, meta: local_attention(q, k, v, **meta, text_window=6, radius=radius,
                                                       impl="banded", block=32))
    out = fn(q, k, v, {n: jnp.asarray(x) for n, x in meta.items()})
    np.testing.assert_allclose(out, local_attention_ref(q, k, v, **meta, text_window=6), atol=2e-5, rtol=2e-5)


def test_bfloat16_smoke():
    q, k, v, meta, radius = _case(10, 1, 150, 7, 10, 12)
    ref = local_attention_ref(q, k, v, **meta, text_window=12)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    for impl in ("dense", "banded"):
        out = local_attention(qb, kb, vb, **meta, text_window=12, radius=radius, impl=impl, block=32)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2, rtol=5e-2)


def test_bad_inputs_name_the_problem():
    q, k, v, meta, radius = _case(11, 1, 20, 2, 4, 3)
    call = lambda q=q, k=k, v=v, **kw: local_attention(
        q, k, v, **{**meta, **{n: x for n, x in kw.items() if n in meta}}, text_window=kw.get("text_window", 3),
        radius=kw.get("radius", radius), impl=kw.get("impl", "auto"), block=kw.get("block", 8))
    with pytest.raises(ValueError, match="ranks"):
        call(q=q[0])
    with pytest.raises(ValueError, match="same shape"):
        call(v=v[:, :-1])
    with pytest.raises(ValueError, match="batch"):
        call(k=np.concatenate([k, k]), v=np.concatenate([v, v]))
    with pytest.raises(ValueError, match="head dim"):
        call(k=k[..., :4], v=v[..., :4])
    with pytest.raises(ValueError, match="multiple of KV heads"):
        call(q=q[:, :, :3])
    with pytest.raises(ValueError, match="S < T"):
        call(q=np.concatenate([q, q], axis=1), q_pos=meta["k_pos"][:, :1].repeat(40, 1))
    with pytest.raises(ValueError, match=r"q_group must be \[B, T\]"):
        call(q_group=meta["q_group"][:, :-1])
    with pytest.raises(ValueError, match=r"k_segment must be \[B, S\]"):
        call(k_segment=meta["q_segment"])
    with pytest.raises(ValueError, match="integers"):
        call(k_pos=meta["k_pos"].astype(np.float32))
    with pytest.raises(ValueError, match="text_window"):
        call(text_window=0)
    with pytest.raises(ValueError, match="radius"):
        call(radius=-1)
    with pytest.raises(ValueError, match="block"):
        call(block=0)
    with pytest.raises(ValueError, match="unknown local_attention impl"):
        call(impl="flash")
