"""What every Pallas kernel lowered through Triton shares: the backend choice and Triton's
power-of-two tile dims.

GPU lowering is Triton, chosen explicitly through ``compiler_params`` (jax 0.11 would otherwise
lower ``pallas_call`` through Mosaic GPU; 0.12 defaults to Triton); on CPU the kernels run in
Pallas' interpret mode (tests). Any other backend is an error.
"""

from __future__ import annotations

import jax

MIN_DOT_DIM = 16  # Triton's smallest dot operand dimension


def next_power_of_two(x: int, minimum: int = MIN_DOT_DIM) -> int:
    """The smallest power of two >= ``x`` and >= ``minimum`` (Triton tiles are powers of two)."""
    return max(minimum, 1 << (x - 1).bit_length())


def triton_backend(num_warps: int, num_stages: int) -> tuple:
    """``(interpret, compiler_params)`` for the default backend: Triton with these launch
    settings on GPU, interpret mode (no params) on CPU."""
    backend = jax.default_backend()
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return False, pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if backend == "cpu":
        return True, None
    raise ValueError(f"the Triton kernels run on GPU (or interpreted on CPU), not on {backend!r}")
