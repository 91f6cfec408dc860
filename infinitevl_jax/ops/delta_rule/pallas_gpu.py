"""Pallas (Triton) kernels for the sequential part of the chunked gated delta rule.

The chunk-parallel WY/UT work and the outputs (``chunked_gated_delta_rule``, which this module
calls with ``walk=pallas_walk_states``) are batched matmuls that XLA already runs well. What
XLA runs badly is the walk across chunks: a ``lax.scan`` round-trips the ``[K, V]`` state through HBM on every
chunk. Here one Pallas program per (batch x head, V-block) keeps its ``[K, BV]`` slice of the
state on-chip (float32) and walks all chunks in a ``fori_loop``:

    forward, chunk n:   S_n is stored;  V'_n = U_n - W_n S_n;  S_{n+1} = d_n S_n + k_out_n^T V'_n
    backward, n = N-1..0, carrying dS = dL/dS_{n+1} (starting from dL/dS_final):
        dV   = dL/dV'_n + k_out_n dS            dU_n = dV
        dW_n = -dV S_n^T                        dk_out_n = V'_n dS^T
        dd_n = <S_n, dS>                        dS <- d_n dS - W_n^T dV + dL/dS_n

The backward recomputes nothing per token and reads the saved chunk-entry states: memory is
O(T (K + V) + (T / C) K V) per head. W, k_out and dd partial sums over V-blocks are added in XLA.

GPU lowering is Triton, chosen explicitly through ``compiler_params`` (jax 0.11 would otherwise
lower ``pallas_call`` through Mosaic GPU; 0.12 defaults to Triton). On CPU the same kernels run
in interpret mode (tests). TPU needs a Mosaic kernel gridded over chunks (state in VMEM scratch):
not implemented yet, and asking for it raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from infinitevl_jax.ops.delta_rule.chunked import chunked_gated_delta_rule

_F32 = jnp.float32
# Measured on an H200 at B1 T65536 forward (benchmarks/delta_rule_gpu_tuning.py): V-blocks of 32
# (128 programs for 16 heads, filling the GPU) with 2 pipeline stages on the chunk loop: 13.2 ms,
# against 18.9 ms for 64 / 1 stage; 128-wide blocks, or 3 stages at 64, exceed shared memory.
MAX_BLOCK_V = 32  # V-block per program: B * H * V / MAX_BLOCK_V programs walk in parallel
TRITON_PARAMS = dict(num_warps=4, num_stages=2)
# In-kernel float32 matmuls on GPU, see _backend_params. These three are read when a kernel is
# first traced (Pallas caches traced kernels): benchmarks/delta_rule_gpu_tuning.py sets them
# in a fresh process per setting.
GPU_PRECISION = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
MIN_DOT_DIM = 16  # Triton's smallest dot operand dimension


def _dot(a, b, precision, contract=((1,), (0,))):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=_F32)


def _walk_forward_kernel(w_ref, u_ref, k_ref, d_ref, s0_ref, states_ref, v_new_ref, final_ref, *, precision):
    """One program: refs w, k ``[N, C, K]``; u, v_new ``[N, C, BV]``; d ``[N, K]`` (chunk decay
    repeated over K); s0, final ``[K, BV]``; states ``[N, K, BV]``."""

    def chunk(n, state):
        states_ref[n] = state.astype(states_ref.dtype)
        v_new = u_ref[n].astype(_F32) - _dot(w_ref[n].astype(_F32), state, precision)
        v_new_ref[n] = v_new.astype(v_new_ref.dtype)
        update = _dot(k_ref[n].astype(_F32), v_new, precision, contract=((0,), (0,)))  # k_out^T V'
        return d_ref[n].astype(_F32)[:, None] * state + update

    final_ref[...] = jax.lax.fori_loop(0, w_ref.shape[0], chunk, s0_ref[...].astype(_F32)).astype(final_ref.dtype)


def _walk_backward_kernel(w_ref, k_ref, d_ref, states_ref, v_new_ref, d_states_ref, d_v_new_ref, d_final_ref,
                          d_w_ref, d_u_ref, d_k_ref, d_d_ref, d_s0_ref, *, precision):
    """Reverse walk of one program; d_w, d_k ``[N, C, K]`` and d_d ``[N, K]`` are this V-block's
    partial sums."""
    n_chunks = w_ref.shape[0]

    def chunk(i, d_state):
        n = n_chunks - 1 - i
        state = states_ref[n].astype(_F32)
        k_out = k_ref[n].astype(_F32)
        d_v = d_v_new_ref[n].astype(_F32) + _dot(k_out, d_state, precision)
        d_u_ref[n] = d_v.astype(d_u_ref.dtype)
        d_w_ref[n] = (-_dot(d_v, state, precision, contract=((1,), (1,)))).astype(d_w_ref.dtype)
        d_k_ref[n] = _dot(v_new_ref[n].astype(_F32), d_state, precision, contract=((1,), (1,))).astype(d_k_ref.dtype)
        d_d_ref[n] = jnp.sum(state * d_state, axis=1).astype(d_d_ref.dtype)
        w = w_ref[n].astype(_F32)
        return (d_ref[n].astype(_F32)[:, None] * d_state - _dot(w, d_v, precision, contract=((0,), (0,)))
                + d_states_ref[n].astype(_F32))

    d_s0_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, d_final_ref[...].astype(_F32)).astype(d_s0_ref.dtype)


def _backend_params():
    """``(interpret, compiler_params, precision)`` for the default backend.

    GPU matmuls run as 3xTF32 (``TF32_TF32_F32_X3``): float32-level accuracy on tensor cores.
    Measured on an H200 at T16384 (benchmarks/delta_rule_gpu_tuning.py, RESULTS.md): plain TF32
    (Triton's default, and what ``Precision.HIGH`` lowers to) left 4e-4 relative error in the
    state; IEEE float32 (``HIGHEST``) ran ~30x slower than TF32 end to end at 64-wide V-blocks
    (benchmarks/delta_rule_gpu.py) and runs out of resources at the chosen launch settings.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return False, pltriton.CompilerParams(**TRITON_PARAMS), GPU_PRECISION
    if backend == "cpu":
        return True, None, jax.lax.Precision.HIGHEST
    raise NotImplementedError(
        f"impl='pallas' has no kernel for backend {backend!r} yet (the Mosaic TPU kernel is not written); "
        "use impl='chunked'")


# BlockSpecs over the grid (group g = batch x head, V-block j); the group axis is squeezed.
def _by_group(*block):
    """The whole ``block`` of group g (shared by all V-blocks)."""
    return pl.BlockSpec((pl.squeezed, *block), lambda g, j: (g,) + (0,) * len(block))


def _by_group_v(*block):
    """Group g, V-block j along the last axis."""
    return pl.BlockSpec((pl.squeezed, *block), lambda g, j: (g,) + (0,) * (len(block) - 1) + (j,))


def _partial_sum(*block):
    """Group g's partial result from V-block j (summed over j afterwards)."""
    return pl.BlockSpec((pl.squeezed, pl.squeezed, *block), lambda g, j: (g, j) + (0,) * len(block))


def _block_v(d_v):
    return min(d_v, MAX_BLOCK_V)


def _forward_call(w, u, k_out, decay, s0):
    """Flat-batch forward: w, k_out ``[G, N, C, K]``, u ``[G, N, C, V]``, decay ``[G, N, K]``, s0 ``[G, K, V]``."""
    groups, n, c, d_k = w.shape
    d_v = u.shape[-1]
    bv = _block_v(d_v)
    interpret, params, precision = _backend_params()
    return pl.pallas_call(
        functools.partial(_walk_forward_kernel, precision=precision),
        grid=(groups, d_v // bv),
        in_specs=[_by_group(n, c, d_k), _by_group_v(n, c, bv), _by_group(n, c, d_k), _by_group(n, d_k),
                  _by_group_v(d_k, bv)],
        out_specs=[_by_group_v(n, d_k, bv), _by_group_v(n, c, bv), _by_group_v(d_k, bv)],
        out_shape=[jax.ShapeDtypeStruct((groups, n, d_k, d_v), _F32),
                   jax.ShapeDtypeStruct((groups, n, c, d_v), _F32),
                   jax.ShapeDtypeStruct((groups, d_k, d_v), _F32)],
        interpret=interpret, compiler_params=params, name="gdn_state_walk_fwd",
    )(w, u, k_out, decay, s0)


def _backward_call(w, k_out, decay, states, v_new, d_states, d_v_new, d_final):
    groups, n, c, d_k = w.shape
    d_v = v_new.shape[-1]
    bv = _block_v(d_v)
    blocks_v = d_v // bv
    interpret, params, precision = _backend_params()
    d_w, d_u, d_k, d_d, d_s0 = pl.pallas_call(
        functools.partial(_walk_backward_kernel, precision=precision),
        grid=(groups, blocks_v),
        in_specs=[_by_group(n, c, d_k), _by_group(n, c, d_k), _by_group(n, d_k), _by_group_v(n, d_k, bv),
                  _by_group_v(n, c, bv), _by_group_v(n, d_k, bv), _by_group_v(n, c, bv), _by_group_v(d_k, bv)],
        out_specs=[_partial_sum(n, c, d_k), _by_group_v(n, c, bv), _partial_sum(n, c, d_k), _partial_sum(n, d_k),
                   _by_group_v(d_k, bv)],
        out_shape=[jax.ShapeDtypeStruct((groups, blocks_v, n, c, d_k), _F32),
                   jax.ShapeDtypeStruct((groups, n, c, d_v), _F32),
                   jax.ShapeDtypeStruct((groups, blocks_v, n, c, d_k), _F32),
                   jax.ShapeDtypeStruct((groups, blocks_v, n, d_k), _F32),
                   jax.ShapeDtypeStruct((groups, d_k, d_v), _F32)],
        interpret=interpret, compiler_params=params, name="gdn_state_walk_bwd",
    )(w, k_out, decay, states, v_new, d_states, d_v_new, d_final)
    return d_w.sum(1), d_u, d_k.sum(1), d_d.sum(1), d_s0


@jax.custom_vjp
def _walk(w, u, k_out, decay, s0):
    return _forward_call(w, u, k_out, decay, s0)


def _walk_fwd(w, u, k_out, decay, s0):
    states, v_new, final = _forward_call(w, u, k_out, decay, s0)
    return (states, v_new, final), (w, k_out, decay, states, v_new)


def _walk_bwd(residuals, cotangents):
    w, k_out, decay, states, v_new = residuals
    return _backward_call(w, k_out, decay, states, v_new, *cotangents)


_walk.defvjp(_walk_fwd, _walk_bwd)


def _next_power_of_two(x, minimum=MIN_DOT_DIM):
    return max(minimum, 1 << (x - 1).bit_length())


def _pad_last(x, size):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def pallas_walk_states(terms, initial_state):
    """Drop-in for ``chunked.walk_states`` running the Pallas kernels.

    Head dims are zero-padded to powers of two (>= 16) for Triton; zero rows and columns change
    nothing in the recurrence and are sliced off.
    """
    batch, heads, n, c, d_k = terms.w.shape
    d_v = terms.u.shape[-1]
    pk, pv = _next_power_of_two(d_k), _next_power_of_two(d_v)
    flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
    w, k_out = (_pad_last(flat(x), pk) for x in (terms.w, terms.k_out))
    u = _pad_last(flat(terms.u), pv)
    decay = jnp.broadcast_to(flat(terms.decay)[..., None], (batch * heads, n, pk))
    s0 = jnp.pad(flat(initial_state), ((0, 0), (0, pk - d_k), (0, pv - d_v)))
    states, v_new, final = _walk(w, u, k_out, decay, s0)
    unflat = lambda x: x.reshape(batch, heads, *x.shape[1:])
    return (unflat(states[..., :d_k, :d_v]), unflat(v_new[..., :d_v]), unflat(final[:, :d_k, :d_v]))


# Same contract as ``chunked_gated_delta_rule``; the chunk walk runs in Pallas.
pallas_gated_delta_rule = functools.partial(chunked_gated_delta_rule, walk=pallas_walk_states)
