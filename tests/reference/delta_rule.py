"""Float64 NumPy reference for the gated delta rule (the judge for every JAX impl).

Written straight from the recurrence, one token at a time, with no JAX and no cleverness.
"""

from __future__ import annotations

import numpy as np


def gated_delta_rule_ref(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None):
    """Token-by-token gated delta rule in float64.

    Shapes:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; g (log-decay, <= 0), beta: ``[B, T, H]``;
      initial_state: optional ``[B, H, K, V]`` (zeros when omitted);
      segment_ids: optional ``[B, T]`` integers.

    Math, per batch row b and head h, with state ``S`` in ``R^{K x V}`` starting at
    ``initial_state[b, h]`` (or 0), for t = 0 .. T-1:

        if t > 0 and segment_ids[b, t] != segment_ids[b, t-1]:  S <- 0
        S   <- exp(g_t) * S
        u    = beta_t * (v_t - S^T k_t)        (a V-vector: the delta-rule error)
        S   <- S + k_t u^T
        o_t  = S^T (scale * q_t)               (a V-vector)

    ``scale`` defaults to ``K ** -0.5``. The initial state therefore only reaches the first
    segment of each row.

    Returns:
      ``(o, final_state)`` as float64 arrays: o ``[B, T, H, V]``, final_state ``[B, H, K, V]``
      (the state after the last token).
    """
    q, k, v, g, beta = (np.asarray(x, dtype=np.float64) for x in (q, k, v, g, beta))
    batch, seq_len, heads, d_k = q.shape
    d_v = v.shape[-1]
    if scale is None:
        scale = d_k ** -0.5
    if initial_state is None:
        initial_state = np.zeros((batch, heads, d_k, d_v))
    initial_state = np.asarray(initial_state, dtype=np.float64)

    o = np.zeros((batch, seq_len, heads, d_v))
    final_state = np.zeros((batch, heads, d_k, d_v))
    for b in range(batch):
        for h in range(heads):
            state = initial_state[b, h].copy()
            for t in range(seq_len):
                if segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    state = np.zeros((d_k, d_v))
                state = np.exp(g[b, t, h]) * state
                u = beta[b, t, h] * (v[b, t, h] - state.T @ k[b, t, h])
                state = state + np.outer(k[b, t, h], u)
                o[b, t, h] = state.T @ (scale * q[b, t, h])
            final_state[b, h] = state
    return o, final_state
