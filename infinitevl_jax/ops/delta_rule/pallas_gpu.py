"""Pallas (Triton) kernels of the chunked gated delta rule on GPU: the walk across chunks and
the outputs.

The walk's math and ``custom_vjp`` wiring live in ``pallas_walk``. Here one Pallas program per
(batch x head, V-block) holds its ``[K, BV]`` state slice in registers and walks all chunks in
a ``fori_loop``, reading the whole sequence's chunk terms through its BlockSpecs. The outputs
kernel (one program per group, chunk and V-block) forms ``q_in S + attn V'`` and writes it
straight into the ``[B, T, H, V]`` layout; its VJP is XLA's (the outputs are linear in each
operand). Those two serve differentiated calls; forward-only calls run the walk with the
outputs formed on the way (``gpu_walk_outputs``). ``gpu_walk_outputs_fused_backward`` fuses
differentiated calls the same way: its forward walk also keeps the entry states and V', and its
reverse walk forms the outputs' cotangents of both itself. After either reverse walk the
per-chunk gradients are XLA matmuls, or one kernel (``pallas_gpu_grads``, ``CHUNK_GRADIENTS``).

GPU lowering is Triton, chosen explicitly (``triton_launch``: jax 0.11 would otherwise lower
``pallas_call`` through Mosaic GPU; 0.12 defaults to Triton). On CPU the same kernels run in
interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from infinitevl_jax.ops.chunk_math import mm
from infinitevl_jax.ops.delta_rule import pallas_gpu_grads
from infinitevl_jax.ops.delta_rule.chunked import padded_outputs
from infinitevl_jax.ops.delta_rule.pallas_walk import (F32, WalkCalls, backward_out_shapes, backward_step,
                                                     chunk_gradients, dot, flat_walk_inputs, forward_out_shapes,
                                                     forward_step, make_walk, pad_trailing, walk_states_with)
from infinitevl_jax.ops.triton_launch import next_power_of_two, triton_backend
# Measured on an H200 at B1 T65536 forward (benchmarks/delta_rule_gpu_tuning.py, RESULTS.md):
# V-blocks of 32 (128 programs for 16 heads, filling the GPU) with 4 warps; pipeline stages on
# the chunk loop: 3 for 16-bit terms (6.65 ms end to end against 7.15 ms with 2; 64- and
# 128-wide blocks and 8 warps were slower), 2 for float32 terms (the setting measured for them;
# their tiles are twice the bytes).
MAX_BLOCK_V = 32  # V-block per program: B * H * V / MAX_BLOCK_V programs walk in parallel
MAX_BLOCK_V_OUT = 128  # V-block of the outputs kernel (one program per group, chunk and V-block)
TRITON_PARAMS = dict(num_warps=4)
NUM_STAGES_16BIT = 3
NUM_STAGES_F32 = 2
# In-kernel float32 matmuls on GPU, see backend_params. These settings are read when a kernel is
# first traced (Pallas caches traced kernels): benchmarks/delta_rule_gpu_tuning.py sets them
# in a fresh process per setting.
GPU_PRECISION = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
# The per-chunk gradients after the reverse walk: "xla" (batched matmuls, ``chunk_gradients``
# and the outputs' VJP) or "kernel" (``pallas_gpu_grads``: one pass reading each operand once;
# forward+backward 15.09 -> 14.15 ms at B1 T65536 with the fused backward on an H200,
# benchmarks/RESULTS.md). Read when a call is traced.
CHUNK_GRADIENTS = "kernel"


def _chunk_io(n, refs: dict):
    """``load``/``store`` of chunk n for the shared step math (``pallas_walk``); refs hold the
    whole sequence ``[N, ...]``."""

    def load(name):
        return refs[name][n]

    def store(name, value):
        refs[name][n] = value.astype(refs[name].dtype)

    return load, store


def _walk_forward_kernel(w_ref, u_ref, k_ref, d_ref, s0_ref, states_ref, v_new_ref, final_ref, *, precision):
    """One program: refs w, k ``[N, C, K]``; u, v_new ``[N, C, BV]``; d ``[N, K, 1]``; s0, final
    ``[K, BV]``; states ``[N, K, BV]``."""
    refs = dict(w=w_ref, u=u_ref, k_out=k_ref, decay=d_ref, states=states_ref, v_new=v_new_ref)
    chunk = lambda n, state: forward_step(*_chunk_io(n, refs), state, precision)
    final_ref[...] = jax.lax.fori_loop(0, w_ref.shape[0], chunk, s0_ref[...].astype(F32)).astype(final_ref.dtype)


def _walk_backward_kernel(w_ref, k_ref, d_ref, d_states_ref, d_v_new_ref, d_final_ref, d_u_ref, d_next_ref,
                          d_s0_ref, *, precision):
    """Reverse walk of one program; d_u ``[N, C, BV]``, d_next ``[N, K, BV]`` per chunk."""
    n_chunks = w_ref.shape[0]
    refs = dict(w=w_ref, k_out=k_ref, decay=d_ref, d_states=d_states_ref, d_v_new=d_v_new_ref, d_u=d_u_ref,
                d_next=d_next_ref)
    chunk = lambda i, d_state: backward_step(*_chunk_io(n_chunks - 1 - i, refs), d_state, precision)
    d_s0_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, d_final_ref[...].astype(F32)).astype(d_s0_ref.dtype)


def backend_params(terms_dtype, num_warps=None):
    """``(interpret, compiler_params, precision)`` for the default backend and terms of
    ``terms_dtype``; ``num_warps`` overrides ``TRITON_PARAMS``' (the terms kernels' own setting).

    16-bit terms: 16-bit operands at the tensor cores' native rate (float32 accumulation).
    float32 terms: GPU matmuls run as 3xTF32 (``TF32_TF32_F32_X3``): float32-level accuracy on
    tensor cores.
    Measured on an H200 at T16384 (benchmarks/delta_rule_gpu_tuning.py, RESULTS.md): plain TF32
    (Triton's default, and what ``Precision.HIGH`` lowers to) left 4e-4 relative error in the
    state; IEEE float32 (``HIGHEST``) ran ~30x slower than TF32 end to end at 64-wide V-blocks
    (benchmarks/delta_rule_gpu.py) and runs out of resources at the chosen launch settings.
    """
    f32 = terms_dtype == F32
    launch = dict(TRITON_PARAMS, **({} if num_warps is None else dict(num_warps=num_warps)))
    interpret, params = triton_backend(num_stages=NUM_STAGES_F32 if f32 else NUM_STAGES_16BIT, **launch)
    if interpret:
        return True, None, jax.lax.Precision.HIGHEST
    return False, params, GPU_PRECISION if f32 else None


# BlockSpecs over the grid (group g = batch x head, V-block j); the group axis is squeezed.
def _by_group(*block):
    """The whole ``block`` of group g (shared by all V-blocks)."""
    return pl.BlockSpec((pl.squeezed, *block), lambda g, j: (g,) + (0,) * len(block))


def _by_group_v(*block):
    """Group g, V-block j along the last axis."""
    return pl.BlockSpec((pl.squeezed, *block), lambda g, j: (g,) + (0,) * (len(block) - 1) + (j,))


def triton_dims(d_k: int, d_v: int) -> tuple[int, int]:
    """The Triton kernels' padded head dims: powers of two (>= 16)."""
    return next_power_of_two(d_k), next_power_of_two(d_v)


def _block_v(d_v):
    return min(d_v, MAX_BLOCK_V)


def _walk_call(kernel, name, groups, d_v, dtype, in_specs, out_specs, out_shape):
    """``kernel`` (taking ``precision``) as one program per (group, V-block) on this backend's
    launch settings for terms of ``dtype``."""
    interpret, params, precision = backend_params(dtype)
    return pl.pallas_call(functools.partial(kernel, precision=precision), grid=(groups, d_v // _block_v(d_v)),
                          in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                          compiler_params=params, name=name)


def _forward_call(w, u, k_out, decay, s0):
    """``WalkCalls.forward`` (shapes there)."""
    groups, n, c, d_k = w.shape
    d_v = u.shape[-1]
    bv = _block_v(d_v)
    return _walk_call(
        _walk_forward_kernel, "gdn_state_walk_fwd", groups, d_v, w.dtype,
        in_specs=[_by_group(n, c, d_k), _by_group_v(n, c, bv), _by_group(n, c, d_k), _by_group(n, d_k, 1),
                  _by_group_v(d_k, bv)],
        out_specs=[_by_group_v(n, d_k, bv), _by_group_v(n, c, bv), _by_group_v(d_k, bv)],
        out_shape=forward_out_shapes(groups, n, c, d_k, d_v, w.dtype),
    )(w, u, k_out, decay, s0)


def _backward_call(w, k_out, decay, d_states, d_v_new, d_final):
    """``WalkCalls.backward`` (shapes there)."""
    groups, n, c, d_k = w.shape
    d_v = d_v_new.shape[-1]
    bv = _block_v(d_v)
    return _walk_call(
        _walk_backward_kernel, "gdn_state_walk_bwd", groups, d_v, w.dtype,
        in_specs=[_by_group(n, c, d_k), _by_group(n, c, d_k), _by_group(n, d_k, 1), _by_group_v(n, d_k, bv),
                  _by_group_v(n, c, bv), _by_group_v(d_k, bv)],
        out_specs=[_by_group_v(n, c, bv), _by_group_v(n, d_k, bv), _by_group_v(d_k, bv)],
        out_shape=backward_out_shapes(groups, n, c, d_k, d_v, w.dtype),
    )(w, k_out, decay, d_states, d_v_new, d_final)


def _check_chunk_gradients():
    if CHUNK_GRADIENTS not in ("xla", "kernel"):
        raise ValueError(f"pallas_gpu.CHUNK_GRADIENTS must be 'xla' or 'kernel'; got {CHUNK_GRADIENTS!r}")
    return CHUNK_GRADIENTS == "kernel"


def _grads_kernel(*operands, **kwargs):
    """``pallas_gpu_grads.chunk_grads`` with this backend's launch (its own warps)."""
    backend = backend_params(operands[0].dtype, pallas_gpu_grads.NUM_WARPS)
    return pallas_gpu_grads.chunk_grads(*operands, **kwargs, backend=backend)


def _gradients(states, v_new, d_u, d_next):
    """``WalkCalls.gradients``: ``chunk_gradients`` in XLA, or in one kernel (``CHUNK_GRADIENTS``)."""
    if _check_chunk_gradients():
        return tuple(_grads_kernel(states, v_new, d_u, d_next))
    return chunk_gradients(states, v_new, d_u, d_next)


_walk = make_walk(WalkCalls(_forward_call, _backward_call, _gradients))


def gpu_walk_states(terms, initial_state):
    """``chunked.walk_states`` on the Triton kernels; head dims padded to powers of two (>= 16)."""
    return walk_states_with(_walk, terms, initial_state, triton_dims)


def _outputs_kernel(q_ref, a_ref, s_ref, v_ref, o_ref, *, precision):
    """One (group, chunk, V-block): o ``[C, BV]`` = q_in ``[C, K]`` S ``[K, BV]`` + attn ``[C, C]``
    V' ``[C, BV]``, float32 accumulation, stored in o's dtype."""
    o = dot(q_ref[...], s_ref[...], precision) + dot(a_ref[...], v_ref[...], precision)
    o_ref[...] = o.astype(o_ref.dtype)


def _outputs_call(q_in, attn, states, v_new):
    """``[B, H, N, ...]`` terms (``ChunkTerms`` layouts) -> o ``[B, N*C, H, V]`` in the terms'
    dtype, written by the kernel straight into the token-major layout (no transpose, no float32
    copy); head dims padded to powers of two (>= 16) for Triton."""
    batch, heads, n, c, d_k = q_in.shape
    d_v = v_new.shape[-1]
    pk, pv = triton_dims(d_k, d_v)
    flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
    q_in, states = pad_trailing(flat(q_in), pk), pad_trailing(flat(states), pk, pv)
    attn, v_new = flat(attn), pad_trailing(flat(v_new), pv)
    bv = min(pv, MAX_BLOCK_V_OUT)
    interpret, params, precision = backend_params(q_in.dtype)
    whole = lambda rows, cols: pl.BlockSpec((pl.squeezed, pl.squeezed, rows, cols), lambda g, i, j: (g, i, 0, 0))
    v_block = lambda rows: pl.BlockSpec((pl.squeezed, pl.squeezed, rows, bv), lambda g, i, j: (g, i, 0, j))
    o = pl.pallas_call(
        functools.partial(_outputs_kernel, precision=precision),
        grid=(batch * heads, n, pv // bv),
        in_specs=[whole(c, pk), whole(c, c), v_block(pk), v_block(c)],
        out_specs=pl.BlockSpec((pl.squeezed, c, pl.squeezed, bv), lambda g, i, j: (g // heads, i, g % heads, j)),
        out_shape=jax.ShapeDtypeStruct((batch, n * c, heads, pv), q_in.dtype),
        interpret=interpret, compiler_params=params, name="gdn_chunk_outputs",
    )(q_in, attn, states, v_new)
    return o[..., :d_v]


@jax.custom_vjp
def _outputs(q_in, attn, states, v_new):
    return _outputs_call(q_in, attn, states, v_new)


def _outputs_fwd(q_in, attn, states, v_new):
    return _outputs_call(q_in, attn, states, v_new), (q_in, attn, states, v_new)


def _outputs_bwd(residuals, d_o):
    """The outputs are linear in each operand: XLA's batched matmuls give the cotangents
    (``padded_outputs``' VJP at the same operand dtype)."""
    dtype = residuals[0].dtype
    _, vjp = jax.vjp(lambda *a: padded_outputs(*a, matmul_dtype=dtype), *residuals)
    return vjp(d_o.astype(F32))


_outputs.defvjp(_outputs_fwd, _outputs_bwd)


def gpu_chunk_outputs(terms, entry_states, v_new, seq_len, matmul_dtype):
    """``chunked.chunk_outputs`` on a Triton kernel: o ``[B, T, H, V]`` in the terms' dtype
    (``matmul_dtype``, which the terms are stored in)."""
    del matmul_dtype  # the terms carry it
    return _outputs(terms.q_in, terms.attn, entry_states, v_new)[:, :seq_len]


def _walk_outputs_kernel(w_ref, u_ref, k_ref, d_ref, q_ref, a_ref, s0_ref, o_ref, final_ref, *kept_refs, precision):
    """The forward walk with the outputs formed on the way (one program per group and V-block):
    refs as in ``_walk_forward_kernel`` plus q_in ``[N, C, K]`` and attn ``[N, C, C]``; o
    ``[N*C, BV]`` (the group's rows of ``[B, T, H, V]``). ``forward_step`` runs unchanged; its
    two stores become the outputs, ``o_n = q_in_n S_n + attn_n V'_n``, with the same operand
    dtypes as ``gdn_chunk_outputs`` (S_n and V'_n rounded to the terms' dtype), so neither the
    entry states nor V' reach HBM, unless ``kept_refs`` (states ``[N, K, BV]``, v_new
    ``[N, C, BV]``) are given: then both are stored too, for a backward."""
    c = w_ref.shape[1]
    kept = dict(zip(("states", "v_new"), kept_refs))

    def chunk(n, state):
        inter = []  # q_in_n S_n, from the "states" store to the "v_new" store of the same step

        def store(name, value):
            operand = value.astype(w_ref.dtype)
            if kept:
                kept[name][n] = operand
            if name == "states":
                inter.append(dot(q_ref[n], operand, precision))
            else:  # "v_new"
                o_ref[pl.ds(n * c, c), :] = (inter.pop() + dot(a_ref[n], operand, precision)).astype(o_ref.dtype)

        refs = dict(w=w_ref, u=u_ref, k_out=k_ref, decay=d_ref)
        return forward_step(lambda name: refs[name][n], store, state, precision)

    final_ref[...] = jax.lax.fori_loop(0, w_ref.shape[0], chunk, s0_ref[...].astype(F32)).astype(final_ref.dtype)


def _token_rows(heads, rows, bv):
    """BlockSpec of one group's ``rows`` token rows and V-block j in ``[B, T, H, V]`` (o, d_o)."""
    return pl.BlockSpec((pl.squeezed, rows, pl.squeezed, bv), lambda g, j: (g // heads, 0, g % heads, j))


def _walk_outputs_launch(heads, w, u, k_out, decay, q_in, attn, s0, keep=False):
    """``_walk_outputs_kernel`` on flat groups (``WalkCalls.forward``'s inputs plus q_in
    ``[G, N, C, K]`` and attn ``[G, N, C, C]``, head dims padded): o ``[B, N*C, H, V]`` in the
    terms' dtype and the final state ``[G, K, V]`` float32; with ``keep`` also the entry states
    ``[G, N, K, V]`` and V' ``[G, N, C, V]`` in the terms' dtype."""
    groups, n, c, pk = w.shape
    pv = u.shape[-1]
    bv = _block_v(pv)
    out_specs = [_token_rows(heads, n * c, bv), _by_group_v(pk, bv)]
    out_shape = [jax.ShapeDtypeStruct((groups // heads, n * c, heads, pv), w.dtype),
                 jax.ShapeDtypeStruct((groups, pk, pv), F32)]
    if keep:
        out_specs += [_by_group_v(n, pk, bv), _by_group_v(n, c, bv)]
        out_shape += forward_out_shapes(groups, n, c, pk, pv, w.dtype)[:2]
    return _walk_call(
        _walk_outputs_kernel, "gdn_walk_outputs_fwd", groups, pv, w.dtype,
        in_specs=[_by_group(n, c, pk), _by_group_v(n, c, bv), _by_group(n, c, pk), _by_group(n, pk, 1),
                  _by_group(n, c, pk), _by_group(n, c, c), _by_group_v(pk, bv)],
        out_specs=out_specs, out_shape=out_shape,
    )(w, u, k_out, decay, q_in, attn, s0)


def _walk_outputs_backward_kernel(w_ref, k_ref, d_ref, q_ref, a_ref, d_o_ref, d_final_ref, d_u_ref, d_next_ref,
                                  d_s0_ref, *, precision):
    """The reverse walk with the outputs' cotangents formed on the way (one program per group
    and V-block): ``backward_step`` runs unchanged, its loads of dL/dS_n and dL/dV'_n from the
    outputs being ``q_in_n^T dO_n`` ``[K, BV]`` and ``attn_n^T dO_n`` ``[C, BV]`` from d_o
    ``[N*C, BV]`` (the group's rows of ``[B, T, H, V]``), float32 accumulation. Other refs as in
    ``_walk_backward_kernel``."""
    n_chunks, c = w_ref.shape[:2]
    refs = dict(w=w_ref, k_out=k_ref, decay=d_ref, d_u=d_u_ref, d_next=d_next_ref)

    def chunk(i, d_state):
        n = n_chunks - 1 - i
        d_o = d_o_ref[pl.ds(n * c, c), :]
        from_outputs = dict(d_states=q_ref, d_v_new=a_ref)

        def load(name):
            if name in from_outputs:
                return dot(from_outputs[name][n], d_o, precision, contract=((0,), (0,)))
            return refs[name][n]

        def store(name, value):
            refs[name][n] = value.astype(refs[name].dtype)

        return backward_step(load, store, d_state, precision)

    d_s0_ref[...] = jax.lax.fori_loop(0, n_chunks, chunk, d_final_ref[...].astype(F32)).astype(d_s0_ref.dtype)


def _walk_outputs_backward_launch(heads, w, k_out, decay, q_in, attn, d_o, d_final):
    """``_walk_outputs_backward_kernel`` on flat groups: d_u ``[G, N, C, V]`` and d_next
    ``[G, N, K, V]`` in the terms' dtype, d_s0 ``[G, K, V]`` float32 (``WalkCalls.backward``'s
    outputs)."""
    groups, n, c, pk = w.shape
    pv = d_o.shape[-1]
    bv = _block_v(pv)
    return _walk_call(
        _walk_outputs_backward_kernel, "gdn_walk_outputs_bwd", groups, pv, w.dtype,
        in_specs=[_by_group(n, c, pk), _by_group(n, c, pk), _by_group(n, pk, 1), _by_group(n, c, pk),
                  _by_group(n, c, c), _token_rows(heads, n * c, bv), _by_group_v(pk, bv)],
        out_specs=[_by_group_v(n, c, bv), _by_group_v(n, pk, bv), _by_group_v(pk, bv)],
        out_shape=backward_out_shapes(groups, n, c, pk, pv, w.dtype),
    )(w, k_out, decay, q_in, attn, d_o, d_final)


def fused_backward(launch, backward_launch=None):
    """A forward walk that forms the outputs, ``launch(heads, w, u, k_out, decay, q_in, attn,
    s0, keep=False)`` on ``_walk_outputs_launch``'s inputs and outputs, as a ``custom_vjp``
    (``heads`` static) whose forward keeps the entry states and V' (``keep=True``) and whose VJP
    is a reverse walk with the outputs' cotangents formed inside it (``backward_launch``, by
    default ``_walk_outputs_backward_launch``), so the cotangents of the entry states and of V'
    never reach HBM either."""
    backward_launch = backward_launch or _walk_outputs_backward_launch

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def walk_outputs(heads, w, u, k_out, decay, q_in, attn, s0):
        return tuple(launch(heads, w, u, k_out, decay, q_in, attn, s0))

    def forward(heads, w, u, k_out, decay, q_in, attn, s0):
        o, final, states, v_new = launch(heads, w, u, k_out, decay, q_in, attn, s0, keep=True)
        return (o, final), (w, k_out, decay, q_in, attn, states, v_new)

    walk_outputs.defvjp(forward, functools.partial(_walk_outputs_fused_backward_bwd, backward_launch))
    return walk_outputs


def _walk_outputs_fused_backward_bwd(backward_launch, heads, residuals, cotangents):
    """The walk's gradients as in ``pallas_walk.make_walk`` from ``backward_launch`` (a reverse
    walk forming the outputs' cotangents, ``_walk_outputs_backward_launch``'s contract), plus
    those of q_in and attn (``dO S^T`` and ``dO V'^T`` per chunk): batched matmuls over the whole
    V in XLA, or all of them in one kernel (``CHUNK_GRADIENTS``)."""
    w, k_out, decay, q_in, attn, states, v_new = residuals
    d_o, d_final = cotangents
    d_o = d_o.astype(w.dtype)
    d_u, d_next, d_s0 = backward_launch(heads, w, k_out, decay, q_in, attn, d_o, d_final)
    if _check_chunk_gradients():
        d_w, d_k_out, d_decay, d_q_in, d_attn = _grads_kernel(states, v_new, d_u, d_next, d_o, heads=heads)
        return d_w, d_u, d_k_out, d_decay, d_q_in, d_attn, d_s0
    d_w, d_k_out, d_decay = chunk_gradients(states, v_new, d_u, d_next)
    groups, n, c = w.shape[:3]
    d_o = d_o.reshape(groups // heads, n, c, heads, -1)  # [B, N, C, H, V]: chunk rows of each group
    d_q_in = mm("bnihv,bhnkv->bhnik", d_o, states.reshape(groups // heads, heads, *states.shape[1:]), dtype=w.dtype)
    d_attn = mm("bnihv,bhnjv->bhnij", d_o, v_new.reshape(groups // heads, heads, *v_new.shape[1:]), dtype=w.dtype)
    flat = lambda x: x.reshape(groups, *x.shape[2:]).astype(w.dtype)
    return d_w, d_u, d_k_out, d_decay, flat(d_q_in), flat(d_attn), d_s0


_walk_outputs_fused_backward = fused_backward(_walk_outputs_launch)


def walk_outputs_call(terms, initial_state, launch=_walk_outputs_launch, padded_dims=triton_dims):
    """``launch`` (``_walk_outputs_launch`` or a ``fused_backward`` of a launch) on ``ChunkTerms``
    ``[B, H, N, ...]``: o ``[B, N*C, H, V]`` in the terms' dtype and the final state
    ``[B, H, K, V]`` float32 (head dims padded to ``padded_dims(d_k, d_v)``, the padding sliced
    off)."""
    batch, heads, n, c, d_k = terms.w.shape
    d_v = terms.u.shape[-1]
    pk, pv = padded_dims(d_k, d_v)
    w, u, k_out, decay, s0 = flat_walk_inputs(terms, initial_state, pk, pv)
    q_in = pad_trailing(terms.q_in.reshape(batch * heads, n, c, d_k), pk)
    attn = terms.attn.reshape(batch * heads, n, c, c)
    o, final = launch(heads, w, u, k_out, decay, q_in, attn, s0)
    return o[..., :d_v], final.reshape(batch, heads, pk, pv)[:, :, :d_k, :d_v]


def _unfused_walk_outputs(terms, initial_state):
    """The same as ``walk_outputs_call`` through the walk and outputs kernels (and their VJPs)."""
    entry_states, v_new, final = gpu_walk_states(terms, initial_state)
    return _outputs(terms.q_in, terms.attn, entry_states, v_new), final


@jax.custom_vjp
def _walk_outputs(terms, initial_state):
    return walk_outputs_call(terms, initial_state)


def _walk_outputs_fwd(terms, initial_state):
    """Differentiated calls run the two kernels, which keep the entry states and V' the
    backward needs."""
    return jax.vjp(_unfused_walk_outputs, terms, initial_state)


def _walk_outputs_bwd(vjp, cotangents):
    return vjp(cotangents)


_walk_outputs.defvjp(_walk_outputs_fwd, _walk_outputs_bwd)


def gpu_walk_outputs(terms, initial_state, seq_len):
    """``chunked.walk_states`` and ``chunked.chunk_outputs`` in one kernel for forward-only calls:
    o ``[B, T, H, V]`` in the terms' dtype and the final state; differentiated, the walk and
    outputs kernels (``_walk_outputs_fwd``)."""
    o, final = _walk_outputs(terms, initial_state)
    return o[:, :seq_len], final


def gpu_walk_outputs_fused_backward(terms, initial_state, seq_len):
    """``gpu_walk_outputs`` whose differentiated calls also run fused kernels: the forward walk
    forms the outputs and keeps the entry states and V'; the reverse walk forms the outputs'
    cotangents of both on the way (``_walk_outputs_fused_backward``)."""
    o, final = walk_outputs_call(terms, initial_state, _walk_outputs_fused_backward)
    return o[:, :seq_len], final
