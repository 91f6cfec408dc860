"""Pallas (Mosaic TPU) kernels for the walk across chunks of the chunked gated delta rule.

The math and the ``custom_vjp`` wiring live in ``pallas_walk``. On TPU the chunk axis is the
last grid axis, marked ``arbitrary`` (sequential on one core), and the ``[K, BV]`` float32 state
lives in a VMEM scratch buffer across its steps; the (batch x head, V-block) axes are
``parallel``. Each grid step moves one chunk's tiles HBM <-> VMEM, which Mosaic pipelines
(double-buffers) behind the previous step's matmuls. The backward walks the chunk axis in
reverse through its index maps.

Tiles are legal on TPU by construction: every block's last two dims are either the array's
full dims or (C, 128-multiples): C = 64 rows (a multiple of 8), K whole, V split in
``BLOCK_V`` = 128-lane blocks when it divides V (else whole). The per-chunk decay travels as a
``[K, 1]`` column (full dims). Matmuls take the terms' dtype (float32 or bf16) at HIGHEST
precision with float32 accumulation; the carried state is float32.

On CPU the same kernels run in the TPU interpreter (``pltpu.InterpretParams``), and tests lower
them for TPU through ``jax.export`` (the Mosaic lowering runs without a TPU).
"""

from __future__ import annotations


import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from infinitevl_jax.ops.delta_rule.pallas_walk import (F32, WalkCalls, backward_out_shapes, backward_step,
                                                     forward_out_shapes, forward_step, make_walk,
                                                     walk_states_with)

BLOCK_V = 128  # lanes of a TPU vreg; V-blocks of this width walk in parallel
_PRECISION = jax.lax.Precision.HIGHEST
_SEMANTICS = ("parallel", "parallel", "arbitrary")


def _launch_params():
    """``(interpret, compiler_params)``: Mosaic on TPU, the TPU interpreter elsewhere."""
    interpret = False if jax.default_backend() == "tpu" else pltpu.InterpretParams()
    return interpret, pltpu.CompilerParams(dimension_semantics=_SEMANTICS)


def _block_v(d_v):
    return BLOCK_V if d_v % BLOCK_V == 0 else d_v


# BlockSpecs over the grid (group g, V-block j, step i); ``chunk(i)`` is the chunk step i reads.
def _chunk_tile(rows, cols, chunk, split_v):
    """Tile ``[rows, cols]`` of chunk ``chunk(i)`` of a ``[G, N, rows, cols_total]`` array."""
    return pl.BlockSpec((pl.squeezed, pl.squeezed, rows, cols),
                        lambda g, j, i: (g, chunk(i), 0, j if split_v else 0))


def _state_tile(d_k, bv):
    """Group g's ``[K, BV]`` state block j of a ``[G, K, V]`` array (the same block at every step)."""
    return pl.BlockSpec((pl.squeezed, d_k, bv), lambda g, j, i: (g, 0, j))


def _tile_io(refs: dict):
    """``load``/``store`` of the current grid step's tiles for the shared step math."""

    def load(name):
        return refs[name][...]

    def store(name, value):
        refs[name][...] = value.astype(refs[name].dtype)

    return load, store


def _walk_forward_kernel(w_ref, u_ref, k_ref, d_ref, s0_ref, states_ref, v_new_ref, final_ref, state_scr):
    """Grid step i = chunk i: tiles w, k ``[C, K]``, u, v_new ``[C, BV]``, d ``[K, 1]``; s0,
    final, states ``[K, BV]``; ``state_scr`` carries S_i across steps."""
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        state_scr[...] = s0_ref[...].astype(F32)

    refs = dict(w=w_ref, u=u_ref, k_out=k_ref, decay=d_ref, states=states_ref, v_new=v_new_ref)
    state = forward_step(*_tile_io(refs), state_scr[...], _PRECISION)
    state_scr[...] = state

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = state.astype(final_ref.dtype)


def _walk_backward_kernel(w_ref, k_ref, d_ref, d_states_ref, d_v_new_ref, d_final_ref, d_u_ref, d_next_ref,
                          d_s0_ref, d_state_scr):
    """Grid step i = chunk N-1-i; ``d_state_scr`` carries dL/dS_{n+1} across steps."""
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        d_state_scr[...] = d_final_ref[...].astype(F32)

    refs = dict(w=w_ref, k_out=k_ref, decay=d_ref, d_states=d_states_ref, d_v_new=d_v_new_ref, d_u=d_u_ref,
                d_next=d_next_ref)
    d_state = backward_step(*_tile_io(refs), d_state_scr[...], _PRECISION)
    d_state_scr[...] = d_state

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        d_s0_ref[...] = d_state.astype(d_s0_ref.dtype)


def _forward_call(w, u, k_out, decay, s0):
    """``WalkCalls.forward`` (shapes there)."""
    groups, n, c, d_k = w.shape
    d_v = u.shape[-1]
    bv = _block_v(d_v)
    interpret, params = _launch_params()
    forward = lambda i: i
    return pl.pallas_call(
        _walk_forward_kernel,
        grid=(groups, d_v // bv, n),
        in_specs=[_chunk_tile(c, d_k, forward, False), _chunk_tile(c, bv, forward, True),
                  _chunk_tile(c, d_k, forward, False), _chunk_tile(d_k, 1, forward, False), _state_tile(d_k, bv)],
        out_specs=[_chunk_tile(d_k, bv, forward, True), _chunk_tile(c, bv, forward, True), _state_tile(d_k, bv)],
        out_shape=forward_out_shapes(groups, n, c, d_k, d_v, w.dtype),
        scratch_shapes=[pltpu.VMEM((d_k, bv), F32)],
        interpret=interpret, compiler_params=params, name="gdn_state_walk_fwd_tpu",
    )(w, u, k_out, decay, s0)


def _backward_call(w, k_out, decay, d_states, d_v_new, d_final):
    """``WalkCalls.backward`` (shapes there)."""
    groups, n, c, d_k = w.shape
    d_v = d_v_new.shape[-1]
    bv = _block_v(d_v)
    interpret, params = _launch_params()
    reverse = lambda i: n - 1 - i
    return pl.pallas_call(
        _walk_backward_kernel,
        grid=(groups, d_v // bv, n),
        in_specs=[_chunk_tile(c, d_k, reverse, False), _chunk_tile(c, d_k, reverse, False),
                  _chunk_tile(d_k, 1, reverse, False), _chunk_tile(d_k, bv, reverse, True),
                  _chunk_tile(c, bv, reverse, True), _state_tile(d_k, bv)],
        out_specs=[_chunk_tile(c, bv, reverse, True), _chunk_tile(d_k, bv, reverse, True), _state_tile(d_k, bv)],
        out_shape=backward_out_shapes(groups, n, c, d_k, d_v, w.dtype),
        scratch_shapes=[pltpu.VMEM((d_k, bv), F32)],
        interpret=interpret, compiler_params=params, name="gdn_state_walk_bwd_tpu",
    )(w, k_out, decay, d_states, d_v_new, d_final)


_walk = make_walk(WalkCalls(_forward_call, _backward_call))


def tpu_walk_states(terms, initial_state):
    """``chunked.walk_states`` on the Mosaic TPU kernels (no padding: blocks use full head dims)."""
    return walk_states_with(_walk, terms, initial_state, lambda d_k, d_v: (d_k, d_v))
