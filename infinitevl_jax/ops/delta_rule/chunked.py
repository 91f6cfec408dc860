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

Everything inside a chunk is a matmul computed for all chunks at once: ``(I + A)^-1`` by block
doubling (``triangular.py``), then W and U. Only the state walks across chunks in a ``lax.scan``
(two matmuls per chunk: ``V' = U - W S`` and the state update); the outputs are batched matmuls
afterwards, from the saved chunk-entry states. Packed-sequence resets are masks: token i sees
token j only inside the same segment, the entering state only if no reset happened in the
chunk up to i, and the leaving state collects only the chunk's last segment.

Exponentials only ever see differences ``gamma_i - gamma_j`` with ``i >= j`` (never
``exp(-gamma)``), and masked entries are zeroed in the exponent *before* ``exp``, so strong
decays underflow cleanly to 0 and gradients stay finite. All math is float32 at HIGHEST
precision. Memory, also under reverse-mode autodiff, is O(T (K + V + C)) plus one state per chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from infinitevl_jax.ops.delta_rule.triangular import unit_lower_inverse

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
    # gamma_i - gamma_j as the sum of g over (j, i] (a matmul with the lower-triangular ones
    # matrix): a difference of two long running sums would lose float32 precision after strong
    # decays (|gamma| ~ 1e3) exactly where exp() still matters.
    exponent = _mm("im,bnhmj->bnhij", (row >= col).astype(jnp.float32), jnp.where(row > col, g[..., :, None], 0.0))
    same_segment = segment[..., :, None] == segment[..., None, :]  # [B, N, C, C]
    visible = ((row >= col) & same_segment)[:, :, None]  # [B, N, 1, C, C]
    decay = jnp.where(visible, jnp.exp(jnp.where(visible, exponent, 0.0)), 0.0)  # E * L * same-segment

    sees_state = (segment == 0)[:, :, None, :]  # [B, N, 1, C]
    in_last_segment = (segment == segment[..., -1:])[:, :, None, :]
    decay_in = jnp.where(sees_state, jnp.exp(gamma), 0.0)  # state -> token i
    decay_out = jnp.where(in_last_segment, jnp.exp(exponent[..., -1, :]), 0.0)  # token j -> chunk end
    decay_chunk = jnp.where(sees_state[..., -1], jnp.exp(gamma[..., -1]), 0.0)  # [B, N, H]

    strict = row > col
    a = jnp.where(strict, beta[..., :, None] * decay * _mm("bnhik,bnhjk->bnhij", k, k), 0.0)
    inverse = unit_lower_inverse(a)  # (I + A)^-1, [B, N, H, C, C]
    w = _mm("bnhij,bnhjk->bnhik", inverse, (beta * decay_in)[..., None] * k)
    u = _mm("bnhij,bnhjv->bnhiv", inverse, beta[..., None] * v)
    k_out = k * decay_out[..., None]

    def step(state, xs):
        w_c, u_c, k_c, d_c = xs
        v_new = u_c - _mm("bhck,bhkv->bhcv", w_c, state)
        next_state = d_c[..., None, None] * state + _mm("bhck,bhcv->bhkv", k_c, v_new)
        return next_state, (state, v_new)

    xs = [jnp.moveaxis(x, 1, 0) for x in (w, u, k_out, decay_chunk)]
    final_state, (entry_states, v_new) = jax.lax.scan(step, initial_state, xs)
    entry_states, v_new = jnp.moveaxis(entry_states, 0, 1), jnp.moveaxis(v_new, 0, 1)  # [B, N, ...]

    q_scaled = q * scale
    attn = _mm("bnhik,bnhjk->bnhij", q_scaled, k) * decay
    o = (_mm("bnhck,bnhkv->bnhcv", q_scaled * decay_in[..., None], entry_states)
         + _mm("bnhij,bnhjv->bnhiv", attn, v_new))  # [B, N, H, C, V]
    o = jnp.moveaxis(o, 3, 2).reshape(batch, n * c, heads, -1)
    return o[:, :seq_len], final_state
