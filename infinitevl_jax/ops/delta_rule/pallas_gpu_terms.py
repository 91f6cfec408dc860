"""A Pallas (Triton) kernel for the chunk-parallel terms of the chunked gated delta rule on GPU.

``chunked.prepare_chunks`` builds ``ChunkTerms`` in XLA: transposes of q, k, v into the chunk
layout, a float32 ``[C, C]`` matrix per chunk for every intermediate, the triangular inverse as
many small batched matmuls. Here one program per (batch x head, chunk) reads its chunk of q, k
and v straight from the ``[B, T, H, d]`` inputs and forms, on-chip,

    exponent_ij = sum of g over (j, i]              (a matmul with the lower-triangular ones)
    A  = strict_lower(beta_i E_ij k_i.k_j)          E = exp(exponent) where i >= j, same segment
    X  = (I + A)^-1                                 (block doubling, below)
    W  = (X diag(beta decay_in)) K,  U = (X diag(beta)) V,  k_out = diag(decay_out) K,
    q_in = diag(decay_in) scale Q,  attn = (Q K^T) * scale E

and writes them in the matmul dtype. The inverse doubles block sizes b = 1, 2, ..., C/2 with
masked full-tile matmuls: with X_b = (I + D_b)^-1 for the b-block diagonal part D_b of A and O_b
the lower-left b x b blocks inside each 2b-block, ``X_2b = X_b - X_b O_b X_b`` (exact: O_b X_b O_b
= 0), which is ``triangular.unit_lower_inverse``'s block merge applied to all blocks at once.
The input-facing matmuls take the matmul dtype with float32 accumulation, as in XLA. Per-token
decay factors (``chunked.token_decays``) are small and come from XLA.

Precision of the float32 matmuls:
- The exponent is float32-exact: g is split into three bf16 parts (24 significant bits in all)
  and each part is multiplied by the 0/1 matrix, which is exact, with float32 accumulation.
- The inverse with float32 terms is 3xTF32 (float32-level).
- The inverse with 16-bit terms is one TF32 pass on GPU. It is rounded to the 16-bit dtype
  right after, and 3xTF32 made the kernel 4x slower (6.4 ms against 1.6 ms at B1 T65536 H16 on
  an H200).

Differentiation goes through XLA: under ``jax.vjp`` the forward runs ``prepare_chunks`` itself
and its VJP is the backward, so the kernel serves forward-only calls (inference and prefill).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from infinitevl_jax.ops.chunk_math import pad_to_chunks, to_chunks
from infinitevl_jax.ops.delta_rule.chunked import ChunkTerms, prepare_chunks, token_decays
from infinitevl_jax.ops.delta_rule.pallas_gpu import backend_params, next_power_of_two
from infinitevl_jax.ops.delta_rule.pallas_walk import F32, dot, pad_trailing

MAX_BLOCK_V_TERMS = 128  # U is formed in V-blocks of this width (bounds the registers it takes)


def _unit_lower_inverse(a, precision):
    """``(I + a)^-1`` of a strictly lower-triangular ``[C, C]`` float32 tile, C a power of two."""
    c = a.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    lower_left = lambda b: jnp.where(((row // (2 * b)) == (col // (2 * b))) & ((row // b) > (col // b)), a, 0.0)
    inverse = jnp.where(row == col, 1.0, 0.0).astype(F32) - lower_left(1)  # X_2 = X_1 - O_1 with X_1 = I
    b = 2
    while b < c:
        inverse = inverse - dot(dot(inverse, lower_left(b), precision), inverse, precision)
        b *= 2
    return inverse


def _exact_lower_sums(ones, x):
    """``ones @ x`` for a 0/1 float32 ``ones`` to float32 accuracy with bf16 operands: x as the
    sum of three bf16 parts (8 significant bits each), every product exact, float32 sums."""
    parts = []
    rest = x
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(F32)
    ones = ones.astype(jnp.bfloat16)
    return sum(dot(ones, part, None) for part in parts)


def _terms_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_col_ref, seg_row_ref, d_in_ref, d_out_ref,
                  beta_row_ref, d_in_row_ref, w_ref, u_ref, k_out_ref, q_in_ref, attn_ref, *, scale,
                  inverse_precision, precision):
    """One (group, chunk): q, k ``[C, K]``, v ``[C, V]`` (input dtype); g, beta, seg_col, d_in,
    d_out ``[C, 1]`` and seg_row, beta_row, d_in_row ``[1, C]`` (float32); outputs in the matmul
    dtype. The diagonal factors of W and U scale the inverse's columns, as in ``prepare_chunks``."""
    operand = w_ref.dtype
    c = k_ref.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    ones_lower = jnp.where(row >= col, 1.0, 0.0).astype(F32)
    exponent = _exact_lower_sums(ones_lower, jnp.where(row > col, g_ref[...], 0.0))  # sum of g over (j, i]
    visible = (row >= col) & (seg_col_ref[...] == seg_row_ref[...])
    decay = jnp.where(visible, jnp.exp(jnp.where(visible, exponent, 0.0)), 0.0)

    k = k_ref[...].astype(operand)
    beta_row = beta_row_ref[...]
    kk = dot(k, k, precision, contract=((1,), (1,)))
    inverse = _unit_lower_inverse(jnp.where(row > col, beta_ref[...] * decay * kk, 0.0), inverse_precision)
    w_ref[...] = dot((inverse * (beta_row * d_in_row_ref[...])).astype(operand), k, precision).astype(w_ref.dtype)
    inverse_beta = (inverse * beta_row).astype(operand)
    bv = min(v_ref.shape[1], MAX_BLOCK_V_TERMS)
    for j in range(v_ref.shape[1] // bv):
        block = pl.ds(j * bv, bv)
        u_ref[:, block] = dot(inverse_beta, v_ref[:, block].astype(operand), precision).astype(u_ref.dtype)
    k_out_ref[...] = (k_ref[...].astype(F32) * d_out_ref[...]).astype(k_out_ref.dtype)
    q = q_ref[...]
    q_in_ref[...] = (q.astype(F32) * (scale * d_in_ref[...])).astype(q_in_ref.dtype)
    attn = dot(q.astype(operand), k, precision, contract=((1,), (1,))) * (scale * decay)
    attn_ref[...] = attn.astype(attn_ref.dtype)


def _terms_call(q, k, v, g, beta, scale, reset, chunk_size, matmul_dtype) -> ChunkTerms:
    """``prepare_chunks`` with the chunk-parallel work in ``_terms_kernel``."""
    batch, _, heads, d_k = q.shape
    d_v = v.shape[-1]
    c = chunk_size
    (q, k, v, g, beta, reset), n = pad_to_chunks((q, k, v, g, beta, reset), c)
    pk, pv = next_power_of_two(d_k), next_power_of_two(d_v)
    q, k, v = pad_trailing(q, pk), pad_trailing(k, pk), pad_trailing(v, pv)

    g_chunks, beta_chunks = to_chunks(g, c), to_chunks(beta, c)  # [B, H, N, C]
    decays = token_decays(g_chunks, reset)
    groups = batch * heads
    column = lambda x: jnp.broadcast_to(x, (batch, heads, n, c)).reshape(groups, n, c, 1).astype(F32)
    segment = column(decays.segment)
    row_of = lambda x: x.reshape(groups, n, 1, c)
    per_token = [column(g_chunks), column(beta_chunks), segment, row_of(segment), column(decays.decay_in),
                 column(decays.decay_out), row_of(column(beta_chunks)), row_of(column(decays.decay_in))]

    interpret, params, precision = backend_params(matmul_dtype)
    _, _, f32_precision = backend_params(F32)
    one_tf32_pass = not interpret and jnp.dtype(matmul_dtype) != F32
    inverse_precision = jax.lax.Precision.HIGH if one_tf32_pass else f32_precision
    by_token = lambda d: pl.BlockSpec((pl.squeezed, c, pl.squeezed, d), lambda gi, i: (gi // heads, i, gi % heads, 0))
    by_chunk = lambda *block: pl.BlockSpec((pl.squeezed, pl.squeezed, *block), lambda gi, i: (gi, i, 0, 0))
    out = lambda *shape: jax.ShapeDtypeStruct((groups, n, *shape), matmul_dtype)
    w, u, k_out, q_in, attn = pl.pallas_call(
        functools.partial(_terms_kernel, scale=scale, inverse_precision=inverse_precision, precision=precision),
        grid=(groups, n),
        in_specs=[by_token(pk), by_token(pk), by_token(pv), by_chunk(c, 1), by_chunk(c, 1), by_chunk(c, 1),
                  by_chunk(1, c), by_chunk(c, 1), by_chunk(c, 1), by_chunk(1, c), by_chunk(1, c)],
        out_specs=[by_chunk(c, pk), by_chunk(c, pv), by_chunk(c, pk), by_chunk(c, pk), by_chunk(c, c)],
        out_shape=[out(c, pk), out(c, pv), out(c, pk), out(c, pk), out(c, c)],
        interpret=interpret, compiler_params=params, name="gdn_chunk_terms",
    )(q, k, v, *per_token)
    unflat = lambda x, d: x.reshape(batch, heads, n, c, x.shape[-1])[..., :d]
    return ChunkTerms(w=unflat(w, d_k), u=unflat(u, d_v), k_out=unflat(k_out, d_k), decay=decays.decay_chunk,
                      q_in=unflat(q_in, d_k), attn=unflat(attn, c))


def gpu_prepare_chunks(q, k, v, g, beta, scale, reset, chunk_size, matmul_dtype) -> ChunkTerms:
    """``chunked.prepare_chunks`` on ``_terms_kernel`` for forward-only calls; differentiated,
    it is ``prepare_chunks`` itself (forward and VJP in XLA)."""

    @jax.custom_vjp
    def terms(q, k, v, g, beta, reset):
        return _terms_call(q, k, v, g, beta, scale, reset, chunk_size, matmul_dtype)

    def terms_fwd(q, k, v, g, beta, reset):
        xla = lambda *a: prepare_chunks(*a, scale, reset, chunk_size, matmul_dtype)
        out, vjp = jax.vjp(xla, q, k, v, g, beta)
        return out, vjp

    def terms_bwd(vjp, cotangents):
        return (*vjp(cotangents), None)

    terms.defvjp(terms_fwd, terms_bwd)
    return terms(q, k, v, g, beta, reset)
