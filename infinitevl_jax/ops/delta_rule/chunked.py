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

Exponentials only ever see ``gamma_i - gamma_j`` with ``i >= j`` (never ``exp(-gamma)``),
formed as the sum of g over ``(j, i]`` rather than as a difference of two long running sums,
and masked entries are zeroed in the exponent *before* ``exp``, so strong decays underflow
cleanly to 0, stay float32-accurate afterwards, and gradients stay finite. Decays, the
triangular inverse and the state walk are float32 at HIGHEST precision. ``matmul_dtype``
bfloat16/float16 (used for bf16/f16 inputs, as FLA does) gives the input-facing matmuls
(``K K^T``, ``Q K^T``, W, U and the outputs) operands in that dtype with float32 accumulation,
and the chunk terms (W, U, decayed keys and queries) are stored in it. Memory, also under
reverse-mode autodiff, is O(T (K + V + C)) plus one state per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from infinitevl_jax.ops.chunk_math import mm as _mm
from infinitevl_jax.ops.chunk_math import pad_to_chunks, to_chunks
from infinitevl_jax.ops.delta_rule.triangular import unit_lower_inverse

CHUNK_SIZE = 64


class ChunkTerms(NamedTuple):
    """Per-chunk quantities that do not depend on the state; layout ``[B, H, N, C, ...]``.

    All but ``decay`` are stored in the matmul operand dtype (bf16 for bf16 inputs, as FLA
    stores them): every consumer uses them as matmul operands, so a float32 copy would only
    double the bytes that the walk and the outputs read.

    w ``[.., C, K]``, u ``[.., C, V]``: the WY/UT terms (``V' = U - W S``); k_out ``[.., C, K]``:
    keys decayed to the chunk end (state update ``S <- d S + k_out^T V'``); decay ``[B, H, N]``:
    the chunk's total decay d (0 after a reset); q_in ``[.., C, K]``: scaled queries decayed from
    the chunk start; attn ``[.., C, C]``: the masked, decayed intra-chunk ``Q K^T``.
    """

    w: jax.Array
    u: jax.Array
    k_out: jax.Array
    decay: jax.Array
    q_in: jax.Array
    attn: jax.Array


class TokenDecays(NamedTuple):
    """Per-token decay factors of the chunked form (float32), from g and the resets.

    segment ``[B, 1, N, C]``: packed-segment index within the chunk (0 until the chunk's first
    reset); decay_in ``[B, H, N, C]``: state at the chunk start -> token i (0 after a reset);
    decay_out ``[B, H, N, C]``: token j -> chunk end (0 before the chunk's last reset);
    decay_chunk ``[B, H, N]``: the whole chunk's decay of the state (0 after a reset).
    """

    segment: jax.Array
    decay_in: jax.Array
    decay_out: jax.Array
    decay_chunk: jax.Array


def token_decays(g, reset) -> TokenDecays:
    """``TokenDecays`` of g ``[B, H, N, C]`` (chunked) and reset ``[B, N*C]``. Only within-chunk
    sums of g are exponentiated: cumulative from the chunk start (decay_in) and from token j + 1
    to the chunk end (decay_out), never a difference of two long running sums."""
    batch, _, n, c = g.shape
    segment = jnp.cumsum(reset.reshape(batch, 1, n, c).astype(jnp.int32), axis=-1)
    gamma = jnp.cumsum(g, axis=-1)
    from_j = jnp.flip(jnp.cumsum(jnp.flip(g, -1), axis=-1), -1)  # sum of g over [j, C)
    to_end = jnp.concatenate([from_j[..., 1:], jnp.zeros_like(from_j[..., :1])], axis=-1)  # over (j, C)
    sees_state = segment == 0
    return TokenDecays(segment=segment, decay_in=jnp.where(sees_state, jnp.exp(gamma), 0.0),
                       decay_out=jnp.where(segment == segment[..., -1:], jnp.exp(to_end), 0.0),
                       decay_chunk=jnp.where(sees_state[..., -1], jnp.exp(gamma[..., -1]), 0.0))


def prepare_chunks(q, k, v, g, beta, scale, reset, chunk_size=CHUNK_SIZE, matmul_dtype=jnp.float32) -> ChunkTerms:
    """All chunk-parallel work (batched matmuls), for inputs as in ``chunked_gated_delta_rule``."""
    c = chunk_size
    (q, k, v, g, beta, reset), _ = pad_to_chunks((q, k, v, g, beta, reset), c)
    q, k, v, g, beta = (to_chunks(x, c) for x in (q, k, v, g, beta))  # g, beta: [B, H, N, C]
    # The per-token factors' gradients are reductions in this chunk layout; without the barrier
    # XLA fuses them into the transpose back to [B, T, H] and reads v and k there at a fraction of
    # the bandwidth (5 ms of a 24 ms forward+backward at B1 T65536 H16 on an H200).
    g, beta = jax.lax.optimization_barrier((g, beta))
    decays = token_decays(g, reset)

    row = jnp.arange(c)[:, None]
    col = jnp.arange(c)[None, :]
    # gamma_i - gamma_j as the sum of g over (j, i] (a matmul with the lower-triangular ones
    # matrix): a difference of two long running sums would lose float32 precision after strong
    # decays (|gamma| ~ 1e3) exactly where exp() still matters.
    exponent = _mm("im,bhnmj->bhnij", (row >= col).astype(jnp.float32), jnp.where(row > col, g[..., :, None], 0.0))
    same_segment = decays.segment[..., :, None] == decays.segment[..., None, :]  # [B, 1, N, C, C]
    visible = (row >= col) & same_segment
    decay = jnp.where(visible, jnp.exp(jnp.where(visible, exponent, 0.0)), 0.0)  # E * L * same-segment
    decay_in, decay_out, decay_chunk = decays.decay_in, decays.decay_out, decays.decay_chunk

    a = jnp.where(row > col, beta[..., :, None] * decay * _mm("bhnik,bhnjk->bhnij", k, k, dtype=matmul_dtype), 0.0)
    inverse = unit_lower_inverse(a)  # (I + A)^-1, [B, H, N, C, C]
    # The diagonal factors scale the inverse's columns (C x C per chunk) rather than the rows of
    # K and V (C x K, C x V): k and v enter the matmuls as they are, and their factors' gradients
    # are reductions over C x C tiles. The query scale likewise multiplies Q K^T afterwards.
    w = _mm("bhnij,bhnjk->bhnik", inverse * (beta * decay_in)[..., None, :], k, dtype=matmul_dtype)
    u = _mm("bhnij,bhnjv->bhniv", inverse * beta[..., None, :], v, dtype=matmul_dtype)
    attn = _mm("bhnik,bhnjk->bhnij", q, k, dtype=matmul_dtype) * (scale * decay)
    stored = lambda x: x.astype(matmul_dtype)
    scaled = lambda x, factor: stored(x.astype(jnp.float32) * factor[..., None])
    return ChunkTerms(w=stored(w), u=stored(u), k_out=scaled(k, decay_out), decay=decay_chunk,
                      q_in=scaled(q, scale * decay_in), attn=stored(attn))


