"""A Pallas (Triton) kernel for the per-chunk gradients that follow the reverse walk.

After the reverse walk, every chunk's gradients are contractions over V of what the walks
stored (``pallas_walk.chunk_gradients``, and in the fused backward the outputs' VJP too):

    dW_n = -dV_n S_n^T        dk_out_n = V'_n dS_{n+1}^T        dd_n = sum_v S_n * dS_{n+1}
    dq_in_n = dO_n S_n^T      dattn_n = dO_n V'_n^T             (with the outputs' cotangent dO)

As separate XLA matmuls each reads its operands from HBM: S_n (the largest, ``[K, V]`` per
chunk) three times, dS_{n+1}, V' and dO twice. Here one program per (batch x head, chunk) reads
each once, in V-blocks, and accumulates all five in float32 (operands in the terms' dtype, as
``mm``). Launch settings: ``BLOCK_V``, ``NUM_WARPS`` (read when traced).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from infinitevl_jax.ops.delta_rule.pallas_walk import F32, dot

BLOCK_V = 64  # V-block of the loop over V (bounds the operand tiles' registers)
NUM_WARPS = 8  # five float32 accumulators, ~29K values at C 64, K 128


def _chunk_grads_kernel(s_ref, ds_ref, du_ref, vn_ref, *refs, block_v, precision):
    """One (group, chunk): s, ds ``[K, V]``; du, vn ``[C, V]``; with the outputs' cotangent also
    do ``[C, V]``. Writes dw, dk ``[C, K]``, dd ``[K, 1]`` and with do dq ``[C, K]``, da ``[C, C]``."""
    with_outputs = len(refs) == 6
    do_ref = refs[0] if with_outputs else None
    outs = refs[1:] if with_outputs else refs
    d_k, d_v = s_ref.shape
    c = du_ref.shape[0]
    rows_t = ((1,), (1,))  # a [R, BV] x b [S, BV] -> [R, S]

    def block(j, acc):
        cols = pl.ds(j * block_v, block_v)
        s, ds = s_ref[:, cols], ds_ref[:, cols]
        vn = vn_ref[:, cols]
        acc = dict(acc)
        acc["dw"] = acc["dw"] - dot(du_ref[:, cols], s, precision, rows_t)
        acc["dk"] = acc["dk"] + dot(vn, ds, precision, rows_t)
        acc["dd"] = acc["dd"] + jnp.sum(s.astype(F32) * ds.astype(F32), axis=1, keepdims=True)
        if with_outputs:
            do = do_ref[:, cols]
            acc["dq"] = acc["dq"] + dot(do, s, precision, rows_t)
            acc["da"] = acc["da"] + dot(do, vn, precision, rows_t)
        return acc

    zeros = lambda *shape: jnp.zeros(shape, F32)
    acc = dict(dw=zeros(c, d_k), dk=zeros(c, d_k), dd=zeros(d_k, 1))
    if with_outputs:
        acc.update(dq=zeros(c, d_k), da=zeros(c, c))
    acc = jax.lax.fori_loop(0, d_v // block_v, block, acc)
    for name, ref in zip(("dw", "dk", "dd", "dq", "da"), outs):
        ref[...] = acc[name].astype(ref.dtype)


def chunk_grads(states, v_new, d_u, d_next, d_o=None, *, heads=None, backend):
    """``pallas_walk.chunk_gradients`` in one kernel: states, d_next ``[G, N, K, V]`` and v_new,
    d_u ``[G, N, C, V]`` in the terms' dtype (head dims padded to powers of two) -> dW, dk_out
    ``[G, N, C, K]`` (terms' dtype) and dd ``[G, N, K, 1]`` (float32); given the outputs'
    cotangent d_o ``[B, N*C, H, V]`` (``heads`` = H) also dq_in ``[G, N, C, K]`` and dattn
    ``[G, N, C, C]`` (terms' dtype). ``backend`` = ``(interpret, compiler_params, precision)``
    (``pallas_gpu.backend_params`` with ``NUM_WARPS``)."""
    groups, n, d_k, d_v = states.shape
    c = v_new.shape[2]
    dtype = states.dtype
    interpret, params, precision = backend
    per_chunk = lambda rows, cols: pl.BlockSpec((pl.squeezed, pl.squeezed, rows, cols), lambda g, i: (g, i, 0, 0))
    in_specs = [per_chunk(d_k, d_v), per_chunk(d_k, d_v), per_chunk(c, d_v), per_chunk(c, d_v)]
    outputs = [((c, d_k), dtype), ((c, d_k), dtype), ((d_k, 1), F32)]
    operands = [states, d_next, d_u, v_new]
    if d_o is not None:
        in_specs.append(pl.BlockSpec((pl.squeezed, c, pl.squeezed, d_v),
                                     lambda g, i: (g // heads, i, g % heads, 0)))
        operands.append(d_o.astype(dtype))
        outputs += [((c, d_k), dtype), ((c, c), dtype)]
    return pl.pallas_call(
        functools.partial(_chunk_grads_kernel, block_v=min(BLOCK_V, d_v), precision=precision),
        grid=(groups, n), in_specs=in_specs,
        out_specs=[per_chunk(*shape) for shape, _ in outputs],
        out_shape=[jax.ShapeDtypeStruct((groups, n, *shape), dt) for shape, dt in outputs],
        interpret=interpret, compiler_params=params, name="gdn_chunk_grads",
    )(*operands)
