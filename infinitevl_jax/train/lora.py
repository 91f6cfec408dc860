"""LoRA adapters on named ``Dense`` maps, and their merge back into the base weights.

    y = x W (+ b) + (alpha / r) (x A) B,    A ``[in, r]`` ~ U(-1/sqrt(in), 1/sqrt(in)),  B ``[r, out]`` = 0

so a freshly adapted model computes exactly what the base model computes. ``apply_lora`` swaps
each target ``Dense`` (matched by attribute name, e.g. ``q_proj``, under ``scope``) for a
``LoRADense`` that keeps the base ``kernel``/``bias`` variables, so base parameter paths do not
change and the adapters appear as ``.../q_proj/lora_a`` and ``.../lora_b`` (the ``lora``
trainable group). Inside the scanned decoder blocks every array has the leading block axis, so
adapters are stacked the same way. ``merge_lora`` folds ``(alpha / r) A B`` into ``W`` and puts
plain ``Dense`` maps back (for export).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.models.layers import Dense, affine


class LoRADense(nnx.Module):
    """A ``Dense`` plus a rank-``r`` update; the base ``kernel`` ``[..., in, out]`` (and ``bias``)
    are the wrapped map's own variables."""

    def __init__(self, base: Dense, *, rank: int, alpha: float, key: jax.Array):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {rank}")
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        *lead, fan_in, fan_out = self.kernel.shape
        axes = self.kernel.get_metadata().get("logical_axes") or (None, None)
        param_dtype = self.kernel[...].dtype
        bound = 1.0 / fan_in ** 0.5
        self.lora_a = nnx.Param(jax.random.uniform(key, (*lead, fan_in, rank), param_dtype, -bound, bound),
                                logical_axes=(axes[0], None))
        self.lora_b = nnx.Param(jnp.zeros((*lead, rank, fan_out), param_dtype), logical_axes=(None, axes[1]))
        self.scale = alpha / rank

    def __call__(self, x):
        y = affine(x, self.kernel, self.bias, self.dtype)  # exactly the base map's
        low = jnp.dot(x.astype(self.dtype), self.lora_a[...].astype(self.dtype))
        return y + self.scale * jnp.dot(low, self.lora_b[...].astype(self.dtype))

    def merged_kernel(self) -> jax.Array:
        """``W + (alpha / r) A B`` in the kernel's dtype (matmul in float32), ``[..., in, out]``."""
        delta = jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
        return (self.kernel[...].astype(jnp.float32) + self.scale * delta).astype(self.kernel[...].dtype)


def _targets(model: nnx.Module, kind, names: Sequence[str] | None = None,
             scope: Sequence[str] = ()) -> list[tuple[nnx.Module, str]]:
    """(parent module, attribute name) of every ``kind`` child named in ``names`` (None: any
    name) whose parent's path starts with ``scope``."""
    found = []
    for path, module in nnx.iter_modules(model):
        if tuple(path[:len(scope)]) != tuple(scope):
            continue
        for name, child in vars(module).items():
            if isinstance(child, kind) and (names is None or name in names):
                found.append((module, name))
    return found


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str], seed: int = 0,
               scope: Sequence[str] = ("language_model",)) -> int:
    """Wraps every ``Dense`` attribute named in ``targets`` under ``scope`` in a ``LoRADense``
    (in place); returns how many were wrapped. Raises if none matches."""
    found = _targets(model, Dense, targets, scope)
    if not found:
        raise ValueError(f"no Dense named {tuple(targets)} under {tuple(scope)}; nothing to adapt")
    keys = jax.random.split(jax.random.key(seed), len(found))
    for (module, name), key in zip(found, keys):
        setattr(module, name, LoRADense(getattr(module, name), rank=rank, alpha=alpha, key=key))
    return len(found)


def merge_lora(model: nnx.Module) -> int:
    """Replaces every ``LoRADense`` by a plain ``Dense`` with the merged kernel (in place);
    returns how many were merged. The model then has the base model's parameter tree."""
    found = _targets(model, LoRADense)
    for module, name in found:
        lora = getattr(module, name)
        kernel = lora.merged_kernel()
        axes = lora.kernel.get_metadata().get("logical_axes")
        dense = Dense(kernel.shape[-2], kernel.shape[-1], axes=axes, use_bias=lora.bias is not None,
                      dtype=lora.dtype, param_dtype=kernel.dtype, rngs=nnx.Rngs(0),
                      kernel_init=lambda *_, merged=kernel: merged)
        dense.bias = lora.bias
        setattr(module, name, dense)
    return len(found)
