"""Chunked gated delta rule in pure JAX (the WY/UT form; spec section 2.6).

The sequence is cut into chunks of ``C`` tokens (the tail is padded with k = v = q = 0, g = 0,
beta = 0, which leaves real outputs and the final state unchanged). Inside a chunk, with
entering state ``S`` (``[K, V]``), inclusive cumulative log-decay ``gamma_r = sum_{j<=r} g_j``
and ``E_ij = exp(gamma_i - gamma_j)`` for ``i >= j``:

    A  = strict_lower(beta_i E_ij k_i.k_j)            (C x C)
    W  = (I + A)^-1 diag(beta e^gamma) K              (C x K)
    U  = (I + A)^-1 diag(beta) V                      (C x V)
    V' = U - W S                                      (per-token delta-rule errors)
    O  = scale * [ diag(e^gamma) Q S + (Q K^T * E * L) V' ]
    S <- e^{gamma_C} S + (diag(e^{gamma_C - gamma}) K)^T V'

Everything inside a chunk is a matmul (computed for all chunks at once); only the ``[K, V]``
state walks across chunks in a ``lax.scan``. Packed-sequence resets are masks: token i sees
token j only inside the same segment, the entering state only if no reset happened in the
chunk up to i, and the leaving state collects only the chunk's last segment.

Exponentials only ever see differences ``gamma_i - gamma_j`` with ``i >= j`` (never
``exp(-gamma)``), and masked entries are zeroed in the exponent *before* ``exp``, so strong
decays underflow cleanly to 0 and gradients stay finite. All math is float32 at HIGHEST
precision. Reverse-mode memory is O(T (K + V + C)) plus one state per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK_SIZE = 64
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(spec, *operands):
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _pad_time(x, pad):
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def chunked_gated_delta_rule(q, k, v, g, beta, scale, initial_state, reset, chunk_size=CHUNK_SIZE):
    """Chunk-parallel gated delta rule; same contract as ``recurrent_gated_delta_rule``.

    Args:
      q, k: ``[B, T, H, K]`` float32; v: ``[B, T, H, V]`` float32.
      g, beta: ``[B, T, H]`` float32.
      scale: python float multiplying q.
      initial_state: ``[B, H, K, V]`` float32.
      reset: ``[B, T]`` bool, True where a token starts from a zero state.
      chunk_size: tokens per chunk ``C``.

    Returns:
      o ``[B, T, H, V]`` float32 and the final state ``[B, H, K, V]`` float32.
    """
    batch, seq_len, heads, _ = q.shape
    c = chunk_size
    pad = (-seq_len) % c
    q, k, v, g, beta, reset = (_pad_time(x, pad) for x in (q, k, v, g, beta, reset))
    n = (seq_len + pad) // c

    def chunks(x):  # [B, N*C, H, ...] -> [B, N, H, C, ...]
        return jnp.moveaxis(x.reshape(batch, n, c, *x.shape[2:]), 2, 3)

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))  # g, beta: [B, N, H, C]
    segment = jnp.cumsum(reset.reshape(batch, n, c).astype(jnp.int32), axis=-1)  # [B, N, C]

    gamma = jnp.cumsum(g, axis=-1)  # [B, N, H, C]
    row = jnp.arange(c)[:, None]
    col = jnp.arange(c)[None, :]
    # gamma_i - gamma_j summed over (j, i] directly: a difference of two long running sums would
    # lose float32 precision after strong decays (|gamma| ~ 1e3) just where exp() still matters.
    exponent = jnp.cumsum(jnp.where(row > col, g[..., :, None], 0.0), axis=-2)  # [B, N, H, C, C]
    same_segment = segment[..., :, None] == segment[..., None, :]  # [B, N, C, C]
    visible = ((row >= col) & same_segment)[:, :, None]  # [B, N, 1, C, C]
    decay = jnp.where(visible, jnp.exp(jnp.where(visible, exponent, 0.0)), 0.0)  # E * L * same-segment

    sees_state = (segment == 0)[:, :, None, :]  # [B, N, 1, C]
    in_last_segment = (segment == segment[..., -1:])[:, :, None, :]
    decay_in = jnp.where(sees_state, jnp.exp(gamma), 0.0)  # state -> token i
    decay_out = jnp.where(in_last_segment, jnp.exp(exponent[..., -1, :]), 0.0)  # token j -> chunk end
    decay_chunk = jnp.where(sees_state[..., -1], jnp.exp(gamma[..., -1]), 0.0)  # [B, N, H]

    strict = (row > col)
    a = jnp.where(strict, beta[..., :, None] * decay * _mm("bnhik,bnhjk->bnhij", k, k), 0.0)
    unit_lower = a + jnp.eye(c, dtype=a.dtype)
    rhs = jnp.concatenate([(beta * decay_in)[..., None] * k, beta[..., None] * v], axis=-1)
    wu = jax.scipy.linalg.solve_triangular(unit_lower, rhs, lower=True, unit_diagonal=True)
    w, u = wu[..., : k.shape[-1]], wu[..., k.shape[-1]:]

    q_scaled = q * scale
    attn = _mm("bnhik,bnhjk->bnhij", q_scaled, k) * decay
    q_in = q_scaled * decay_in[..., None]
    k_out = k * decay_out[..., None]

    def step(state, xs):
        w_c, u_c, attn_c, q_c, k_c, d_c = xs
        v_new = u_c - _mm("bhck,bhkv->bhcv", w_c, state)
        o_c = _mm("bhck,bhkv->bhcv", q_c, state) + _mm("bhij,bhjv->bhiv", attn_c, v_new)
        state = d_c[..., None, None] * state + _mm("bhck,bhcv->bhkv", k_c, v_new)
        return state, o_c

    xs = [jnp.moveaxis(x, 1, 0) for x in (w, u, attn, q_in, k_out, decay_chunk)]
    final_state, o = jax.lax.scan(step, initial_state, xs)  # o: [N, B, H, C, V]
    o = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(batch, n * c, heads, -1)
    return o[:, :seq_len], final_state
