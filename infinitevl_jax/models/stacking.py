"""Stacked, scanned blocks: N copies of one module with parameters on a leading axis, run by
``lax.scan`` so compile time does not grow with depth (the decoder's and the ViT's blocks)."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

REMAT = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def stacked(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """``count`` independently initialised ``make(rngs)`` modules, parameters stacked on axis 0."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs):
        return make(rngs)

    return build(rngs)


def scan_stacked(blocks: nnx.Module, step: Callable, carry, xs=None, remat: str = "none"):
    """``lax.scan`` of ``step(block, carry, x) -> (carry, y)`` over the stacked ``blocks`` (and
    ``xs``, stacked the same way, or None); ``remat`` names a policy of ``REMAT`` or "none"."""
    graphdef, state = nnx.split(blocks)

    def body(c, inputs):
        block_state, x = inputs
        return step(nnx.merge(graphdef, block_state), c, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))
