"""The gated delta rule (Gated DeltaNet's token mixer): one public function, several impls.

``gated_delta_rule`` checks its inputs, casts g, beta and the state to float32 and q, k, v to the
matmul operand dtype (bf16/f16 inputs stay 16-bit, halving the bytes the chunked impls move; the
recurrence and all decay and state math are float32 whatever the input dtype), turns
packed-sequence ``segment_ids`` into per-token resets, and dispatches:

- ``"recurrent"``: ``lax.scan`` over tokens (reference speed; the decode step);
- ``"chunked"``: pure-JAX chunk-parallel WY/UT form, chunk 64, any T;
- ``"pallas"``: the walk across chunks in Pallas kernels with a hand-written reverse walk for
  gradients: on GPU ``"pallas_triton_fused_backward"``, or ``"pallas_mosaic_gpu"`` on Hopper
  from ``MOSAIC_MIN_BATCH_HEADS`` B x H states on (``resolve_impl``); ``"pallas_mosaic_tpu"`` on
  TPU; the Triton kernels interpreted on CPU. Each choice is the fastest measured on an H200
  (benchmarks/RESULTS.md);
- ``"pallas_triton"``: forward-only calls (inference, prefill) form the chunk-parallel terms in
  a Triton kernel (``pallas_gpu_terms``) and walk the chunks with the outputs formed on the way
  (``pallas_gpu.gpu_walk_outputs``: entry states and V' never reach HBM; 13-30% less time than
  separate kernels on an H200). Differentiated, its terms are XLA's (``chunked.prepare_chunks``)
  and so is their VJP (``pallas_gpu_terms.TERMS_BACKWARD = "kernel"`` swaps in a Triton backward
  for the terms, tested, and 1.06x slower than XLA's VJP on an H200), and the walk and the
  outputs are separate kernels, which keep what the reverse walk reads. ``pallas_mosaic_tpu``
  forms the terms and outputs in XLA. Both run on CPU in their interpreters (tests);
- ``"pallas_triton_fused_backward"``: ``pallas_triton`` whose differentiated calls run fused
  kernels too: the forward walk forms the outputs and keeps the entry states and V', and the
  reverse walk forms the outputs' cotangents of both on the way (``pallas_gpu.
  gpu_walk_outputs_fused_backward``: those cotangents never reach HBM); forward+backward
  14.2 ms against ``pallas_triton``'s 17.1 ms at B1 T65536 on an H200, in one run;
- ``"pallas_mosaic_gpu"``: ``pallas_triton_fused_backward`` whose two walks, for 16-bit terms,
  are Mosaic GPU (Hopper) kernels (``pallas_mosaic_gpu.mosaic_walk_outputs``: TMA ring, WGMMA);
  float32 terms run ``pallas_triton``. Tested in the Mosaic GPU interpreter; on an H200 its
  forward+backward took 2-11% less time than the Triton kernels' from B2 H16 on;
- ``"pallas_triton_unfused"``: ``pallas_triton`` with the walk and the outputs of forward-only
  calls in separate kernels (the default before the fused kernel was measured faster on an
  H200; kept for comparison in benchmarks/delta_rule_gpu.py);
- ``"pallas_triton_xla_terms"``: ``pallas_triton_unfused`` with XLA's terms in forward-only
  calls too (for comparison);
- ``"auto"``: ``recurrent`` for a single token; otherwise ``pallas`` on GPU and TPU and
  ``chunked`` on CPU (the fastest correct impl per backend, measured in benchmarks/RESULTS.md;
  the TPU kernels are checked in the TPU interpreter and lowered for TPU in the tests, and
  have not been timed on a TPU).

Precision: decays, the chunk's triangular inverse and the state are float32 whatever the
input dtype. With bf16/f16 ``v``, the chunk-parallel input-facing matmuls take 16-bit operands
with float32 accumulation (FLA's choice); with float32 inputs every matmul is float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from infinitevl_jax.ops.chunk_math import matmul_dtype_for
from infinitevl_jax.ops.conv import check_segment_ids
from infinitevl_jax.ops.delta_rule.chunked import CHUNK_SIZE, chunked_gated_delta_rule
from infinitevl_jax.ops.delta_rule.pallas_gpu import (gpu_chunk_outputs, gpu_walk_outputs,
                                                    gpu_walk_outputs_fused_backward, gpu_walk_states)
from infinitevl_jax.ops.delta_rule.pallas_gpu_terms import gpu_prepare_chunks
from infinitevl_jax.ops.delta_rule.pallas_mosaic_gpu import fits_shared_memory, mosaic_walk_outputs
from infinitevl_jax.ops.delta_rule.pallas_tpu import tpu_walk_states
from infinitevl_jax.ops.delta_rule.recurrent import recurrent_gated_delta_rule

IMPLS = {
    "recurrent": recurrent_gated_delta_rule,
    "chunked": chunked_gated_delta_rule,
    "pallas_triton": functools.partial(chunked_gated_delta_rule, prepare=gpu_prepare_chunks,
                                       walk_outputs=gpu_walk_outputs),
    "pallas_triton_fused_backward": functools.partial(chunked_gated_delta_rule, prepare=gpu_prepare_chunks,
                                                      walk_outputs=gpu_walk_outputs_fused_backward),
    "pallas_triton_unfused": functools.partial(chunked_gated_delta_rule, prepare=gpu_prepare_chunks,
                                               walk=gpu_walk_states, outputs=gpu_chunk_outputs),
    "pallas_triton_xla_terms": functools.partial(chunked_gated_delta_rule, walk=gpu_walk_states,
                                                 outputs=gpu_chunk_outputs),
    "pallas_mosaic_gpu": functools.partial(chunked_gated_delta_rule, prepare=gpu_prepare_chunks,
                                           walk_outputs=mosaic_walk_outputs),
    "pallas_mosaic_tpu": functools.partial(chunked_gated_delta_rule, walk=tpu_walk_states),
}

# "pallas" on a Hopper GPU runs the Mosaic GPU walks from this many B x H states on, and the
# Triton walks below it. Measured on an H200 at H16 (benchmarks/RESULTS.md, session 15): with
# B >= 2 (32+ states) Mosaic's forward+backward took 2-11% less time at every shape timed; at B1
# (16 states, 128 V-block programs for 132 SMs) the two were within 3% either way.
MOSAIC_MIN_BATCH_HEADS = 32

__all__ = ["gated_delta_rule", "segment_resets", "IMPLS", "CHUNK_SIZE"]


def segment_resets(segment_ids, seq_len, batch):
    """``[B, T]`` bool: True where a token's segment id differs from the previous token's."""
    if segment_ids is None:
        return jnp.zeros((batch, seq_len), dtype=bool)
    previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return segment_ids != previous


def _check_shapes(q, k, v, g, beta, initial_state, segment_ids):
    if q.ndim != 4:
        raise ValueError(f"q must be [batch, time, heads, d_k]; got shape {q.shape}")
    batch, seq_len, heads, d_k = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {q.shape}; got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != (batch, seq_len, heads):
        raise ValueError(f"v must be [batch, time, heads, d_v] = [{batch}, {seq_len}, {heads}, d_v]; got {v.shape}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (batch, seq_len, heads):
            raise ValueError(f"{name} must be [batch, time, heads] = {(batch, seq_len, heads)}; got {x.shape}")
    if initial_state is not None and initial_state.shape != (batch, heads, d_k, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [batch, heads, d_k, d_v] = {(batch, heads, d_k, v.shape[-1])}; "
            f"got {initial_state.shape}")
    check_segment_ids(segment_ids, batch, seq_len)
    if seq_len == 0:
        raise ValueError("gated_delta_rule needs at least one token (time axis has length 0)")


def is_hopper() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (compute capability 9.x: H100/H200),
    the only chips whose WGMMA and TMA the Mosaic GPU walks use."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def resolve_impl(impl: str, seq_len: int, batch_heads: int = 1, head_dims: tuple[int, int] | None = None) -> str:
    """Maps ``"auto"`` and ``"pallas"`` to a concrete impl name; rejects unknown names.

    ``"pallas"`` on GPU is ``pallas_triton_fused_backward``, or ``pallas_mosaic_gpu`` on Hopper
    when there are at least ``MOSAIC_MIN_BATCH_HEADS`` states (``batch_heads`` = B x H) and its
    walks fit shared memory at ``head_dims`` = (d_k, d_v) (not given: Triton)."""
    backend = jax.default_backend()
    if impl == "auto":
        if seq_len == 1:
            return "recurrent"
        impl = "pallas" if backend in ("gpu", "tpu") else "chunked"
    if impl == "pallas":
        if backend == "tpu":
            return "pallas_mosaic_tpu"
        if (batch_heads >= MOSAIC_MIN_BATCH_HEADS and head_dims is not None
                and fits_shared_memory(*head_dims) and is_hopper()):
            return "pallas_mosaic_gpu"
        return "pallas_triton_fused_backward"
    if impl not in IMPLS:
        raise ValueError(f"unknown gated_delta_rule impl {impl!r}; choose one of {['auto', 'pallas', *IMPLS]}")
    return impl


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None, impl="auto"):
    """Gated delta rule over a sequence (FLA's ``chunk_gated_delta_rule`` without in-kernel L2 norm).

    Per head, state ``S`` in ``R^{K x V}`` (zero, or ``initial_state``); for each token t:
    ``S <- exp(g_t) S;  u = beta_t (v_t - S^T k_t);  S <- S + k_t u^T;  o_t = S^T (scale q_t)``.
    A token whose segment id differs from the previous token's starts from ``S = 0``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (any float dtype).
      g: ``[B, T, H]`` log-decay (<= 0); beta: ``[B, T, H]`` write strength.
      scale: query scale; default ``K ** -0.5``.
      initial_state: optional ``[B, H, K, V]`` state entering token 0.
      segment_ids: optional ``[B, T]`` integer ids of packed sequences.
      impl: ``"auto"``, ``"recurrent"``, ``"chunked"``, ``"pallas"`` or a named Pallas variant.

    Returns:
      ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype, final_state ``[B, H, K, V]`` float32.
    """
    _check_shapes(q, k, v, g, beta, initial_state, segment_ids)
    batch, seq_len, heads, d_k = q.shape
    fn = IMPLS[resolve_impl(impl, seq_len, batch * heads, (d_k, v.shape[-1]))]
    if scale is None:
        scale = d_k ** -0.5
    matmul_dtype = matmul_dtype_for(v.dtype)
    qkv = [x.astype(matmul_dtype) for x in (q, k, v)]  # only ever matmul operands, or promoted to float32
    g, beta = (x.astype(jnp.float32) for x in (g, beta))
    if initial_state is None:
        initial_state = jnp.zeros((batch, heads, d_k, v.shape[-1]), jnp.float32)
    reset = segment_resets(segment_ids, seq_len, batch)
    o, final_state = fn(*qkv, g, beta, float(scale), initial_state.astype(jnp.float32), reset, matmul_dtype)
    return o.astype(v.dtype), final_state
