"""Parameter-holding building blocks: dense map, RMSNorm, gated RMSNorm, SwiGLU MLP.

Every parameter carries ``logical_axes`` metadata (names such as ``embed``, ``mlp``, ``heads``);
the trainer's rules table maps those names to mesh axes. Model code never names mesh axes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


MIN_MATMUL_ROWS = 8


def matmul_min_rows(x, kernel):
    """``x @ kernel`` for ``x`` ``[..., in]``, with fewer than ``MIN_MATMUL_ROWS`` rows zero-padded
    to that many (and cut back): same values, but it stays a matmul on GPU.

    XLA's GPU compiler rewrites a matmul with rows * in * out < 1e7 (a decode step's one-row
    projections) as an elementwise bf16 multiply (products rounded to bf16, materialised) and a
    reduction, which streamed the weights at ~0.5 TB/s on an H200 against ~3.2 TB/s for its GEMM
    kernels (benchmarks/decode_profile_gpu); eight rows keep the projections of a 2048-wide
    model above that threshold, so they run as GEMMs with float32 accumulation.
    """
    rows = int(np.prod(x.shape[:-1]))
    if rows >= MIN_MATMUL_ROWS:
        return jnp.dot(x, kernel)
    flat = jnp.pad(x.reshape(rows, x.shape[-1]), ((0, MIN_MATMUL_ROWS - rows), (0, 0)))
    return jnp.dot(flat, kernel)[:rows].reshape(*x.shape[:-1], kernel.shape[-1])


# Projections that read the same activations of many rows take them through one optimization
# barrier (``gemm_operands``). Without it XLA's GPU compiler joins them (its dot merger) into one
# Triton GEMM that concatenates the weights and absorbs the RMSNorm's scale. On an H200
# (benchmarks/RESULTS.md, the frame profile) the decoder MLP's gate and up projections for a
# streamed frame's 256 rows ran so at 62.8 us per layer (the weights read at ~1.4 TB/s), and as
# two GEMMs behind the barrier at 2 x 22.3 us. Not everywhere: a decode step's 8 rows ran faster
# merged, and so did the GDN's q/k/v/gate projections and the ViT's MLP (1,024 rows, biases). Read
# when a model is traced (benchmarks/streaming_gpu.py sets it per process).
SEPARATE_GEMM_OPERANDS = True
SEPARATE_GEMM_MIN_ROWS = 64  # fewer rows (decode steps): the shared operand stays as it is


def gemm_operands(x, count: int) -> tuple:
    """``count`` copies of ``x`` ``[..., in]`` for ``count`` projections. With
    ``SEPARATE_GEMM_OPERANDS`` and at least ``SEPARATE_GEMM_MIN_ROWS`` rows each is its own
    operand behind one ``optimization_barrier`` (same values; XLA can neither merge the GEMMs nor
    fuse x's producer into them)."""
    copies = (x,) * count
    rows = int(np.prod(x.shape[:-1]))
    if SEPARATE_GEMM_OPERANDS and rows >= SEPARATE_GEMM_MIN_ROWS:
        return jax.lax.optimization_barrier(copies)
    return copies


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel ``[in, out]`` (PyTorch Linear weight transposed)."""

    def __init__(self, in_features, out_features, *, axes, use_bias=False, dtype, param_dtype, rngs,
                 kernel_init=None):
        init = kernel_init or nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype),
                                logical_axes=tuple(axes))
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x):
        return affine(x, self.kernel, self.bias, self.dtype)


def affine(x, kernel, bias, dtype):
    """``x @ kernel (+ bias)`` in ``dtype`` (``matmul_min_rows``); kernel and bias are Params (bias may be None)."""
    y = matmul_min_rows(x.astype(dtype), kernel[...].astype(dtype))
    if bias is not None:
        y = y + bias[...].astype(dtype)
    return y


def rms_normalize(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: ``w * cast(x_f32 * rsqrt(mean(x_f32^2) + eps))`` (normalise in float32)."""

    def __init__(self, dim, *, eps, dtype, param_dtype, axis_name="embed"):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        return self.weight[...].astype(self.dtype) * rms_normalize(x, self.eps).astype(self.dtype)


class GatedRMSNorm(nnx.Module):
    """FLA's FusedRMSNormGated with swish gate: ``RMSNorm(o) * w * SiLU(gate)``, in float32.

    Normalises over the last axis (a head's ``d_v``); one weight ``[d_v]`` shared by all heads.
    """

    def __init__(self, dim, *, eps, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("head_dim",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, o, gate):
        y = rms_normalize(o, self.eps) * self.weight[...].astype(jnp.float32)
        return (y * jax.nn.silu(gate.astype(jnp.float32))).astype(self.dtype)


class SwiGLU(nnx.Module):
    """``down(SiLU(gate(x)) * up(x))``; biases on all three maps when ``use_bias`` (the ViT's MLP).
    ``separate_operands``: gate and up read x through ``gemm_operands`` (the decoder's MLP)."""

    def __init__(self, hidden, intermediate, *, use_bias=False, separate_operands=True, dtype, param_dtype, rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(hidden, intermediate, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(intermediate, hidden, axes=("mlp", "embed"), **kw)
        self.separate_operands = separate_operands

    def __call__(self, x):
        x_gate, x_up = gemm_operands(x, 2) if self.separate_operands else (x, x)
        return self.down_proj(jax.nn.silu(self.gate_proj(x_gate)) * self.up_proj(x_up))


def parameter_count(module: nnx.Module | None) -> int:
    """Parameters of a module, concrete or abstract (``nnx.eval_shape``); 0 for None."""
    if module is None:
        return 0
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))
