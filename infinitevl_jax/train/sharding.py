"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names the axes of every parameter logically (``embed``, ``mlp``, ``heads``, ...;
see ``models/layers.py``); stacked blocks add a leading axis that is never sharded. This module
is the only place that names mesh axes: ``data`` (batch), ``fsdp`` (batch and parameter
shards, ZeRO-3 style), ``tensor`` (Megatron-style model parallelism) and ``sequence``
(reserved for context parallelism).

A rule maps a logical name to one mesh axis, a tuple of mesh axes, or None (replicated). An
array dimension is sharded only over the rule's mesh axes that exist in the mesh, have size > 1
and divide the dimension; anything else is replicated, so one rules table serves every preset
on every mesh (e.g. the 16 GDN heads of ``a_proj`` replicate on an 8-way ``tensor`` axis only if
16 were not divisible).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": "sequence",
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "conv": None,
    "layers": None,
}


def make_mesh(*, data: int = 1, fsdp: int = -1, tensor: int = 1, sequence: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor, sequence)`` mesh over ``devices`` (default: all devices).

    One size may be -1: it takes whatever the others leave. Raises if the sizes do not
    multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "sequence": sequence}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1; got {free}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if any(v < 1 for v in sizes.values() if v != -1):
        raise ValueError(f"mesh axis sizes must be >= 1 (or one -1); got {sizes}")
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as {sizes}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; there are {len(devices)}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    # Auto axes: the compiler propagates shardings from parameters and batches (Explicit axes
    # would need output shardings spelled out in model code, e.g. for the embedding gather).
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(rule, dim: int, mesh: Mesh, used: set) -> tuple[str, ...] | None:
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    kept = []
    for axis in axes:
        size = mesh.shape.get(axis, 1)
        if size > 1 and axis not in used and dim % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
            kept.append(axis)
    used.update(kept)
    return tuple(kept) if kept else None


def partition_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Mapping[str, object] = LOGICAL_RULES) -> PartitionSpec:
    """Mesh partitioning of an array of ``shape`` whose trailing axes are ``logical_axes``.

    Leading axes beyond ``logical_axes`` (stacked blocks) are ``layers``; a mesh axis is used
    at most once per array.
    """
    if len(shape) < len(logical_axes):
        raise ValueError(f"array of shape {tuple(shape)} has fewer axes than its logical axes {logical_axes}")
    names = ("layers",) * (len(shape) - len(logical_axes)) + tuple(logical_axes)
    unknown = sorted({n for n in names if n is not None and n not in rules})
    if unknown:
        raise KeyError(f"logical axes {unknown} have no sharding rule; rules cover {sorted(rules)}")
    used: set = set()
    spec = [_mesh_axes_for(rules.get(n) if n else None, d, mesh, used) for n, d in zip(names, shape)]
    return PartitionSpec(*(s[0] if s and len(s) == 1 else s for s in spec))


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, object] = LOGICAL_RULES) -> nnx.State:
    """``NamedSharding`` per parameter of an (abstract or concrete) ``nnx.State``.

    Parameters are ``nnx.Variable``s carrying ``logical_axes`` metadata; one without it is
    replicated.
    """
    def sharding_of(variable):
        axes = variable.get_metadata().get("logical_axes") or ()
        return NamedSharding(mesh, partition_spec(axes, np.shape(variable.get_value()), mesh, rules))

    return jax.tree.map(sharding_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
