"""The sequential part of the chunked gated delta rule, shared by the Pallas GPU and TPU kernels.

The chunk-parallel WY/UT work and the outputs (``chunked_gated_delta_rule``) are batched matmuls
that XLA runs well. What XLA runs badly is the walk across chunks: a ``lax.scan`` round-trips
the ``[K, V]`` state through HBM on every chunk. The Pallas kernels keep a ``[K, BV]`` slice of
the state on-chip (float32) per (batch x head, V-block) and walk the chunks:

    forward, chunk n:   S_n is stored;  V'_n = U_n - W_n S_n;  S_{n+1} = d_n S_n + k_out_n^T V'_n
    backward, n = N-1..0, carrying dS = dL/dS_{n+1} (starting from dL/dS_final):
        dV   = dL/dV'_n + k_out_n dS            dU_n = dV
        dW_n = -dV S_n^T                        dk_out_n = V'_n dS^T
        dd_n = <S_n, dS>                        dS <- d_n dS - W_n^T dV + dL/dS_n

The backward recomputes nothing per token and reads the saved chunk-entry states: memory is
O(T (K + V) + (T / C) K V) per head. W, k_out and dd partial sums over V-blocks are added in XLA.
This module holds the per-chunk math (used inside both backends' kernels) and the
``custom_vjp`` wiring; ``pallas_gpu`` (Triton, a loop over chunks inside each program) and
``pallas_tpu`` (Mosaic, the chunk axis a sequential grid axis, state in VMEM scratch) hold the
kernels and their launches.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


def dot(a, b, precision, contract=((1,), (0,))):
    """2-D ``dot_general`` with float32 accumulation."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32)


def forward_step(load, store, state, precision):
    """One chunk of the forward walk; returns S_{n+1} ``[K, BV]`` (float32).

    ``load(name)`` returns chunk n's float32 tile: ``w``, ``k_out`` ``[C, K]``, ``u`` ``[C, BV]``,
    ``decay`` ``[K, 1]``; ``store(name, value)`` writes ``states`` (S_n ``[K, BV]``) and ``v_new``
    (V'_n ``[C, BV]``). Tiles are loaded where they are first needed and results stored as soon as
    they exist: on GPU each load and store is an instruction at that point of the program, and
    loading everything up front made the Triton kernels 1.6x slower (register pressure).
    """
    store("states", state)
    v_new = load("u") - dot(load("w"), state, precision)
    store("v_new", v_new)
    update = dot(load("k_out"), v_new, precision, contract=((0,), (0,)))
    return load("decay") * state + update


def backward_step(load, store, d_state, precision):
    """One chunk of the reverse walk, from ``d_state`` = dL/dS_{n+1}; returns dL/dS_n.

    ``load`` also gives ``states`` (S_n), ``v_new``, and the incoming cotangents ``d_states``
    (dL/dS_n from outside) and ``d_v_new``; ``store`` writes ``d_u`` ``[C, BV]``, this V-block's
    parts of ``d_w`` and ``d_k_out`` ``[C, K]`` and of ``d_decay`` ``[K, 1]``.
    """
    state = load("states")
    d_v = load("d_v_new") + dot(load("k_out"), d_state, precision)
    store("d_u", d_v)
    store("d_w", -dot(d_v, state, precision, contract=((1,), (1,))))
    store("d_k_out", dot(load("v_new"), d_state, precision, contract=((1,), (1,))))
    store("d_decay", jnp.sum(state * d_state, axis=1, keepdims=True))
    carried = dot(load("w"), d_v, precision, contract=((0,), (0,)))
    return load("decay") * d_state - carried + load("d_states")


class WalkCalls(NamedTuple):
    """A backend's kernel launches on flat groups G = batch x heads.

    forward(w, u, k_out, decay, s0) -> (states [G,N,K,V], v_new [G,N,C,V], final [G,K,V]) with
      w, k_out ``[G, N, C, K]``, u ``[G, N, C, V]``, decay ``[G, N, K, 1]`` (the chunk's total
      decay repeated over K: a column per chunk, so no kernel reshapes it), s0 ``[G, K, V]``;
    backward(w, k_out, decay, states, v_new, d_states, d_v_new, d_final) ->
      (d_w, d_u, d_k_out, d_decay, d_s0), V-block partial sums already added.
    """

    forward: Callable
    backward: Callable


def forward_out_shapes(groups: int, n: int, c: int, d_k: int, d_v: int) -> list[jax.ShapeDtypeStruct]:
    """Outputs of every backend's forward walk kernel: states, v_new, final state (float32)."""
    return [jax.ShapeDtypeStruct((groups, n, d_k, d_v), F32), jax.ShapeDtypeStruct((groups, n, c, d_v), F32),
            jax.ShapeDtypeStruct((groups, d_k, d_v), F32)]


def backward_out_shapes(groups: int, blocks_v: int, n: int, c: int, d_k: int, d_v: int) -> list[jax.ShapeDtypeStruct]:
    """Outputs of every backend's backward walk kernel: per-V-block partial d_w, d_k_out and
    d_decay (summed by the caller), d_u, d_s0 (float32)."""
    return [jax.ShapeDtypeStruct((groups, blocks_v, n, c, d_k), F32), jax.ShapeDtypeStruct((groups, n, c, d_v), F32),
            jax.ShapeDtypeStruct((groups, blocks_v, n, c, d_k), F32),
            jax.ShapeDtypeStruct((groups, blocks_v, n, d_k, 1), F32), jax.ShapeDtypeStruct((groups, d_k, d_v), F32)]


def make_walk(calls: WalkCalls) -> Callable:
    """The flat-group walk with the kernels' hand-written reverse walk as its VJP."""

    @jax.custom_vjp
    def walk(w, u, k_out, decay, s0):
        return calls.forward(w, u, k_out, decay, s0)

    def walk_fwd(w, u, k_out, decay, s0):
        states, v_new, final = calls.forward(w, u, k_out, decay, s0)
        return (states, v_new, final), (w, k_out, decay, states, v_new)

    def walk_bwd(residuals, cotangents):
        return calls.backward(*residuals, *cotangents)

    walk.defvjp(walk_fwd, walk_bwd)
    return walk


def _pad_last(x, size):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def walk_states_with(walk: Callable, terms, initial_state, padded_dims: Callable[[int, int], tuple[int, int]]):
    """Drop-in for ``chunked.walk_states``: flattens batch x heads, pads the head dims to
    ``padded_dims(d_k, d_v)`` (zero rows and columns change nothing in the recurrence), runs
    ``walk`` and slices the padding off."""
    batch, heads, n, c, d_k = terms.w.shape
    d_v = terms.u.shape[-1]
    pk, pv = padded_dims(d_k, d_v)
    flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
    w, k_out = (_pad_last(flat(x), pk) for x in (terms.w, terms.k_out))
    u = _pad_last(flat(terms.u), pv)
    decay = jnp.broadcast_to(flat(terms.decay)[..., None, None], (batch * heads, n, pk, 1))
    s0 = jnp.pad(flat(initial_state), ((0, 0), (0, pk - d_k), (0, pv - d_v)))
    states, v_new, final = walk(w, u, k_out, decay, s0)
    unflat = lambda x: x.reshape(batch, heads, *x.shape[1:])
    return (unflat(states[..., :d_k, :d_v]), unflat(v_new[..., :d_v]), unflat(final[:, :d_k, :d_v]))
