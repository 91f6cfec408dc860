"""The Pallas walk kernels (interpret mode on CPU) with several V-blocks and padded head dims."""

import jax
import jax.numpy as jnp
import numpy as np

from infinitevl_jax.ops.delta_rule import gated_delta_rule
from infinitevl_jax.ops.delta_rule.pallas_gpu import MAX_BLOCK_V
from tests.reference.delta_rule import gated_delta_rule_ref

# d_k 24 pads to 32; d_v 80 pads to 128 = 4 V-blocks of 32: the backward's partial sums over
# V-blocks and the padding are both exercised.
B, T, H, K, V = 2, 130, 2, 24, 80


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (unit(rng.normal(size=(B, T, H, K))) for _ in range(2))
    v = rng.normal(size=(B, T, H, V))
    g = rng.uniform(-0.5, -0.01, size=(B, T, H))
    g[:, 70] = -20.0
    beta = rng.uniform(0.05, 0.95, size=(B, T, H))
    s0 = rng.normal(size=(B, H, K, V))
    ids = np.zeros((B, T), np.int32)
    ids[0, 40:] = 1
    ids[1, 64:] = 1
    return [x.astype(np.float32) for x in (q, k, v, g, beta, s0)], ids


def test_several_v_blocks_and_padded_dims_match_reference():
    assert 128 // MAX_BLOCK_V > 1
    (q, k, v, g, beta, s0), ids = _inputs()
    o, state = jax.jit(lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], segment_ids=a[6], impl="pallas"))(
        q, k, v, g, beta, s0, ids)
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    np.testing.assert_allclose(o, ref_o, atol=1e-4 * np.abs(ref_o).max(), rtol=0)
    np.testing.assert_allclose(state, ref_state, atol=1e-4 * np.abs(ref_state).max(), rtol=0)


def test_gradients_with_several_v_blocks_match_finite_differences():
    (q, k, v, g, beta, s0), ids = _inputs(seed=1)
    rng = np.random.default_rng(2)
    w_o, w_s = rng.normal(size=(B, T, H, V)), rng.normal(size=(B, H, K, V))
    args = (q, k, v, g, beta, s0)
    directions = [rng.normal(size=x.shape) * (0.1 if i == 3 else 1.0) for i, x in enumerate(args)]

    def loss(*a):
        o, state = gated_delta_rule(*a[:5], initial_state=a[5], segment_ids=ids, impl="pallas")
        return jnp.sum(o * w_o) + jnp.sum(state * w_s)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)
    analytic = sum(float(np.sum(np.asarray(gr, np.float64) * d)) for gr, d in zip(grads, directions))

    def ref_loss(eps):
        shifted = [np.asarray(x, np.float64) + eps * d for x, d in zip(args, directions)]
        o, state = gated_delta_rule_ref(*shifted[:5], initial_state=shifted[5], segment_ids=ids)
        return float(np.sum(o * w_o) + np.sum(state * w_s))

    numeric = (ref_loss(1e-5) - ref_loss(-1e-5)) / 2e-5
    assert abs(analytic - numeric) <= 1e-3 * abs(numeric)
