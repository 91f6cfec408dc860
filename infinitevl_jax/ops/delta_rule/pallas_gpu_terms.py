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

Differentiation (``TERMS_BACKWARD``): by default it goes through XLA: under ``jax.vjp`` the
forward runs ``prepare_chunks`` itself and its VJP is the backward, so the kernel serves
forward-only calls (inference and prefill); that is the path timed on a GPU. With
``TERMS_BACKWARD = "kernel"`` the forward stays this kernel, saving only its inputs, and
``_terms_backward_kernel`` (one program per group and chunk again) recomputes the chunk's
decay, kk^T and inverse and forms dq, dk, dv and the per-token cotangents of g, beta and the
decay factors in one pass; JAX differentiates the small XLA parts around it. It is tested in
interpret mode against XLA's VJP and the float64 reference, lowers for CUDA, and on an H200 it
was slower than XLA's VJP: forward+backward 18.41 vs 17.43 ms at B1 T65536 H16, 9.23 vs 9.13 ms
at B8 T4096 (``benchmarks/delta_rule_gpu_tuning.py --sections terms_backward``,
benchmarks/RESULTS.md), so XLA stays the default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from infinitevl_jax.ops.chunk_math import pad_to_chunks, to_chunks
from infinitevl_jax.ops.delta_rule.chunked import ChunkTerms, prepare_chunks, token_decays
from infinitevl_jax.ops.delta_rule.pallas_gpu import backend_params
from infinitevl_jax.ops.delta_rule.pallas_walk import F32, dot, pad_trailing
from infinitevl_jax.ops.triton_launch import next_power_of_two

MAX_BLOCK_V_TERMS = 128  # U is formed in V-blocks of this width (bounds the registers it takes)
# The VJP of differentiated calls: "xla" (prepare_chunks' own, the default: the faster on an
# H200) or "kernel" (``_terms_backward_kernel``: 1.06x slower at B1 T65536). Read when a call is
# traced.
TERMS_BACKWARD = "xla"
# Warps per program of the terms kernels (None: the walk's ``pallas_gpu.TRITON_PARAMS``, 4, the
# setting measured so far). A program has no loop to pipeline, only its chunk's matmuls and the
# inverse, so its warps, not the walk's pipeline stages, set how they run;
# benchmarks/delta_rule_gpu_tuning.py --sections terms_launch sweeps them. Read when traced.
TERMS_NUM_WARPS = None


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


def _bf16_parts(x):
    """float32 ``x`` as the sum of three bf16 parts (8 significant bits each, 24 in all)."""
    parts = []
    rest = x
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(F32)
    return parts


def _exact_dot_01(x, ones, ones_on_left):
    """``ones @ x`` (or ``x @ ones``) for a 0/1 float32 ``ones`` to float32 accuracy with bf16
    operands: every product with a part of x is exact, the sums float32."""
    ones = ones.astype(jnp.bfloat16)
    return sum(dot(ones, part, None) if ones_on_left else dot(part, ones, None) for part in _bf16_parts(x))


def _strict_lower(x):
    """``x`` ``[C, C]`` with the diagonal and everything above it zeroed."""
    row = jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    col = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.where(row > col, x, 0.0)


def _chunk_decay(g_col, seg_col, seg_row):
    """The decay ``[C, C]`` of one chunk: exp(sum of g over (j, i]) where token i sees token j
    (i >= j, same segment), else 0; the exponent is float32-exact."""
    c = g_col.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    ones_lower = jnp.where(row >= col, 1.0, 0.0).astype(F32)
    exponent = _exact_dot_01(jnp.where(row > col, g_col, 0.0), ones_lower, ones_on_left=True)
    visible = (row >= col) & (seg_col == seg_row)
    return jnp.where(visible, jnp.exp(jnp.where(visible, exponent, 0.0)), 0.0)


