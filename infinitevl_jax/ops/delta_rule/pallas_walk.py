"""The sequential part of the chunked gated delta rule, shared by the Pallas GPU and TPU kernels.

The chunk-parallel WY/UT work and the outputs (``chunked_gated_delta_rule``) are batched matmuls
that XLA runs well. What XLA runs badly is the walk across chunks: a ``lax.scan`` round-trips
the ``[K, V]`` state through HBM on every chunk. The Pallas kernels keep a ``[K, BV]`` slice of
the state on-chip (float32) per (batch x head, V-block) and walk the chunks:

    forward, chunk n:   S_n is stored;  V'_n = U_n - W_n S_n;  S_{n+1} = d_n S_n + k_out_n^T V'_n
    backward, n = N-1..0, carrying dS = dL/dS_{n+1} (starting from dL/dS_final):
        dV   = dL/dV'_n + k_out_n dS            dU_n = dV;  dS is stored per chunk
        dS  <- d_n dS - W_n^T dV + dL/dS_n
    then, chunk-parallel in XLA from the stored dV and dS_{n+1}:
        dW_n = -dV S_n^T    dk_out_n = V'_n dS_{n+1}^T    dd_n = <S_n, dS_{n+1}>

The backward recomputes nothing per token and reads the saved chunk-entry states: memory is
O(T (K + V) + (T / C) K V) per head. Entry states, V', dV and dS_{n+1} are stored in the
terms' dtype (bf16 for bf16 inputs, halving the walk's HBM traffic, as FLA stores its chunk
states); the carried state is float32 on-chip.

This module holds the per-chunk math (used inside both backends' kernels) and the
``custom_vjp`` wiring; ``pallas_gpu`` (Triton, a loop over chunks inside each program) and
``pallas_tpu`` (Mosaic, the chunk axis a sequential grid axis, state in VMEM scratch) hold the
kernels and their launches.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from infinitevl_jax.ops.chunk_math import mm

F32 = jnp.float32


def dot(a, b, precision, contract=((1,), (0,))):
    """2-D ``dot_general`` with float32 accumulation."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32)


def forward_step(load, store, state, precision):
    """One chunk of the forward walk; returns S_{n+1} ``[K, BV]`` (float32).

    ``load(name)`` returns chunk n's tile in its stored dtype: ``w``, ``k_out`` ``[C, K]``,
    ``u`` ``[C, BV]`` (the terms' dtype, float32 or bf16), ``decay`` ``[K, 1]`` (float32);
    ``store(name, value)`` writes ``states`` (S_n ``[K, BV]``) and ``v_new`` (V'_n ``[C, BV]``),
    cast to their arrays' dtype. Matmul operands take the terms' dtype (bf16 terms: the state
    and V' enter the matmuls rounded to bf16, FLA's choice) and accumulate in float32; the
    carried state stays float32. Tiles are loaded where they are first needed and results
    stored as soon as they exist: on GPU each load and store is an instruction at that point of
    the program, and loading everything up front made the Triton kernels 1.6x slower (register
    pressure).
    """
    store("states", state)
    w = load("w")
    v_new = load("u").astype(F32) - dot(w, state.astype(w.dtype), precision)
    store("v_new", v_new)
    update = dot(load("k_out"), v_new.astype(w.dtype), precision, contract=((0,), (0,)))
    return load("decay") * state + update


def backward_step(load, store, d_state, precision):
    """One chunk of the reverse walk, from ``d_state`` = dL/dS_{n+1}; returns dL/dS_n (float32).

    ``load`` gives ``w``, ``k_out``, ``decay`` and the incoming cotangents ``d_states`` (dL/dS_n
    from outside, ``[K, BV]``) and ``d_v_new`` (``[C, BV]``); ``store`` writes ``d_u`` = dV
    ``[C, BV]`` and ``d_next`` = dL/dS_{n+1} ``[K, BV]``, from which ``chunk_gradients`` forms
    dW, dk_out and dd outside the walk. Operand dtypes as in ``forward_step``.
    """
    k_out = load("k_out")
    operand = lambda x: x.astype(k_out.dtype)
    store("d_next", d_state)
    d_v = load("d_v_new").astype(F32) + dot(k_out, operand(d_state), precision)
    store("d_u", d_v)
    carried = dot(load("w"), operand(d_v), precision, contract=((0,), (0,)))
    return load("decay") * d_state - carried + load("d_states").astype(F32)


def chunk_gradients(states, v_new, d_u, d_next):
    """The per-chunk gradients that need no walk, all chunks at once (batched matmuls over the
    whole V, so the walk kernels write no per-V-block partial sums):
    dW_n = -dV_n S_n^T, dk_out_n = V'_n dS_{n+1}^T (``[G, N, C, K]``, the terms' dtype) and
    dd_n = <S_n, dS_{n+1}> (``[G, N, K, 1]`` float32: the sum over V, summed over K by the
    caller's broadcast). Matmul operands in the terms' dtype, float32 accumulation."""
    dtype = states.dtype
    d_w = -mm("gncv,gnkv->gnck", d_u, states, dtype=dtype)
    d_k_out = mm("gncv,gnkv->gnck", v_new, d_next, dtype=dtype)
    d_decay = jnp.sum(states.astype(F32) * d_next.astype(F32), axis=-1, keepdims=True)
    return d_w.astype(dtype), d_k_out.astype(dtype), d_decay


