"""The forward walk with the outputs formed on the way, as a Mosaic GPU (Hopper) kernel.

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
  walk's programs each read those tiles: ~7.3 GB at B1 T65536 with 8 V-blocks a head.)
- o_n = q_in_n S_n is issued together with W_n S_n, and attn_n V'_n together with k_out_n^T V'_n,
  so only the state's chain (W S, then k_out^T V') is waited for in turn.

Differentiated, the kernel also stores each chunk's entry state and V' (from the shared-memory
tiles its WGMMAs read) for ``pallas_gpu``'s reverse walk, which forms the outputs' cotangents
itself (``pallas_gpu.fused_backward``). Only 16-bit terms (WGMMA's bf16/f16 operands; float32
accumulation, the state float32, as the Triton kernels' 16-bit path); float32 terms run the
Triton kernels (``mosaic_walk_outputs``). k_out enters transposed (``[K, C]`` per chunk, one
XLA transpose) because the WGMMA takes it as its left operand. On CPU the kernel runs in the
Mosaic GPU interpreter (tests), without the cluster: the interpreter has no cluster
allocations, so the multicast path is only lowered for CUDA there (tests) and run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from infinitevl_jax.ops.delta_rule.pallas_gpu import fused_backward, gpu_walk_outputs, triton_dims, walk_outputs_call
from infinitevl_jax.ops.delta_rule.pallas_walk import F32, forward_out_shapes

# Launch settings, read when a kernel is traced (benchmarks/delta_rule_gpu_tuning.py sets them
# in a fresh process per setting). Not yet measured on a GPU: 32-wide V-blocks and 3 slots as
# the Triton walk's best setting; the cluster of 8 spans a head's V-blocks at V = 256.
BLOCK_V = 32
STAGES = 3
CLUSTER = 8
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


def _walk_kernel(w_ref, u_ref, kt_ref, d_ref, q_ref, a_ref, s0_ref, o_ref, final_ref, *kept_refs, heads, bv, stages,
                 cluster):
    """One warpgroup walks the chunks of group g = batch x head for one V-block (shapes in
    ``_launch``); with ``kept_refs`` (states ``[G, N, K, V]``, v_new ``[G, N, C, V]``) it also
    stores each chunk's entry state and V' from the shared-memory tiles the WGMMAs read.

    TMA stores out of shared memory are asynchronous; before a tile is written again the store
    that reads it must be done. Per chunk the stores are S_n and V'_n (when kept), then o_n, in
    that order, so with ``wait_smem_to_gmem(k)`` (at most k stores still reading):
    - before S_n is written: k = 2 leaves V'_{n-1} and o_{n-1}, so S_{n-1}'s store is done;
    - before V'_n is written: k = 2 leaves o_{n-1} and S_n, so V'_{n-1}'s store is done;
    - before o_n is written into its slot of two: o_{n-2}'s store is done, which is k = 1
      without kept tiles and already true with them (the waits above came after it)."""
    n_chunks, c, pk = w_ref.shape[1:]
    dtype = w_ref.dtype
    g = lax.axis_index("g")
    j = lax.axis_index("vb") * cluster + (lax.axis_index("cluster") if cluster > 1 else 0)
    v_cols = pl.ds(j * bv, bv)
    shared = dict(collective_axes="cluster") if cluster > 1 else {}
    states_ref, v_new_ref = kept_refs or (None, None)

    def scoped(w_s, kt_s, q_s, a_s, u_s, d_s, state_s, v_s, o_s, f_s, loaded, consumed, s0_loaded):
        def load(n, slot):
            """Chunk n's tiles into ``slot``; the K-wide ones multicast over the cluster."""
            for src, dst in ((w_ref, w_s), (kt_ref, kt_s), (q_ref, q_s), (a_ref, a_s)):
                plgpu.copy_gmem_to_smem(src.at[g, n], dst.at[slot], loaded.at[slot], **shared)
            plgpu.copy_gmem_to_smem(u_ref.at[g, n, :, v_cols], u_s.at[slot], loaded.at[slot])
            plgpu.copy_gmem_to_smem(d_ref.at[g, n], d_s.at[slot], loaded.at[slot])

        for slot in range(min(stages, n_chunks)):
            load(slot, slot)
        plgpu.copy_gmem_to_smem(s0_ref.at[g, :, v_cols], f_s, s0_loaded)
        plgpu.barrier_wait(s0_loaded)

        def operand(tile_s, value, kept, n):
            """``value`` into the WGMMA operand tile ``tile_s`` and, when kept, on to HBM."""
            if kept_refs:
                plgpu.wait_smem_to_gmem(2, wait_read_only=True)
            tile_s[...] = value.astype(dtype)
            plgpu.commit_smem()
            if kept_refs:
                plgpu.copy_smem_to_gmem(tile_s, kept.at[g, n, :, v_cols])

        def chunk(n, state):
            slot = lax.rem(n, stages)
            plgpu.barrier_wait(loaded.at[slot])
            operand(state_s, state, states_ref, n)

            def products(ws_acc, o_acc, update_acc):
                plgpu.wgmma(ws_acc, w_s.at[slot], state_s)
                plgpu.wgmma(o_acc, q_s.at[slot], state_s)
                operand(v_s, u_s[slot].astype(F32) - plgpu.wgmma_accumulator_load(ws_acc, wait_n=1), v_new_ref, n)
                plgpu.wgmma(update_acc, kt_s.at[slot], v_s)
                plgpu.wgmma(o_acc, a_s.at[slot], v_s)
                return plgpu.wgmma_accumulator_load(update_acc, wait_n=1), o_acc[...]

            update, o = pl.run_scoped(products, plgpu.ACC((c, bv), F32), plgpu.ACC((c, bv), F32),
                                      plgpu.ACC((pk, bv), F32))
            state = d_s[slot, 0] * state + update
            reload = n + stages < n_chunks
            if cluster > 1:
                pl.when(reload)(lambda: plgpu.barrier_arrive(consumed.at[slot]))
            o_slot = lax.rem(n, 2)
            if not kept_refs:
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            o_s.at[o_slot][...] = o.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s.at[o_slot], o_ref.at[g // heads, pl.ds(n * c, c), g % heads, v_cols])

            @pl.when(reload)
            def _():
                if cluster > 1:
                    plgpu.barrier_wait(consumed.at[slot])
                load(n + stages, slot)

            return state

        f_s[...] = lax.fori_loop(0, n_chunks, chunk, f_s[...])
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(f_s, final_ref.at[g, :, v_cols])
        plgpu.wait_smem_to_gmem(0)

    tiles = _smem_layout(bv, dtype)
    ring = lambda *shape: plgpu.SMEM((stages, *shape), dtype, transforms=tiles)
    consumed = plgpu.ClusterBarrier(collective_axes=("cluster",), num_barriers=stages) if cluster > 1 else None
    pl.run_scoped(
        scoped, ring(c, pk), ring(pk, c), ring(c, pk), ring(c, c), ring(c, bv),
        plgpu.SMEM((stages, DECAY_LANES), F32),
        plgpu.SMEM((pk, bv), dtype, transforms=tiles), plgpu.SMEM((c, bv), dtype, transforms=tiles),
        plgpu.SMEM((2, c, bv), dtype, transforms=tiles), plgpu.SMEM((pk, bv), F32, transforms=_smem_layout(bv, F32)),
        plgpu.Barrier(num_arrivals=6, num_barriers=stages), consumed, plgpu.Barrier())


def smem_bytes(c: int, pk: int, bv: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory the kernel allocates: the ring (w, k_out^T, q_in ``[C, K]``, attn ``[C, C]``,
    u ``[C, BV]``, the decay row), S and V' as WGMMA operands, two output tiles and the float32
    start/final state."""
    ring = stages * ((3 * c * pk + c * c + c * bv) * itemsize + DECAY_LANES * 4)
    return ring + (pk * bv + 3 * c * bv) * itemsize + pk * bv * 4


def _launch(heads, w, u, k_out, decay, q_in, attn, s0, keep=False):
    """The kernel on ``pallas_gpu._walk_outputs_launch``'s inputs and outputs (flat groups G =
    batch x heads; w, k_out, q_in ``[G, N, C, K]``, attn ``[G, N, C, C]``, u ``[G, N, C, V]`` in
    16 bits, decay ``[G, N, K, 1]`` and s0 ``[G, K, V]`` float32, head dims padded by
    ``mosaic_dims``): o ``[B, N*C, H, V]`` in the terms' dtype and the final state ``[G, K, V]``
    float32, with ``keep`` also the entry states ``[G, N, K, V]`` and V' ``[G, N, C, V]``. The
    kernel takes k_out transposed and the chunk decay as a 128-byte row."""
    groups, n, c, pk = w.shape
    pv = u.shape[-1]
    if c % WGMMA_ROWS:
        raise ValueError(f"the Mosaic GPU walk needs chunks of a multiple of {WGMMA_ROWS} tokens; got {c}")
    bv, stages = BLOCK_V, STAGES
    cluster = CLUSTER if jax.default_backend() == "gpu" and (pv // bv) % CLUSTER == 0 else 1
    if (need := smem_bytes(c, pk, bv, stages, w.dtype.itemsize)) > SMEM_BYTES:
        raise ValueError(f"the Mosaic GPU walk needs {need / 1024:.0f} KiB of shared memory at d_k {pk}, V-block {bv} "
                         f"and {stages} ring slots; a block has {SMEM_BYTES // 1024} KiB: lower STAGES or BLOCK_V")
    mesh = dict(grid=(groups, pv // bv // cluster), grid_names=("g", "vb"))
    if cluster > 1:
        mesh.update(cluster=(cluster,), cluster_names=("cluster",))
    out_type = [jax.ShapeDtypeStruct((groups // heads, n * c, heads, pv), w.dtype),
                jax.ShapeDtypeStruct((groups, pk, pv), F32)]
    if keep:
        out_type += forward_out_shapes(groups, n, c, pk, pv, w.dtype)[:2]
    kernel = plgpu.kernel(
        functools.partial(_walk_kernel, heads=heads, bv=bv, stages=stages, cluster=cluster),
        out_type=tuple(out_type), interpret=_interpret_params(), **mesh)
    k_t = jnp.swapaxes(k_out, -1, -2)
    decay_row = jnp.broadcast_to(decay[:, :, :1, 0], (groups, n, DECAY_LANES))
    return kernel(w, u, k_t, decay_row, q_in, attn, s0)


def mosaic_dims(d_k: int, d_v: int) -> tuple[int, int]:
    """Padded head dims: the Triton kernels' powers of two (their reverse walk takes what this
    forward keeps), K at least a WGMMA's 64 rows and V at least one V-block."""
    pk, pv = triton_dims(d_k, d_v)
    return max(pk, WGMMA_ROWS), max(pv, BLOCK_V)


_mosaic_walk_outputs = fused_backward(_launch)


def mosaic_walk_outputs(terms, initial_state, seq_len):
    """``pallas_gpu.gpu_walk_outputs_fused_backward`` with the Mosaic GPU kernel as its forward
    walk, for 16-bit terms: o ``[B, T, H, V]`` in the terms' dtype and the final state;
    differentiated, the kernel also keeps the entry states and V' for the Triton reverse walk
    that forms the outputs' cotangents. float32 terms run ``gpu_walk_outputs`` (3xTF32)."""
    if terms.w.dtype == F32:
        return gpu_walk_outputs(terms, initial_state, seq_len)
    o, final = walk_outputs_call(terms, initial_state, _mosaic_walk_outputs, mosaic_dims)
    return o[:, :seq_len], final
