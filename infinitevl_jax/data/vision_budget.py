"""A fixed per-row patch budget for the vision tower, so packed batches have static shapes.

The ViT's layout (``models.vision.vision_layout``) depends on the images' grids: patches ``N``,
windowed-attention groups ``[G_w, L_w]`` and full-attention groups (one per temporal slice)
``[G_s, L_s]``. A packed row instead gets a ``VisionBudget`` of fixed sizes and its layout is
padded up to them (``padded_layout``):

- pixel rows ``N -> patches`` (pad rows are zeros and sit after the real ones, so they form
  whole merged tokens of their own that no placeholder reads);
- groups ``G -> windows`` / ``slices`` (extra groups hold patch 0 with length 1: finite and unread);
- group width ``L -> window_patches`` / ``slice_patches`` (extra slots are masked as keys by the
  group lengths, so real outputs are unchanged);
- pad patches read their output from slot 0 (unused).

Cost: each ViT block scores ``windows * window_patches**2`` or ``slices * slice_patches**2``
entries per head and row. ``VisionBudget.for_config`` picks defaults from the patch budget and
the processors' pixel bounds; data sets of one image size can set tighter ``max_windows`` /
``max_slices`` / ``max_slice_patches``. The packer (``packing.py``) never exceeds the budget:
an example goes only where its patches, windows, slices and widest slice all fit, and one that
exceeds an empty row's budget is dropped and counted.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from infinitevl_jax.models.config import VisionConfig
from infinitevl_jax.models.vision import AttentionGroups, VisionLayout, vision_layout


class Footprint(NamedTuple):
    """What a set of vision items uses of a budget: patches, windows, slices, widest slice."""

    patches: int
    windows: int
    slices: int
    widest_slice: int

    def __add__(self, other: "Footprint") -> "Footprint":
        return Footprint(self.patches + other.patches, self.windows + other.windows, self.slices + other.slices,
                         max(self.widest_slice, other.widest_slice))


NO_VISION = Footprint(0, 0, 0, 0)


def footprint(grid_thw, vision: VisionConfig) -> Footprint:
    """Footprint of items with grids ``[n, 3]`` (t, h, w in patches): windows tile each slice's
    ``(h/merge) x (w/merge)`` merged grid with ``window_merged``-sided squares from the top left."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    if not grid.size:
        return NO_VISION
    t, h, w = grid.T
    side, window = vision.spatial_merge_size, vision.window_merged
    windows = t * -(-(h // side) // window) * -(-(w // side) // window)
    return Footprint(int((t * h * w).sum()), int(windows.sum()), int(t.sum()), int((h * w).max()))


@dataclasses.dataclass(frozen=True)
class VisionBudget:
    """Per-row capacities (module docstring). ``window_patches`` is fixed by the config
    (``window_merged**2 * merge_unit``); ``patches`` is a multiple of ``merge_unit``."""

    patches: int
    windows: int
    window_patches: int
    slices: int
    slice_patches: int

    def __post_init__(self):
        if min(dataclasses.astuple(self)) < 1:
            raise ValueError(f"every vision budget size must be positive; got {self}")

    @classmethod
    def for_config(cls, vision: VisionConfig, max_patches: int, *, max_windows: int | None = None,
                   max_slices: int | None = None, max_slice_patches: int | None = None,
                   min_pixels: int | None = None, max_pixels: int | None = None) -> "VisionBudget":
        """Defaults: ``max_windows = patches / merge_unit`` (a window holds at least one merged
        token, so this always suffices), ``max_slice_patches`` = the largest slice ``max_pixels``
        allows (at most ``patches``), ``max_slices = patches / (min_pixels in patches)`` (the
        usual smallest slice; rows of smaller images just close earlier: the packer enforces
        every capacity)."""
        unit = vision.merge_unit
        if max_patches < unit or max_patches % unit:
            raise ValueError(f"max_patches ({max_patches}) must be a positive multiple of merge_unit ({unit})")
        merged_area = (vision.patch_size * vision.spatial_merge_size) ** 2
        if max_slice_patches is None:
            largest = max_patches if max_pixels is None else max(1, max_pixels // merged_area) * unit
            max_slice_patches = min(max_patches, largest)
        if max_slices is None:
            smallest = unit if min_pixels is None else max(1, min_pixels // merged_area) * unit
            max_slices = max(1, max_patches // smallest)
        if max_windows is None:
            max_windows = max_patches // unit
        return cls(patches=max_patches, windows=max_windows,
                   window_patches=vision.window_merged ** 2 * unit, slices=max_slices, slice_patches=max_slice_patches)

    def admits(self, used: Footprint) -> bool:
        """Whether a row using ``used`` stays within every capacity."""
        return (used.patches <= self.patches and used.windows <= self.windows and used.slices <= self.slices
                and used.widest_slice <= self.slice_patches)


def _pad_groups(groups: AttentionGroups | None, count: int, width: int, patches: int) -> AttentionGroups:
    """Groups ``[G, L]`` padded to ``[count, width]``; positions re-based to the new width."""
    index = np.zeros((count, width), np.int32)
    lengths = np.ones(count, np.int32)
    position = np.zeros(patches, np.int32)
    if groups is not None:
        num, old_width = groups.index.shape
        index[:num, :old_width] = groups.index
        lengths[:num] = groups.lengths
        slot = groups.position.astype(np.int64)
        position[:slot.size] = slot // old_width * width + slot % old_width
    return AttentionGroups(index, lengths, position)


def padded_layout(vision: VisionConfig, grid_thw, budget: VisionBudget) -> VisionLayout:
    """``vision_layout`` of items with grids ``[n, 3]`` (n may be 0) padded to ``budget``'s sizes:
    rows, cols ``[patches]``; window groups ``[windows, window_patches]``; slice groups
    ``[slices, slice_patches]`` (module docstring)."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    used = footprint(grid, vision)
    if not budget.admits(used):
        raise ValueError(f"vision items use {used}, beyond the row budget {budget}")
    rows, cols = np.zeros(budget.patches, np.int32), np.zeros(budget.patches, np.int32)
    layout = vision_layout(vision, grid) if grid.size else None
    if layout is not None:
        rows[:used.patches], cols[:used.patches] = layout.rows, layout.cols
    window, full = (None, None) if layout is None else (layout.window, layout.full)
    return VisionLayout(rows, cols, _pad_groups(window, budget.windows, budget.window_patches, budget.patches),
                        _pad_groups(full, budget.slices, budget.slice_patches, budget.patches))