class WalkCalls(NamedTuple):
    """A backend's kernel launches on flat groups G = batch x heads.

    forward(w, u, k_out, decay, s0) -> (states [G,N,K,V], v_new [G,N,C,V], final [G,K,V]) with
      w, k_out ``[G, N, C, K]``, u ``[G, N, C, V]`` (all three in the terms' dtype), decay
      ``[G, N, K, 1]`` (the chunk's total decay repeated over K: a column per chunk, so no kernel
      reshapes it), s0 ``[G, K, V]``; states and v_new in the terms' dtype, final float32;
    backward(w, k_out, decay, d_states, d_v_new, d_final) -> (d_u [G,N,C,V], d_next [G,N,K,V],
      d_s0 [G,K,V]): dV and dL/dS_{n+1} per chunk in the terms' dtype, d_s0 float32;
    gradients(states, v_new, d_u, d_next) -> (dW, dk_out, dd): ``chunk_gradients`` or a kernel
      of the same contract.
    """

    forward: Callable
    backward: Callable
    gradients: Callable = chunk_gradients


def forward_out_shapes(groups: int, n: int, c: int, d_k: int, d_v: int, dtype) -> list[jax.ShapeDtypeStruct]:
    """Outputs of every backend's forward walk kernel: states and v_new in the terms' ``dtype``,
    the final state in float32."""
    return [jax.ShapeDtypeStruct((groups, n, d_k, d_v), dtype), jax.ShapeDtypeStruct((groups, n, c, d_v), dtype),
            jax.ShapeDtypeStruct((groups, d_k, d_v), F32)]


def backward_out_shapes(groups: int, n: int, c: int, d_k: int, d_v: int, dtype) -> list[jax.ShapeDtypeStruct]:
    """Outputs of every backend's backward walk kernel: d_u and d_next in the terms' ``dtype``,
    d_s0 in float32."""
    return [jax.ShapeDtypeStruct((groups, n, c, d_v), dtype), jax.ShapeDtypeStruct((groups, n, d_k, d_v), dtype),
            jax.ShapeDtypeStruct((groups, d_k, d_v), F32)]


def make_walk(calls: WalkCalls) -> Callable:
    """The flat-group walk with the kernels' hand-written reverse walk as its VJP."""

    @jax.custom_vjp
    def walk(w, u, k_out, decay, s0):
        return calls.forward(w, u, k_out, decay, s0)

    def walk_fwd(w, u, k_out, decay, s0):
        states, v_new, final = calls.forward(w, u, k_out, decay, s0)
        return (states, v_new, final), (w, k_out, decay, states, v_new)

    def walk_bwd(residuals, cotangents):
        w, k_out, decay, states, v_new = residuals
        d_states, d_v_new, d_final = cotangents
        d_u, d_next, d_s0 = calls.backward(w, k_out, decay, d_states, d_v_new, d_final)
        d_w, d_k_out, d_decay = calls.gradients(states, v_new, d_u, d_next)
        return d_w, d_u, d_k_out, d_decay, d_s0

    walk.defvjp(walk_fwd, walk_bwd)
    return walk


def pad_trailing(x, *sizes):
    """``x`` with its last ``len(sizes)`` dims zero-padded up to ``sizes`` (Triton's power-of-two
    head dims; zero rows and columns change nothing in the delta rule)."""
    widths = [(0, 0)] * (x.ndim - len(sizes)) + [(0, size - dim) for size, dim in zip(sizes, x.shape[-len(sizes):])]
    return jnp.pad(x, widths)


def flat_walk_inputs(terms, initial_state, pk: int, pv: int) -> tuple:
    """``WalkCalls.forward``'s inputs from ``ChunkTerms`` ``[B, H, N, ...]`` and the state
    ``[B, H, K, V]``: batch x heads flattened to groups, head dims zero-padded to ``pk``/``pv``
    (zero rows and columns change nothing in the recurrence), the chunk decay as a ``[K, 1]``
    column per chunk. Returns ``(w, u, k_out, decay, s0)``."""
    batch, heads, n = terms.w.shape[:3]
    flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
    w, k_out = (pad_trailing(flat(x), pk) for x in (terms.w, terms.k_out))
    u = pad_trailing(flat(terms.u), pv)
    decay = jnp.broadcast_to(flat(terms.decay)[..., None, None], (batch * heads, n, pk, 1))
    return w, u, k_out, decay, pad_trailing(flat(initial_state), pk, pv)


def walk_states_with(walk: Callable, terms, initial_state, padded_dims: Callable[[int, int], tuple[int, int]]):
    """Drop-in for ``chunked.walk_states``: flattens batch x heads, pads the head dims to
    ``padded_dims(d_k, d_v)`` (zero rows and columns change nothing in the recurrence), runs
    ``walk`` and slices the padding off."""
    batch, heads, _, _, d_k = terms.w.shape
    d_v = terms.u.shape[-1]
    states, v_new, final = walk(*flat_walk_inputs(terms, initial_state, *padded_dims(d_k, d_v)))
    unflat = lambda x: x.reshape(batch, heads, *x.shape[1:])
    return (unflat(states[..., :d_k, :d_v]), unflat(v_new[..., :d_v]), unflat(final[:, :d_k, :d_v]))
