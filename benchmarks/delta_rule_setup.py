"""Inputs and jitted calls shared by the delta-rule benchmarks (CPU, GPU, GPU tuning)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from infinitevl_jax.ops.delta_rule import gated_delta_rule


def make_inputs(batch, seq_len, heads, d_k, d_v, seed=0):
    """float32 NumPy q, k (unit-norm, as the model feeds them), v, g = log U(0.9, 1), beta = U(0, 1)."""
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.normal(size=(batch, seq_len, heads, d_k)))
    k = unit(rng.normal(size=(batch, seq_len, heads, d_k)))
    v = rng.normal(size=(batch, seq_len, heads, d_v))
    g = np.log(rng.uniform(0.9, 1.0, size=(batch, seq_len, heads)))
    beta = rng.uniform(0.0, 1.0, size=(batch, seq_len, heads))
    return {name: x.astype(np.float32) for name, x in dict(q=q, k=k, v=v, g=g, beta=beta).items()}


def forward(impl):
    """jitted ``gated_delta_rule(q, k, v, g, beta)`` with a fixed impl."""
    return jax.jit(lambda *a: gated_delta_rule(*a, impl=impl))


def forward_backward(impl):
    """jitted gradients w.r.t. q, k, v, g, beta of ``sum(o^2) + sum(final_state)``."""
    def loss(*a):
        o, state = gated_delta_rule(*a, impl=impl)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(state)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
