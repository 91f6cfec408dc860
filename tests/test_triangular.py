"""unit_lower_inverse against NumPy's float64 inverse, values and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinitevl_jax.ops.delta_rule.triangular import unit_lower_inverse


@pytest.mark.parametrize("size", [1, 2, 8, 16, 64])
@pytest.mark.parametrize("scale", [0.1, 1.0])
def test_matches_float64_inverse(size, scale):
    rng = np.random.default_rng(size)
    a = np.tril(rng.uniform(-scale, scale, size=(3, 2, size, size)), -1).astype(np.float32)
    ref = np.linalg.inv(np.eye(size) + a.astype(np.float64))
    out = np.asarray(unit_lower_inverse(a))
    assert np.all(np.triu(out, 1) == 0)
    np.testing.assert_allclose(out, ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_delta_rule_like_matrix_with_correlated_keys():
    """A = strict_lower(beta k_i.k_j) with nearly parallel unit keys and beta ~ 1, no decay:
    entries near 1, where power-series inverses blow up."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    k = base + 0.05 * rng.normal(size=(64, 16))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    a = np.tril(0.99 * k @ k.T, -1)
    ref = np.linalg.inv(np.eye(64) + a)
    out = np.asarray(unit_lower_inverse(a.astype(np.float32)))
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("size", [8, 64])
def test_gradient_matches_float64_finite_differences(size):
    """d/dA of sum(R * (I + A)^-1) over the strictly lower entries, against central differences
    of NumPy's float64 inverse; entries on and above the diagonal get zero."""
    rng = np.random.default_rng(size + 1)
    a = np.tril(rng.uniform(-0.5, 0.5, size=(2, size, size)), -1)
    r = rng.normal(size=a.shape)
    grad = np.asarray(jax.grad(lambda x: jnp.sum(jnp.asarray(r, jnp.float32) * unit_lower_inverse(x)))(
        a.astype(np.float32)))
    loss = lambda x: np.sum(r * np.linalg.inv(np.eye(size) + x))
    eps = 1e-6
    expected = np.zeros_like(a)
    for b, i, j in zip(*np.nonzero(np.tril(np.ones_like(a), -1))):
        step = np.zeros_like(a)
        step[b, i, j] = eps
        expected[b, i, j] = (loss(a + step) - loss(a - step)) / (2 * eps)
    assert np.all(np.triu(grad) == 0)
    np.testing.assert_allclose(grad, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        unit_lower_inverse(np.zeros((48, 48), np.float32))