def _terms_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_col_ref, seg_row_ref, d_in_ref, d_out_ref,
                  beta_row_ref, d_in_row_ref, w_ref, u_ref, k_out_ref, q_in_ref, attn_ref, *, scale,
                  inverse_precision, precision):
    """One (group, chunk): q, k ``[C, K]``, v ``[C, V]`` (input dtype); g, beta, seg_col, d_in,
    d_out ``[C, 1]`` and seg_row, beta_row, d_in_row ``[1, C]`` (float32); outputs in the matmul
    dtype. The diagonal factors of W and U scale the inverse's columns, as in ``prepare_chunks``."""
    operand = w_ref.dtype
    decay = _chunk_decay(g_ref[...], seg_col_ref[...], seg_row_ref[...])
    k = k_ref[...].astype(operand)
    beta_row = beta_row_ref[...]
    kk = dot(k, k, precision, contract=((1,), (1,)))
    inverse = _unit_lower_inverse(_strict_lower(beta_ref[...] * decay * kk), inverse_precision)
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


def _terms_backward_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, seg_col_ref, seg_row_ref, d_in_ref, d_out_ref,
                           beta_row_ref, d_in_row_ref, dw_ref, du_ref, dk_out_ref, dq_in_ref, dattn_ref,
                           dq_ref, dk_ref, dv_ref, dg_row_ref, dbeta_ref, dbeta_row_ref, dd_in_ref, dd_in_row_ref,
                           dd_out_ref, *, scale, inverse_precision, precision):
    """The VJP of ``_terms_kernel`` for one (group, chunk), recomputing its forward. Inputs as
    there plus the cotangents dW, dk_out, dq_in ``[C, K]``, dU ``[C, V]``, dattn ``[C, C]`` (the
    terms' dtype). Writes dq, dk ``[C, K]`` and dv ``[C, V]`` (the inputs' dtype) and float32
    per-token cotangents: of g through the exponent, and of beta and decay_in, each split into a
    column ``[C, 1]`` and a row ``[1, C]`` part (the caller adds them), and of decay_out.

    With X = (I + A)^-1, Xw = X diag(beta decay_in), Xu = X diag(beta):
    dXw = dW K^T, dXu = dU V^T, dK += Xw^T dW, dV = Xu^T dU,
    dX = dXw diag(beta decay_in) + dXu diag(beta), dA = strict_lower(-X^T dX X^T),
    A = strict_lower(beta_i E_ij k_i.k_j): dE += dA beta_i KK, d(KK) = dA beta_i E, dK += (d(KK) + d(KK)^T) K,
    attn = (Q K^T) scale E: d(QK^T) = dattn scale E, dE += dattn scale QK^T,
    and E = exp(sum of g over (j, i]) where visible: dg_m = sum over i >= m > j of dE_ij E_ij.
    """
    operand = dw_ref.dtype
    c = k_ref.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    decay = _chunk_decay(g_ref[...], seg_col_ref[...], seg_row_ref[...])
    k = k_ref[...].astype(operand)
    q = q_ref[...]
    beta, beta_row, d_in_row = beta_ref[...], beta_row_ref[...], d_in_row_ref[...]
    kk = dot(k, k, precision, contract=((1,), (1,)))
    inverse = _unit_lower_inverse(_strict_lower(beta * decay * kk), inverse_precision)

    dw = dw_ref[...]
    d_xw = dot(dw, k, precision, contract=((1,), (1,)))  # dW K^T
    w_factor = beta_row * d_in_row
    dk = dot((inverse * w_factor).astype(operand), dw, precision, contract=((0,), (0,)))  # Xw^T dW
    inverse_beta = (inverse * beta_row).astype(operand)
    d_xu = jnp.zeros((c, c), F32)
    bv = min(v_ref.shape[1], MAX_BLOCK_V_TERMS)
    for j in range(v_ref.shape[1] // bv):
        block = pl.ds(j * bv, bv)
        du = du_ref[:, block]
        d_xu = d_xu + dot(du, v_ref[:, block].astype(operand), precision, contract=((1,), (1,)))
        dv_ref[:, block] = dot(inverse_beta, du, precision, contract=((0,), (0,))).astype(dv_ref.dtype)
    d_x = d_xw * w_factor + d_xu * beta_row
    through_w = jnp.sum(d_xw * inverse, axis=0, keepdims=True)  # [1, C]
    dbeta_row_ref[...] = through_w * d_in_row + jnp.sum(d_xu * inverse, axis=0, keepdims=True)
    dd_in_row_ref[...] = through_w * beta_row

    x_t_dx = dot(inverse, d_x, inverse_precision, contract=((0,), (0,)))  # X^T dX
    d_a = -_strict_lower(dot(x_t_dx, inverse, inverse_precision, contract=((1,), (1,))))  # ... X^T
    dbeta_ref[...] = jnp.sum(d_a * decay * kk, axis=1, keepdims=True)
    d_a_beta = d_a * beta
    d_decay = d_a_beta * kk
    d_kk = (d_a_beta * decay).astype(operand)
    dk = dk + dot(d_kk, k, precision) + dot(d_kk, k, precision, contract=((0,), (0,)))

    qk = dot(q.astype(operand), k, precision, contract=((1,), (1,)))
    dattn = dattn_ref[...].astype(F32)
    d_decay = d_decay + dattn * scale * qk
    d_qk = (dattn * (scale * decay)).astype(operand)
    dq = dot(d_qk, k, precision)
    dk = dk + dot(d_qk, q.astype(operand), precision, contract=((0,), (0,)))

    dk_out = dk_out_ref[...].astype(F32)
    dk = dk + dk_out * d_out_ref[...]
    dd_out_ref[...] = jnp.sum(dk_out * k_ref[...].astype(F32), axis=1, keepdims=True)
    dq_in = dq_in_ref[...].astype(F32)
    dq = dq + dq_in * (scale * d_in_ref[...])
    dd_in_ref[...] = scale * jnp.sum(dq_in * q.astype(F32), axis=1, keepdims=True)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)

    # dg_m = sum_i [i >= m] sum_j [j < m] dE_ij E_ij: (dE E) times the 0/1 strictly-upper matrix
    # (float32-exact, as the exponent), then the column sums over i >= m.
    d_exponent = d_decay * decay
    before_m = _exact_dot_01(d_exponent, jnp.where(row < col, 1.0, 0.0).astype(F32), ones_on_left=False)
    dg_row_ref[...] = jnp.sum(jnp.where(row >= col, before_m, 0.0), axis=0, keepdims=True)