def walk_states(terms: ChunkTerms, initial_state):
    """The sequential part, as a ``lax.scan`` over chunks: per chunk ``V' = U - W S`` and
    ``S <- d S + k_out^T V'`` (float32 at HIGHEST precision whatever the terms' dtype).
    Returns entry states ``[B, H, N, K, V]``, ``V'`` ``[B, H, N, C, V]`` (float32) and the
    final state ``[B, H, K, V]``."""

    def step(state, xs):
        w_c, u_c, k_c, d_c = xs
        v_new = u_c - _mm("bhck,bhkv->bhcv", w_c, state)
        next_state = d_c[..., None, None] * state + _mm("bhck,bhcv->bhkv", k_c, v_new)
        return next_state, (state, v_new)

    xs = [jnp.moveaxis(x, 2, 0) for x in (terms.w, terms.u, terms.k_out, terms.decay)]
    final_state, (entry_states, v_new) = jax.lax.scan(step, initial_state, xs)
    return jnp.moveaxis(entry_states, 0, 2), jnp.moveaxis(v_new, 0, 2), final_state


def padded_outputs(q_in, attn, entry_states, v_new, matmul_dtype=jnp.float32):
    """``O = q_in S_entry + attn V'`` for all chunks at once (layouts as in ``ChunkTerms``), as
    ``[B, N*C, H, V]`` float32 (the padded length)."""
    o = (_mm("bhnck,bhnkv->bhncv", q_in, entry_states, dtype=matmul_dtype)
         + _mm("bhnij,bhnjv->bhniv", attn, v_new, dtype=matmul_dtype))  # [B, H, N, C, V]
    batch, heads, n, c, d_v = o.shape
    return jnp.moveaxis(o, 1, 3).reshape(batch, n * c, heads, d_v)


def chunk_outputs(terms: ChunkTerms, entry_states, v_new, seq_len, matmul_dtype=jnp.float32):
    """The outputs in XLA (``padded_outputs``), back to ``[B, T, H, V]`` float32."""
    return padded_outputs(terms.q_in, terms.attn, entry_states, v_new, matmul_dtype)[:, :seq_len]


def chunked_gated_delta_rule(q, k, v, g, beta, scale, initial_state, reset, matmul_dtype=jnp.float32,
                             chunk_size=CHUNK_SIZE, prepare=prepare_chunks, walk=walk_states, outputs=chunk_outputs,
                             walk_outputs=None):
    """Chunk-parallel gated delta rule; same contract as ``recurrent_gated_delta_rule``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (float32, or ``matmul_dtype``: they are only
        matmul operands, or promoted to float32 where scaled).
      g, beta: ``[B, T, H]`` float32.
      scale: python float multiplying q.
      initial_state: ``[B, H, K, V]`` float32.
      reset: ``[B, T]`` bool, True where a token starts from a zero state.
      matmul_dtype: operand dtype of the input-facing matmuls (float32 or a 16-bit type).
      chunk_size: tokens per chunk ``C``.
      prepare: the chunk-parallel terms, ``prepare_chunks``' signature; ``prepare_chunks`` (XLA) or
        a Pallas kernel (``pallas_gpu_terms.gpu_prepare_chunks``).
      walk: the sequential part, ``(terms, initial_state) -> (entry states, V', final state)``;
        ``walk_states`` (``lax.scan``) or the Pallas kernels (``pallas_gpu.gpu_walk_states``).
      outputs: ``(terms, entry states, V', T, matmul_dtype) -> o [B, T, H, V]``;
        ``chunk_outputs`` (XLA) or a Pallas kernel (``pallas_gpu.gpu_chunk_outputs``).
      walk_outputs: optional ``(terms, initial_state, T) -> (o, final state)`` replacing ``walk``
        and ``outputs`` (``pallas_gpu.gpu_walk_outputs``: one kernel).

    Returns:
      o ``[B, T, H, V]`` (float32 from XLA, the terms' dtype from a kernel) and the final state
      ``[B, H, K, V]`` float32.
    """
    terms = prepare(q, k, v, g, beta, scale, reset, chunk_size, matmul_dtype)
    if walk_outputs is not None:
        return walk_outputs(terms, initial_state, q.shape[1])
    entry_states, v_new, final_state = walk(terms, initial_state)
    return outputs(terms, entry_states, v_new, q.shape[1], matmul_dtype), final_state
