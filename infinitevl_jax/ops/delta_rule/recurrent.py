"""Token-serial gated delta rule: a ``lax.scan`` over time (also the single-token decode step).

Per head, with state ``S`` of shape ``[K, V]`` (float32) and, for every token t:

    S  <- 0                      if reset_t   (token t starts a new packed segment)
    S  <- exp(g_t) * S
    u   = beta_t * (v_t - S^T k_t)
    S  <- S + k_t u^T
    o_t = S^T (scale * q_t)

The two state-vector products are float32 multiply + sum rather than dots, so they are exact
float32 on every backend whatever its default matmul precision.

Memory under reverse-mode autodiff is one state per token (``T * K * V`` floats per head): use
this impl for decoding and short sequences, and ``chunked`` for training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def recurrent_gated_delta_rule(q, k, v, g, beta, scale, initial_state, reset, matmul_dtype=None):
    """Sequential gated delta rule.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (any float dtype; promoted to float32).
      g: ``[B, T, H]`` float32 log-decay (<= 0); beta: ``[B, T, H]`` float32.
      scale: python float multiplying q.
      initial_state: ``[B, H, K, V]`` float32.
      reset: ``[B, T]`` bool, True where a token starts from a zero state.
      matmul_dtype: ignored; the token recurrence is float32 throughout.

    Returns:
      o ``[B, T, H, V]`` float32 and the final state ``[B, H, K, V]`` float32.
    """

    def step(state, xs):
        q_t, k_t, v_t, g_t, b_t, r_t = xs  # [B,H,K] [B,H,K] [B,H,V] [B,H] [B,H] [B]
        state = jnp.where(r_t[:, None, None, None], 0.0, state)
        state = state * jnp.exp(g_t)[..., None, None]
        prediction = jnp.sum(state * k_t[..., :, None], axis=-2)  # S^T k
        update = b_t[..., None] * (v_t - prediction)
        state = state + k_t[..., :, None] * update[..., None, :]
        o_t = jnp.sum(state * (q_t * scale)[..., :, None], axis=-2)  # S^T (scale q)
        return state, o_t

    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, reset)]
    final_state, o = jax.lax.scan(step, initial_state, time_major)
    return jnp.moveaxis(o, 0, 1), final_state