def _terms_kernels(heads, chunk_size, scale, matmul_dtype):
    """``(q, k, v, *per_token) -> (w, u, k_out, q_in, attn)`` for ``_terms_call``'s padded
    inputs, as a ``custom_vjp`` whose backward is ``_terms_backward_kernel`` (it saves only the
    inputs and recomputes the rest)."""
    c = chunk_size
    interpret, params, precision = backend_params(matmul_dtype, TERMS_NUM_WARPS)
    _, _, f32_precision = backend_params(F32)
    one_tf32_pass = not interpret and jnp.dtype(matmul_dtype) != F32
    settings = dict(scale=scale, precision=precision,
                    inverse_precision=jax.lax.Precision.HIGH if one_tf32_pass else f32_precision)
    by_token = lambda d: pl.BlockSpec((pl.squeezed, c, pl.squeezed, d), lambda gi, i: (gi // heads, i, gi % heads, 0))
    by_chunk = lambda *block: pl.BlockSpec((pl.squeezed, pl.squeezed, *block), lambda gi, i: (gi, i, 0, 0))
    column, row = by_chunk(c, 1), by_chunk(1, c)
    per_token_specs = [column, column, column, row, column, column, row, row]

    def layout(q, v):
        """Grid, the q/k/v BlockSpecs and the per-chunk output shape maker."""
        groups, n = q.shape[0] * heads, q.shape[1] // c
        per_chunk = lambda shape, dtype: jax.ShapeDtypeStruct((groups, n, *shape), dtype)
        return (groups, n), [by_token(q.shape[-1])] * 2 + [by_token(v.shape[-1])], per_chunk

    def forward(q, k, v, *per_token):
        grid, qkv_specs, per_chunk = layout(q, v)
        pk, pv = q.shape[-1], v.shape[-1]
        blocks = [(c, pk), (c, pv), (c, pk), (c, pk), (c, c)]
        return pl.pallas_call(
            functools.partial(_terms_kernel, **settings), grid=grid, in_specs=qkv_specs + per_token_specs,
            out_specs=[by_chunk(*b) for b in blocks], out_shape=[per_chunk(b, matmul_dtype) for b in blocks],
            interpret=interpret, compiler_params=params, name="gdn_chunk_terms",
        )(q, k, v, *per_token)

    def backward(inputs, cotangents):
        q, k, v, *per_token = inputs
        grid, qkv_specs, per_chunk = layout(q, v)
        pk, pv = q.shape[-1], v.shape[-1]
        token_grads = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
        vectors = [row, column, row, column, row, column]  # dg, dbeta, dbeta (row), dd_in, dd_in (row), dd_out
        dq, dk, dv, dg, dbeta, dbeta_row, dd_in, dd_in_row, dd_out = pl.pallas_call(
            functools.partial(_terms_backward_kernel, **settings), grid=grid,
            in_specs=qkv_specs + per_token_specs + [by_chunk(c, pk), by_chunk(c, pv), by_chunk(c, pk),
                                                    by_chunk(c, pk), by_chunk(c, c)],
            out_specs=qkv_specs + vectors,
            out_shape=token_grads + [per_chunk(spec.block_shape[2:], F32) for spec in vectors],
            interpret=interpret, compiler_params=params, name="gdn_chunk_terms_bwd",
        )(*inputs, *cotangents)
        as_column = lambda x: x.reshape(*x.shape[:2], c, 1)  # [G, N, 1, C] -> [G, N, C, 1], same order
        no_gradient = jnp.zeros_like  # the segment ids
        return (dq, dk, dv, as_column(dg), dbeta, no_gradient(per_token[2]), no_gradient(per_token[3]), dd_in,
                dd_out, dbeta_row, dd_in_row)

    terms = jax.custom_vjp(forward)
    terms.defvjp(lambda *inputs: (forward(*inputs), inputs), backward)
    return terms


def _terms_call(q, k, v, g, beta, scale, reset, chunk_size, matmul_dtype) -> ChunkTerms:
    """``prepare_chunks`` with the chunk-parallel work in ``_terms_kernel`` (differentiable: the
    XLA parts by JAX, the kernel by ``_terms_backward_kernel``)."""
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
    row_of = lambda x: x.reshape(groups, n, 1, c)
    segment, beta_col, d_in = column(decays.segment), column(beta_chunks), column(decays.decay_in)
    per_token = [column(g_chunks), beta_col, segment, row_of(segment), d_in, column(decays.decay_out),
                 row_of(beta_col), row_of(d_in)]
    w, u, k_out, q_in, attn = _terms_kernels(heads, c, scale, matmul_dtype)(q, k, v, *per_token)
    unflat = lambda x, d: x.reshape(batch, heads, n, c, x.shape[-1])[..., :d]
    return ChunkTerms(w=unflat(w, d_k), u=unflat(u, d_v), k_out=unflat(k_out, d_k), decay=decays.decay_chunk,
                      q_in=unflat(q_in, d_k), attn=unflat(attn, c))


def gpu_prepare_chunks(q, k, v, g, beta, scale, reset, chunk_size, matmul_dtype) -> ChunkTerms:
    """``chunked.prepare_chunks`` on ``_terms_kernel``. Differentiated, ``TERMS_BACKWARD`` picks
    the VJP: ``"xla"`` runs ``prepare_chunks`` itself in the forward and takes its XLA VJP;
    ``"kernel"`` keeps the kernel's forward and runs ``_terms_backward_kernel``."""
    if TERMS_BACKWARD == "kernel":
        return _terms_call(q, k, v, g, beta, scale, reset, chunk_size, matmul_dtype)
    if TERMS_BACKWARD != "xla":
        raise ValueError(f"pallas_gpu_terms.TERMS_BACKWARD must be 'xla' or 'kernel'; got {TERMS_BACKWARD!r}")

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
