"""Stacked, scanned blocks: N copies of one module with parameters on a leading axis, run by
``lax.scan`` so compile time does not grow with depth (the decoder's and the ViT's blocks); and
their unstacked form for GPU inference (``unstack``, ``run_unrolled``)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
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


def _checkpointed(body: Callable, remat: str) -> Callable:
    return body if remat == "none" else jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)


def scan_stacked(blocks: nnx.Module, step: Callable, carry, xs=None, remat: str = "none"):
    """``lax.scan`` of ``step(block, carry, x) -> (carry, y)`` over the stacked ``blocks`` (and
    ``xs``, stacked the same way, or None); ``remat`` names a policy of ``REMAT`` or "none"."""
    graphdef, state = nnx.split(blocks)

    def body(c, inputs):
        block_state, x = inputs
        return step(nnx.merge(graphdef, block_state), c, x)

    return jax.lax.scan(_checkpointed(body, remat), carry, (state, xs))


def scan_stacked_updating(blocks: nnx.Module, step: Callable, carry, stacked_state, remat: str = "none"):
    """``lax.scan`` of ``step(block, carry, state_i) -> (carry, new_state_i)`` over the stacked
    ``blocks``, where ``stacked_state`` (a pytree stacked on axis 0 like the blocks: a decode
    cache) rides in the loop's carry and block i's slice is written back in place
    (``dynamic_update_slice``). Returns ``(carry, new stacked_state)``.

    Same values as ``scan_stacked`` with the state as xs -> ys, but without a second buffer for
    the ys: a donated carry is updated where it lies (tests/test_infer.py checks that a decode
    step's scratch stays below its cache's size).
    """
    graphdef, params = nnx.split(blocks)
    count = jax.tree.leaves(params)[0].shape[0]

    def body(c, inputs):
        h, state = c
        block_params, i = inputs
        mine = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
        h, new = step(nnx.merge(graphdef, block_params), h, mine)
        state = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u.astype(a.dtype), i, 0),
                             state, new)
        return (h, state), None

    (carry, stacked_state), _ = jax.lax.scan(_checkpointed(body, remat), (carry, stacked_state),
                                             (params, jnp.arange(count)))
    return carry, stacked_state


def unstack(blocks: nnx.Module) -> nnx.List:
    """The ``count`` blocks of a stacked module as separate modules, each holding its own copy of
    its slice of the parameters (the stacked module is left as it is)."""
    graphdef, state = nnx.split(blocks)
    count = jax.tree.leaves(state)[0].shape[0]
    return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(count)])


def with_unstacked_blocks(module: nnx.Module) -> nnx.Module:
    """A copy of ``module`` (new module objects around the same arrays) whose stacked ``blocks``
    are replaced by ``unstack(module.blocks)``; ``module`` itself if they are already separate."""
    if isinstance(module.blocks, nnx.List):
        return module
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, state)
    copy.blocks = unstack(module.blocks)
    return copy


def run_blocks(blocks, step: Callable, carry, remat: str = "none"):
    """``step(block, carry) -> carry`` over every block: ``lax.scan`` of stacked blocks, a Python
    loop over separate ones (``nnx.List``, see ``run_unrolled``)."""
    if isinstance(blocks, nnx.List):
        return run_unrolled(blocks, lambda block, c, _: (step(block, c), None), carry)[0]
    return scan_stacked(blocks, lambda block, c, _: (step(block, c), None), carry, remat=remat)[0]


def run_unrolled(blocks: nnx.List, step: Callable, carry, stacked_state=None):
    """``scan_stacked_updating`` over separate blocks (``unstack``), as a Python loop: ``step(block,
    carry, state_i) -> (carry, new_state_i)`` with block i's slice of ``stacked_state`` (or None)
    written back in place. Returns ``(carry, new stacked_state or None)``.

    Why: in a scan, XLA on GPU copies each block's weight slice out of the stack before a GEMM
    reads it, so a decode step moved every weight twice (benchmarks/decode_profile_gpu); separate
    arrays are read where they lie. Rematerialisation does not apply (inference only).
    """
    for i, block in enumerate(blocks):
        mine = None if stacked_state is None else jax.tree.map(lambda a: a[i], stacked_state)
        carry, new = step(block, carry, mine)
        if stacked_state is not None:
            stacked_state = jax.tree.map(lambda a, u: a.at[i].set(u.astype(a.dtype)), stacked_state, new)
    return carry, stacked_state
