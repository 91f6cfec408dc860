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

Only 16-bit terms (WGMMA's bf16/f16 operands; float32 accumulation, the state float32, as the
Triton kernels' 16-bit path): float32 terms, and differentiated calls, run ``pallas_gpu``'s
kernels (``mosaic_walk_outputs``). k_out enters transposed (``[K, C]`` per chunk, one XLA
transpose) because the WGMMA takes it as its left operand. On CPU the kernel runs in the Mosaic
GPU interpreter (tests), without the cluster: the interpreter has no cluster allocations, so
the multicast path is only lowered for CUDA there (tests) and run on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from infinitevl_jax.ops.delta_rule.pallas_gpu import fused_forward, gpu_walk_outputs
from infinitevl_jax.ops.delta_rule.pallas_walk import F32, pad_trailing

# Launch settings, read when a kernel is traced (benchmarks/delta_rule_gpu_tuning.py sets them
# in a fresh process per setting). Not yet measured on a GPU: 32-wide V-blocks and 3 slots as
# the Triton walk's best setting; the cluster of 8 spans a head's V-blocks at V = 256.
BLOCK_V = 32
STAGES = 3
CLUSTER = 8
WGMMA_ROWS = 64  # a WGMMA's M: the chunk size and the padded K are multiples of it
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block
DECAY_LANES = 32  # the chunk decay repeated to 128 bytes, TMA's smallest copy for a warpgroup


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


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


def _walk_kernel(w_ref, u_ref, kt_ref, d_ref, q_ref, a_ref, s0_ref, o_ref, final_ref, *, heads, bv, stages, cluster):
    """One warpgroup walks the chunks of group g = batch x head for one V-block (shapes in
    ``_launch``)."""
    n_chunks, c, pk = w_ref.shape[1:]
    dtype = w_ref.dtype
    g = lax.axis_index("g")
    j = lax.axis_index("vb") * cluster + (lax.axis_index("cluster") if cluster > 1 else 0)
    v_cols = pl.ds(j * bv, bv)
    shared = dict(collective_axes="cluster") if cluster > 1 else {}

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

        def chunk(n, state):
            slot = lax.rem(n, stages)
            plgpu.barrier_wait(loaded.at[slot])
            state_s[...] = state.astype(dtype)
            plgpu.commit_smem()

            def products(ws_acc, o_acc, update_acc):
                plgpu.wgmma(ws_acc, w_s.at[slot], state_s)
                plgpu.wgmma(o_acc, q_s.at[slot], state_s)
                v_new = u_s[slot].astype(F32) - plgpu.wgmma_accumulator_load(ws_acc, wait_n=1)
                v_s[...] = v_new.astype(dtype)
                plgpu.commit_smem()
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


def _launch(heads, w, u, k_t, decay, q_in, attn, s0, *, bv, stages, cluster):
    """The kernel on flat groups G = batch x heads: w, q_in ``[G, N, C, K]``, k_t ``[G, N, K, C]``,
    attn ``[G, N, C, C]``, u ``[G, N, C, V]`` (16-bit), decay ``[G, N, DECAY_LANES]`` and s0
    ``[G, K, V]`` (float32); K a multiple of 64, V of ``bv``. Returns o ``[B, N*C, H, V]`` in
    the terms' dtype and the final state ``[G, K, V]`` float32."""
    groups, n, c, pk = w.shape
    pv = u.shape[-1]
    if (need := smem_bytes(c, pk, bv, stages, w.dtype.itemsize)) > SMEM_BYTES:
        raise ValueError(f"the Mosaic GPU walk needs {need / 1024:.0f} KiB of shared memory at d_k {pk}, V-block {bv} "
                         f"and {stages} ring slots; a block has {SMEM_BYTES // 1024} KiB: lower STAGES or BLOCK_V")
    mesh = dict(grid=(groups, pv // bv // cluster), grid_names=("g", "vb"))
    if cluster > 1:
        mesh.update(cluster=(cluster,), cluster_names=("cluster",))
    kernel = plgpu.kernel(
        functools.partial(_walk_kernel, heads=heads, bv=bv, stages=stages, cluster=cluster),
        out_type=(jax.ShapeDtypeStruct((groups // heads, n * c, heads, pv), w.dtype),
                  jax.ShapeDtypeStruct((groups, pk, pv), F32)),
        interpret=_interpret_params(), **mesh)
    return kernel(w, u, k_t, decay, q_in, attn, s0)


def _launch_settings(d_v: int) -> tuple[int, int, int]:
    """``(bv, padded V, cluster)``: the V-block, V padded to whole V-blocks, and the cluster
    (``CLUSTER`` if it divides the V-blocks, else no cluster; 1 in the interpreter)."""
    bv = BLOCK_V
    pv = _round_up(d_v, bv)
    cluster = CLUSTER if jax.default_backend() == "gpu" and (pv // bv) % CLUSTER == 0 else 1
    return bv, pv, cluster


def _mosaic_walk_outputs_call(terms, initial_state):
    """The kernel on ``ChunkTerms`` ``[B, H, N, ...]``: o ``[B, N*C, H, V]`` in the terms' dtype
    and the final state ``[B, H, K, V]`` float32, with K padded to a multiple of 64 and V to
    whole V-blocks (zero rows and columns change nothing in the recurrence), sliced off after."""
    batch, heads, n, c, d_k = terms.w.shape
    d_v = terms.u.shape[-1]
    if c % WGMMA_ROWS:
        raise ValueError(f"the Mosaic GPU walk needs chunks of a multiple of {WGMMA_ROWS} tokens; got {c}")
    bv, pv, cluster = _launch_settings(d_v)
    pk = _round_up(d_k, WGMMA_ROWS)
    flat = lambda x: x.reshape(batch * heads, *x.shape[2:])
    w, q_in = (pad_trailing(flat(x), pk) for x in (terms.w, terms.q_in))
    k_t = jnp.swapaxes(pad_trailing(flat(terms.k_out), pk), -1, -2)
    decay = jnp.broadcast_to(flat(terms.decay)[..., None], (batch * heads, n, DECAY_LANES))
    s0 = pad_trailing(flat(initial_state), pk, pv)
    o, final = _launch(heads, w, pad_trailing(flat(terms.u), pv), k_t, decay, q_in, flat(terms.attn), s0,
                       bv=bv, stages=STAGES, cluster=cluster)
    return o[..., :d_v], final.reshape(batch, heads, pk, pv)[:, :, :d_k, :d_v]


_mosaic_walk_outputs = fused_forward(_mosaic_walk_outputs_call)


def mosaic_walk_outputs(terms, initial_state, seq_len):
    """``pallas_gpu.gpu_walk_outputs`` with the Mosaic GPU kernel for 16-bit terms: o ``[B, T,
    H, V]`` in the terms' dtype and the final state; float32 terms run the Triton kernel (its
    3xTF32 matmuls), and differentiated calls the Triton walk and outputs kernels."""
    if terms.w.dtype == F32:
        return gpu_walk_outputs(terms, initial_state, seq_len)
    o, final = _mosaic_walk_outputs(terms, initial_state)
    return o[:, :seq_len], final
