"""The walks of the chunked gated delta rule as Mosaic GPU (Hopper) kernels: the forward walk
with the outputs formed on the way, and the reverse walk with the outputs' cotangents.

The same math as ``pallas_gpu``'s fused walk (``_walk_outputs_kernel``), per chunk n:

    V'_n = U_n - W_n S_n        o_n = q_in_n S_n + attn_n V'_n        S_{n+1} = d_n S_n + k_out_n^T V'_n

with one warpgroup per (batch x head, V-block) holding its ``[K, BV]`` float32 state slice in
registers, but written for Hopper instead of through Triton:

- the chunk tiles arrive by TMA into a ring of ``STAGES`` shared-memory slots, loaded that many
  chunks ahead, and every matmul is a WGMMA reading them there;
- with ``CLUSTER`` > 1 the V-block programs of one head form a cluster and each chunk's K-wide
  tiles (w, k_out^T, q_in, attn: ~56 KB in bf16, the same for every V-block) are multicast:
  each program loads a part and the TMA unit writes it into every program's shared memory, so
  a head reads them from L2 once instead of once per V-block. A cluster barrier per slot holds
  the next load into a slot until every program of the cluster has finished with it. (The Triton
  walk's programs each read those tiles: ~7.3 GB at B1 T65536 with 8 V-blocks a head.) On an
  H200 the cluster made the walk 1.5x slower (the settings below), so the default has none;
- with ``WARPGROUPS`` > 1 one program walks that many V-blocks of a head, one warpgroup each,
  sharing one ring: each chunk's K-wide tiles are loaded once for all of them (the first
  warpgroup issues the loads, after every warpgroup has arrived on the slot's ``consumed``
  barrier, a shared-memory barrier within the block instead of the cluster's), while each
  warpgroup's two dependent WGMMAs per chunk overlap the other's;
- o_n = q_in_n S_n is issued together with W_n S_n, and attn_n V'_n together with k_out_n^T V'_n,
  so only the state's chain (W S, then k_out^T V') is waited for in turn.

Differentiated, the forward kernel also stores each chunk's entry state and V' (from the
shared-memory tiles its WGMMAs read), and the reverse walk (``_backward_kernel``: the Triton
``_walk_outputs_backward_kernel``'s math, ring and cluster as above) forms the outputs'
cotangents q_in^T dO and attn^T dO itself, wired as ``pallas_gpu.fused_backward``; the
per-chunk gradients after it are ``pallas_gpu``'s. Only 16-bit terms (WGMMA's bf16/f16
operands; float32 accumulation, the state float32, as the Triton kernels' 16-bit path); float32
terms run the Triton kernels (``mosaic_walk_outputs``). A WGMMA's left operand is read as
stored, so the tiles that enter transposed (k_out in the forward; w, q_in and attn in the
reverse walk) are transposed by XLA first (the interpreter has no transposed operands). On CPU
the kernels run in the Mosaic GPU interpreter (tests), without the cluster: the interpreter has
no cluster allocations, so the multicast path is only lowered for CUDA there (tests) and run
on a GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from infinitevl_jax.ops.delta_rule.pallas_gpu import fused_backward, gpu_walk_outputs, triton_dims, walk_outputs_call
from infinitevl_jax.ops.delta_rule.pallas_walk import F32, backward_out_shapes, forward_out_shapes

# Launch settings, read when a kernel is traced (benchmarks/delta_rule_gpu_tuning.py sets them
# in a fresh process per setting). Measured on an H200 (benchmarks/RESULTS.md, session 15): the
# walk alone at B1 T65536 took 2.01 ms with 32-wide V-blocks, 3 slots and no cluster, 3.07 ms
# with the multicast to a cluster of 8 and 3.16 ms with 4 (64-wide V-blocks were not reached).
BLOCK_V = 32
STAGES = 3
CLUSTER = 1
WARPGROUPS = 1  # V-blocks per program, one warpgroup each; 2 fits with 2 ring slots at d_k 128 (not yet timed)
WGMMA_ROWS = 64  # a WGMMA's M: the chunk size and the padded K are multiples of it
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block
DECAY_LANES = 32  # the chunk decay repeated to 128 bytes, TMA's smallest copy for a warpgroup


def _smem_layout(minor: int, dtype) -> tuple:
    """Tiling and swizzle of a shared-memory tile whose minor dim is ``minor`` elements (WGMMA
    operands: both operands of one WGMMA need the same swizzle, so all 16-bit tiles use the
    V-block's)."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _interpret_params():
    """``None`` on GPU (compiled), the Mosaic GPU interpreter's params on CPU (jax 0.10 has them
    only under ``jax._src``)."""
    backend = jax.default_backend()
    if backend == "gpu":
        return None
    if backend == "cpu":
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        return InterpretGPUParams()
    raise ValueError(f"the Mosaic GPU kernel runs on GPU (or interpreted on CPU), not on {backend!r}")


def _program(bv: int, cluster: int, warpgroups: int):
    """``(g, wg, block_cols)``: this program's group (batch x head), this warpgroup and
    ``block_cols(j)``, the columns of the program's j-th V-block (warpgroup j walks it)."""
    first = (lax.axis_index("vb") * cluster + (lax.axis_index("cluster") if cluster > 1 else 0)) * warpgroups
    return lax.axis_index("g"), lax.axis_index("wg"), lambda j: pl.ds((first + j) * bv, bv)


def _chunk_ring(sources, rings, loaded, consumed, *, n_chunks, stages, cluster, warpgroups, reverse, step, carry):
    """The walk over chunks (n = 0..N-1, or N-1..0 with ``reverse``) with each chunk's tiles in a
    TMA ring: ``sources`` ``[(view, kind)]`` fill ``rings`` (SMEM ``[stages, ...]``, one barrier
    ``loaded`` per slot) ``stages`` chunks ahead. A head-wide source (``view(n)`` -> GMEM tile) is
    the same for every V-block and loaded once for the program's warpgroups; kind
    ``"multicast"`` also loads it once for the whole cluster (the K-wide tiles), ``"head"`` once
    per program (the decay row, too small to split). A ``"block"`` source (``view(n, j)``:
    V-block j of the program) fills ``ring.at[slot, j]`` for each warpgroup j. ``step(n, slot,
    carry)`` runs once chunk n's tiles have landed; then the slot is reloaded, after every
    program of the cluster or every warpgroup of the program has arrived on ``consumed`` (a
    barrier per slot) to say it is done with it; the first warpgroup issues the loads. Returns
    the final carry."""
    chunk_at = (lambda i: n_chunks - 1 - i) if reverse else (lambda i: i)
    shared = cluster > 1 or warpgroups > 1
    loader = lax.axis_index("wg") == 0

    def load(i, slot):
        for (view, kind), ring in zip(sources, rings):
            if kind == "block":
                for j in range(warpgroups):
                    plgpu.copy_gmem_to_smem(view(chunk_at(i), j), ring.at[slot, j], loaded.at[slot])
            else:
                collective = dict(collective_axes="cluster") if kind == "multicast" and cluster > 1 else {}
                plgpu.copy_gmem_to_smem(view(chunk_at(i)), ring.at[slot], loaded.at[slot], **collective)

    @pl.when(loader)
    def _():
        for slot in range(min(stages, n_chunks)):
            load(slot, slot)

    def body(i, carry):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(loaded.at[slot])
        carry = step(chunk_at(i), slot, carry)
        reload = i + stages < n_chunks
        if shared:
            pl.when(reload)(lambda: plgpu.barrier_arrive(consumed.at[slot]))

        @pl.when(reload & loader)
        def _():
            if shared:
                plgpu.barrier_wait(consumed.at[slot])
            load(i + stages, slot)

        return carry

    return lax.fori_loop(0, n_chunks, body, carry)


def _operand(tile_s, value, kept, wait):
    """``value`` into the WGMMA operand tile ``tile_s``; with ``kept`` (a GMEM view) also on to
    HBM, after ``wait_smem_to_gmem(wait)`` lets the store that last read the tile finish."""
    if kept is not None:
        plgpu.wait_smem_to_gmem(wait, wait_read_only=True)
    tile_s[...] = value.astype(tile_s.dtype)
    plgpu.commit_smem()
    if kept is not None:
        plgpu.copy_smem_to_gmem(tile_s, kept)


def _matmuls(first, then, shapes):
    """Runs WGMMAs into float32 accumulators of ``shapes``: ``first(accs)`` issues the first
    round; ``then(accs)`` may read accumulators (``plgpu.wgmma_accumulator_load``), issue more
    and returns what it needs; all are done when this returns ``then``'s result."""
    def scope(*accs):
        first(accs)
        return then(accs)
    return pl.run_scoped(scope, *(plgpu.ACC(shape, F32) for shape in shapes))


def _forward_kernel(w_ref, u_ref, kt_ref, d_ref, q_ref, a_ref, s0_ref, o_ref, final_ref, *kept_refs, heads, bv,
                    stages, cluster, warpgroups):
    """Each warpgroup walks the chunks of group g = batch x head for one V-block (shapes in
    ``_launch``); with ``kept_refs`` (states ``[G, N, K, V]``, v_new ``[G, N, C, V]``) it also
    stores each chunk's entry state and V' from the shared-memory tiles the WGMMAs read. Every
    warpgroup has its own operand tiles and issues its own stores.

    TMA stores out of shared memory are asynchronous; before a tile is written again the store
    that reads it must be done. Per chunk the stores are S_n and V'_n (when kept), then o_n, in
    that order, so with ``wait_smem_to_gmem(k)`` (at most k stores still reading):
    - before S_n is written: k = 2 leaves V'_{n-1} and o_{n-1}, so S_{n-1}'s store is done;
    - before V'_n is written: k = 2 leaves o_{n-1} and S_n, so V'_{n-1}'s store is done;
    - before o_n is written into its slot of two: o_{n-2}'s store is done, which is k = 1
      without kept tiles and already true with them (the waits above came after it)."""
    n_chunks, c, pk = w_ref.shape[1:]
    g, wg, block_cols = _program(bv, cluster, warpgroups)
    v_cols = block_cols(wg)
    states_ref, v_new_ref = kept_refs or (None, None)
    kept = lambda ref, n: None if ref is None else ref.at[g, n, :, v_cols]

    def scoped(rings, loaded, consumed, *own_tiles):
        w_s, kt_s, q_s, a_s, u_s, d_s = rings
        state_s, v_s, o_s, f_s, s0_loaded = (tile.at[wg] for tile in own_tiles)
        plgpu.copy_gmem_to_smem(s0_ref.at[g, :, v_cols], f_s, s0_loaded)
        plgpu.barrier_wait(s0_loaded)

        def chunk(n, slot, state):
            _operand(state_s, state, kept(states_ref, n), 2)

            def first(accs):
                ws_acc, o_acc, _ = accs
                plgpu.wgmma(ws_acc, w_s.at[slot], state_s)
                plgpu.wgmma(o_acc, q_s.at[slot], state_s)

            def then(accs):
                ws_acc, o_acc, update_acc = accs
                v_new = u_s[slot, wg].astype(F32) - plgpu.wgmma_accumulator_load(ws_acc, wait_n=1)
                _operand(v_s, v_new, kept(v_new_ref, n), 2)
                plgpu.wgmma(update_acc, kt_s.at[slot], v_s)
                plgpu.wgmma(o_acc, a_s.at[slot], v_s)
                return plgpu.wgmma_accumulator_load(update_acc, wait_n=1), o_acc[...]

            update, o = _matmuls(first, then, [(c, bv), (c, bv), (pk, bv)])
            o_slot = lax.rem(n, 2)
            if not kept_refs:
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            o_s.at[o_slot][...] = o.astype(o_s.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s.at[o_slot], o_ref.at[g // heads, pl.ds(n * c, c), g % heads, v_cols])
            return d_s[slot, 0] * state + update

        sources = [(lambda n, ref=ref: ref.at[g, n], "multicast") for ref in (w_ref, kt_ref, q_ref, a_ref)]
        sources += [(lambda n, j: u_ref.at[g, n, :, block_cols(j)], "block"), (lambda n: d_ref.at[g, n], "head")]
        f_s[...] = _chunk_ring(sources, rings, loaded, consumed, n_chunks=n_chunks, stages=stages, cluster=cluster,
                               warpgroups=warpgroups, reverse=False, step=chunk, carry=f_s[...])
        _store_state(f_s, final_ref.at[g, :, v_cols])

    _run_scoped(scoped, *_forward_tiles(c, pk, bv), w_ref.dtype, stages=stages, cluster=cluster, pk=pk,
                bv=bv, warpgroups=warpgroups)


def _backward_kernel(wt_ref, k_ref, qt_ref, at_ref, d_ref, d_o_ref, d_final_ref, d_u_ref, d_next_ref, d_s0_ref, *,
                     heads, bv, stages, cluster, warpgroups):
    """The reverse walk with the outputs' cotangents formed on the way, ``pallas_walk.
    backward_step`` per chunk from dS = dL/dS_{n+1}:

        dV = attn_n^T dO_n + k_out_n dS        dS <- d_n dS - W_n^T dV + q_in_n^T dO_n

    storing dS (d_next) and dV (d_u) from the shared-memory tiles the WGMMAs read. Refs: w, q_in
    and attn transposed (``[G, N, K, C]``, ``[G, N, K, C]``, ``[G, N, C, C]``), k_out ``[G, N, C,
    K]``, d_o ``[B, N*C, H, V]``, d_final and d_s0 ``[G, K, V]`` float32, d_u ``[G, N, C, V]``,
    d_next ``[G, N, K, V]``. Per chunk the stores are dS then dV: before either tile is written
    again, ``wait_smem_to_gmem(1)`` leaves only the other one's last store reading."""
    n_chunks, pk, c = wt_ref.shape[1:]
    g, wg, block_cols = _program(bv, cluster, warpgroups)
    v_cols = block_cols(wg)

    def scoped(rings, loaded, consumed, *own_tiles):
        wt_s, k_s, qt_s, at_s, do_s, d_s = rings
        ds_s, dv_s, f_s, final_loaded = (tile.at[wg] for tile in own_tiles)
        plgpu.copy_gmem_to_smem(d_final_ref.at[g, :, v_cols], f_s, final_loaded)
        plgpu.barrier_wait(final_loaded)

        def chunk(n, slot, d_state):
            _operand(ds_s, d_state, d_next_ref.at[g, n, :, v_cols], 1)

            def first(accs):
                from_outputs_acc, dv_acc, _ = accs
                plgpu.wgmma(from_outputs_acc, qt_s.at[slot], do_s.at[slot, wg])
                plgpu.wgmma(dv_acc, at_s.at[slot], do_s.at[slot, wg])
                plgpu.wgmma(dv_acc, k_s.at[slot], ds_s)

            def then(accs):
                from_outputs_acc, dv_acc, carried_acc = accs
                _operand(dv_s, dv_acc[...], d_u_ref.at[g, n, :, v_cols], 1)
                plgpu.wgmma(carried_acc, wt_s.at[slot], dv_s)
                return carried_acc[...], from_outputs_acc[...]

            carried, from_outputs = _matmuls(first, then, [(pk, bv), (c, bv), (pk, bv)])
            return d_s[slot, 0] * d_state - carried + from_outputs

        sources = [(lambda n, ref=ref: ref.at[g, n], "multicast") for ref in (wt_ref, k_ref, qt_ref, at_ref)]
        sources += [(lambda n, j: d_o_ref.at[g // heads, pl.ds(n * c, c), g % heads, block_cols(j)], "block"),
                    (lambda n: d_ref.at[g, n], "head")]
        f_s[...] = _chunk_ring(sources, rings, loaded, consumed, n_chunks=n_chunks, stages=stages, cluster=cluster,
                               warpgroups=warpgroups, reverse=True, step=chunk, carry=f_s[...])
        _store_state(f_s, d_s0_ref.at[g, :, v_cols])

    _run_scoped(scoped, *_backward_tiles(c, pk, bv), wt_ref.dtype, stages=stages, cluster=cluster, pk=pk,
                bv=bv, warpgroups=warpgroups)


def _store_state(f_s, dst):
    """The float32 state tile ``f_s`` (written just before) to HBM, waiting for every store."""
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(f_s, dst)
    plgpu.wait_smem_to_gmem(0)


def smem_bytes(head_shapes, block_shapes, operand_shapes, stages: int, pk: int, bv: int, warpgroups: int = 1,
               itemsize: int = 2) -> int:
    """Shared memory of ``_run_scoped``'s buffers: the ring's 16-bit tiles (head-wide ones once,
    per-V-block ones per warpgroup) and decay rows, each warpgroup's 16-bit operand tiles and
    float32 state."""
    per_slot = sum(map(math.prod, head_shapes)) + warpgroups * sum(map(math.prod, block_shapes))
    tiles = stages * per_slot + warpgroups * sum(map(math.prod, operand_shapes))
    return tiles * itemsize + (stages * DECAY_LANES + warpgroups * pk * bv) * 4


def _run_scoped(scoped, head_shapes, block_shapes, operand_shapes, dtype, *, stages, cluster, warpgroups, pk, bv):
    """``scoped(rings, loaded, consumed, *operand tiles, state tile, state barrier)``: the ring
    (a ``[stages, ...]`` buffer per head-wide tile shape, a ``[stages, warpgroups, ...]`` one per
    V-block tile shape, then the decay rows; one ``loaded`` barrier per slot for all of its
    copies; the barrier ``consumed`` per slot that the cluster's programs or the program's
    warpgroups arrive on, or None), then per warpgroup (a leading ``warpgroups`` axis) the 16-bit
    operand tiles, the float32 state tile and a barrier for it, all tiles in the WGMMA layout of
    the V-block's width. One allocation for the block, shared by its warpgroups."""
    tiles = _smem_layout(bv, dtype)
    rings = [plgpu.SMEM((stages, *shape), dtype, transforms=tiles) for shape in head_shapes]
    rings += [plgpu.SMEM((stages, warpgroups, *shape), dtype, transforms=tiles) for shape in block_shapes]
    rings.append(plgpu.SMEM((stages, DECAY_LANES), F32))
    copies = len(rings) + (warpgroups - 1) * len(block_shapes)
    if cluster > 1:
        consumed = plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=stages)
    else:
        consumed = plgpu.Barrier(num_arrivals=warpgroups, num_barriers=stages) if warpgroups > 1 else None
    own = [plgpu.SMEM((warpgroups, *shape), dtype, transforms=tiles) for shape in operand_shapes]
    own += [plgpu.SMEM((warpgroups, pk, bv), F32, transforms=_smem_layout(bv, F32)),
            plgpu.Barrier(num_barriers=warpgroups)]
    pl.run_scoped(lambda *refs: scoped(refs[:len(rings)], *refs[len(rings):]), *rings,
                  plgpu.Barrier(num_arrivals=copies, num_barriers=stages), consumed, *own, collective_axes="wg")


# Shared-memory tiles of each kernel: its ring's head-wide 16-bit tiles per slot, its per-V-block
# ones, then its operand tiles (forward: S, V', two output tiles; backward: dS, dV).
def _forward_tiles(c, pk, bv):
    return [(c, pk), (pk, c), (c, pk), (c, c)], [(c, bv)], [(pk, bv), (c, bv), (2, c, bv)]


def _backward_tiles(c, pk, bv):
    return [(pk, c), (c, pk), (pk, c), (c, c)], [(c, bv)], [(pk, bv), (c, bv)]


def _walk_smem_bytes(tiles, c: int, pk: int, warpgroups: int, itemsize: int = 2) -> int:
    """``smem_bytes`` of the walk whose tile shapes ``tiles`` gives, at today's settings."""
    return smem_bytes(*tiles(c, pk, BLOCK_V), STAGES, pk, BLOCK_V, warpgroups, itemsize)


def fits_shared_memory(d_k: int, d_v: int, c: int = 64) -> bool:
    """Whether both Mosaic GPU walks fit a block's shared memory at head dims ``d_k``, ``d_v``
    (16-bit terms, chunk ``c``, today's ``BLOCK_V``, ``STAGES`` and ``WARPGROUPS``): ``"pallas"``
    picks them only then."""
    pk, pv = mosaic_dims(d_k, d_v)
    warpgroups = _warpgroups(pv)
    return max(_walk_smem_bytes(tiles, c, pk, warpgroups) for tiles in (_forward_tiles, _backward_tiles)) <= SMEM_BYTES


def _warpgroups(pv: int) -> int:
    """``WARPGROUPS`` where it divides the ``pv // BLOCK_V`` V-blocks, else 1."""
    return WARPGROUPS if (pv // BLOCK_V) % WARPGROUPS == 0 else 1


def _kernel_call(body, tiles, heads, out_type, operands, *, c, pk, pv, dtype):
    """``body`` (a kernel above, its settings bound here) as a Mosaic GPU kernel over (group,
    V-blocks), ``WARPGROUPS`` V-blocks per program (one warpgroup each) when that divides them,
    the programs of a head in clusters of ``CLUSTER`` when that divides them (not in the
    interpreter, which has no cluster allocations); checks the chunk size, the settings and the
    shared memory first."""
    if c % WGMMA_ROWS:
        raise ValueError(f"the Mosaic GPU walk needs chunks of a multiple of {WGMMA_ROWS} tokens; got {c}")
    if CLUSTER > 1 and WARPGROUPS > 1:
        raise ValueError(f"the Mosaic GPU walk shares a chunk's tiles across a cluster (CLUSTER={CLUSTER}) or "
                         f"across warpgroups (WARPGROUPS={WARPGROUPS}), not both: set one of them to 1")
    bv, stages, warpgroups = BLOCK_V, STAGES, _warpgroups(pv)
    if (need := _walk_smem_bytes(tiles, c, pk, warpgroups, jnp.dtype(dtype).itemsize)) > SMEM_BYTES:
        raise ValueError(f"the Mosaic GPU walk needs {need / 1024:.0f} KiB of shared memory at d_k {pk}, V-block {bv}, "
                         f"{stages} ring slots and {warpgroups} warpgroup(s); a block has {SMEM_BYTES // 1024} KiB: "
                         f"lower STAGES, BLOCK_V or WARPGROUPS")
    programs = pv // bv // warpgroups
    cluster = CLUSTER if jax.default_backend() == "gpu" and programs % CLUSTER == 0 else 1
    groups = operands[0].shape[0]
    mesh = dict(grid=(groups, programs // cluster), grid_names=("g", "vb"), num_threads=warpgroups, thread_name="wg")
    if cluster > 1:
        mesh.update(cluster=(cluster,), cluster_names=("cluster",))
    kernel = plgpu.kernel(functools.partial(body, heads=heads, bv=bv, stages=stages, cluster=cluster,
                                            warpgroups=warpgroups),
                          out_type=tuple(out_type), interpret=_interpret_params(), **mesh)
    return kernel(*operands)


def _decay_rows(decay):
    """The chunk decay ``[G, N, K, 1]`` (a column per chunk) as 128-byte rows ``[G, N, 32]``."""
    return jnp.broadcast_to(decay[:, :, :1, 0], (*decay.shape[:2], DECAY_LANES))


def _launch(heads, w, u, k_out, decay, q_in, attn, s0, keep=False):
    """The forward kernel on ``pallas_gpu._walk_outputs_launch``'s inputs and outputs (flat
    groups G = batch x heads; w, k_out, q_in ``[G, N, C, K]``, attn ``[G, N, C, C]``, u ``[G, N,
    C, V]`` in 16 bits, decay ``[G, N, K, 1]`` and s0 ``[G, K, V]`` float32, head dims padded by
    ``mosaic_dims``): o ``[B, N*C, H, V]`` in the terms' dtype and the final state ``[G, K, V]``
    float32, with ``keep`` also the entry states ``[G, N, K, V]`` and V' ``[G, N, C, V]``. The
    kernel takes k_out transposed."""
    groups, n, c, pk = w.shape
    pv = u.shape[-1]
    out_type = [jax.ShapeDtypeStruct((groups // heads, n * c, heads, pv), w.dtype),
                jax.ShapeDtypeStruct((groups, pk, pv), F32)]
    if keep:
        out_type += forward_out_shapes(groups, n, c, pk, pv, w.dtype)[:2]
    operands = (w, u, jnp.swapaxes(k_out, -1, -2), _decay_rows(decay), q_in, attn, s0)
    return _kernel_call(_forward_kernel, _forward_tiles, heads, out_type, operands, c=c, pk=pk, pv=pv, dtype=w.dtype)


def _backward_launch(heads, w, k_out, decay, q_in, attn, d_o, d_final):
    """The reverse-walk kernel on ``pallas_gpu._walk_outputs_backward_launch``'s inputs and
    outputs: d_u ``[G, N, C, V]`` and d_next ``[G, N, K, V]`` in the terms' dtype, d_s0 ``[G, K,
    V]`` float32. The kernel takes w, q_in and attn transposed."""
    groups, n, c, pk = w.shape
    pv = d_o.shape[-1]
    t = lambda x: jnp.swapaxes(x, -1, -2)
    operands = (t(w), k_out, t(q_in), t(attn), _decay_rows(decay), d_o, d_final)
    return _kernel_call(_backward_kernel, _backward_tiles, heads, backward_out_shapes(groups, n, c, pk, pv, w.dtype),
                        operands, c=c, pk=pk, pv=pv, dtype=w.dtype)


def mosaic_dims(d_k: int, d_v: int) -> tuple[int, int]:
    """Padded head dims: the Triton kernels' powers of two (their reverse walk takes what this
    forward keeps), K at least a WGMMA's 64 rows and V at least one V-block."""
    pk, pv = triton_dims(d_k, d_v)
    return max(pk, WGMMA_ROWS), max(pv, BLOCK_V)


_mosaic_walk_outputs = fused_backward(_launch, _backward_launch)


def mosaic_walk_outputs(terms, initial_state, seq_len):
    """``pallas_gpu.gpu_walk_outputs_fused_backward`` with both walks in Mosaic GPU, for 16-bit
    terms: o ``[B, T, H, V]`` in the terms' dtype and the final state; differentiated, the
    forward kernel also keeps the entry states and V' for the reverse-walk kernel. float32 terms
    run ``gpu_walk_outputs`` (3xTF32)."""
    if terms.w.dtype == F32:
        return gpu_walk_outputs(terms, initial_state, seq_len)
    o, final = walk_outputs_call(terms, initial_state, _mosaic_walk_outputs, mosaic_dims)
    return o[:, :seq_len], final
