"""Float64 NumPy reference for the Mamba2 (SSD) scan (the judge for every JAX impl).

Written straight from the recurrence, one token at a time (vectorised only over batch rows and
heads), with no JAX and no chunking.
"""

from __future__ import annotations

import numpy as np


def ssd_scan_ref(x, dt, A, B, C, *, initial_state=None, segment_ids=None, reverse=False):
    """Token-by-token SSD scan in float64.

    Shapes:
      x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, H, N]``;
      initial_state: optional ``[B, H, N, P]`` (zeros when omitted);
      segment_ids: optional ``[B, T]`` integers.

    Math, per batch row b and head h, with state ``S`` in ``R^{N x P}`` starting at
    ``initial_state[b, h]`` (or 0), for t = 0 .. T-1:

        if t > 0 and segment_ids[b, t] != segment_ids[b, t-1]:  S <- 0
        S   <- exp(dt_t A) * S + dt_t * outer(B_t, x_t)
        y_t  = S^T C_t

    ``reverse=True`` flips the time axis of x, dt, B, C and segment_ids, runs the above and
    flips y back (so ``initial_state`` enters at token T-1 and the final state is the state
    after token 0).

    Returns:
      ``(y, final_state)`` as float64 arrays: y ``[B, T, H, P]``, final_state ``[B, H, N, P]``.
    """
    x, dt, A, B, C = (np.asarray(v, dtype=np.float64) for v in (x, dt, A, B, C))
    if reverse:
        x, dt, B, C = (v[:, ::-1] for v in (x, dt, B, C))
        if segment_ids is not None:
            segment_ids = np.asarray(segment_ids)[:, ::-1]
    batch, seq_len, heads, head_dim = x.shape
    d_state = B.shape[-1]
    if initial_state is None:
        state = np.zeros((batch, heads, d_state, head_dim))
    else:
        state = np.array(initial_state, dtype=np.float64)

    y = np.zeros((batch, seq_len, heads, head_dim))
    for t in range(seq_len):
        if segment_ids is not None and t > 0:
            reset = segment_ids[:, t] != segment_ids[:, t - 1]  # [B]
            state[reset] = 0.0
        decay = np.exp(dt[:, t] * A)  # [B, H]
        write = dt[:, t, :, None, None] * B[:, t, :, :, None] * x[:, t, :, None, :]  # [B, H, N, P]
        state = decay[:, :, None, None] * state + write
        y[:, t] = np.einsum("bhnp,bhn->bhp", state, C[:, t])
    if reverse:
        y = y[:, ::-1].copy()
    return y, state
