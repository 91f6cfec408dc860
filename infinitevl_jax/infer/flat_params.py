"""A module split once into a static skeleton and a flat list of its arrays, for plain ``jax.jit``.

``jax.jit`` flattens its pytree arguments on every call. An ``nnx.State`` flattens in Python,
about 2 us per array (1 ms per call for the 596 arrays of an unrolled InfiniteVL-4B decoder on a
2-core CPU); a list of arrays flattens in C++. So the compiled inference functions take the
parameters as a list and rebuild the module inside the trace (``merge_flat``), where it costs
nothing at run time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import nnx


class Skeleton(NamedTuple):
    """What ``merge_flat`` needs besides the arrays; hashable, so it can be a static argument."""

    graphdef: Any  # nnx.GraphDef
    treedef: Any  # jax.tree_util.PyTreeDef of the module's nnx.State


def split_flat(module: nnx.Module) -> tuple[Skeleton, nnx.State, list[jax.Array]]:
    """``(skeleton, state, leaves)``: ``nnx.split`` plus the state's arrays as a flat list."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    return Skeleton(graphdef, treedef), state, leaves


def unroll_by_default(unroll_layers: bool | None) -> bool:
    """An inference engine's ``unroll_layers``: as given, or (None) True on GPU, where a scan
    copies each block's weights out of their stack before reading them (``DecoderEngine``)."""
    return jax.default_backend() == "gpu" if unroll_layers is None else unroll_layers


def merge_flat(skeleton: Skeleton, leaves) -> nnx.Module:
    """The module back from ``split_flat``'s skeleton and (possibly traced) arrays."""
    return nnx.merge(skeleton.graphdef, jax.tree.unflatten(skeleton.treedef, leaves))
