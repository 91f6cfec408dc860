"""Sequence packing: tokenised examples -> fixed-shape batches of ``rows x seq_len`` tokens.

Each row holds whole examples back to back; ``segment_ids`` number them 1, 2, ... and mark the
tail padding 0. The decoder resets Gated DeltaNet states and conv taps and masks attention at
segment boundaries, and every example keeps its own mRoPE ids (from 0), so a packed example
computes exactly what it computes alone. Next-token targets are shifted inside each segment:

    targets[t]   = input_ids[t + 1]   if t and t + 1 lie in the same segment, else 0
    loss_mask[t] = label_mask[t + 1]  under the same condition, else 0 (float32)

so no target crosses a boundary (and the last token of a segment predicts nothing).
Vision: each row owns a fixed ``VisionBudget``; its images and videos, in token order, fill
``pixel_values[b, :n]`` and a padded layout (``vision_budget.padded_layout``).

Placement (``BatchPlanner``): first fit inside the batch being built; the first example that fits
in none of its rows closes the batch and opens the next one. An example too large for an empty row
(more than ``seq_len`` tokens, or beyond the vision budget) is dropped and counted (the count is
part of the iterator state and logged); 1,000 drops in a row raise an error, since then the
settings cannot fit the data. ``PackIterDataset`` is the grain transformation; its iterator state
is the parent's state before the example waiting for the next batch, plus the drop count, so a
restored iterator continues with exactly the batches an uninterrupted one would produce.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import NamedTuple

import grain
import jax
import numpy as np

from infinitevl_jax.data.examples import Example
from infinitevl_jax.data.vision_budget import NO_VISION, Footprint, VisionBudget, footprint, padded_layout
from infinitevl_jax.models.config import MultimodalTokens, VisionConfig
from infinitevl_jax.models.vision import VisionLayout

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_DROPS = 1000


class PackedBatch(NamedTuple):
    """A batch of packed rows; every array is batch-leading (B rows, T = seq_len).

    input_ids, segment_ids, targets: int32 ``[B, T]`` (padding: id 0, segment 0);
    position_ids: int32 ``[B, 3, T]`` (mRoPE; the decoder takes ``transpose(1, 0, 2)``);
    loss_mask: float32 ``[B, T]`` (1 where ``targets`` is an assistant label token);
    pixel_values: float32 ``[B, P, patch_dim]`` and vision_layout: ``VisionLayout`` with a leading
    ``B`` axis on every array (both None for text-only models).
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    pixel_values: np.ndarray | None = None
    vision_layout: VisionLayout | None = None


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    """Row geometry: ``rows`` per batch of ``seq_len`` tokens; the vision budget per row (None
    for text-only models, then ``vision`` is None too)."""

    rows: int
    seq_len: int
    tokens: MultimodalTokens
    vision: VisionConfig | None = None
    budget: VisionBudget | None = None

    def __post_init__(self):
        if self.rows < 1 or self.seq_len < 2:
            raise ValueError(f"need rows >= 1 and seq_len >= 2; got {self.rows}, {self.seq_len}")
        if (self.vision is None) != (self.budget is None):
            raise ValueError("give both a vision config and a vision budget, or neither (text-only)")
        if self.budget is not None and self.budget.patches % self.vision.merge_unit:
            raise ValueError(f"the patch budget ({self.budget.patches}) must be a multiple of merge_unit")

    def vision_footprint(self, example: Example) -> Footprint:
        if self.vision is None:
            if example.vision:
                raise ValueError(f"{example.name}: has vision inputs but the packing spec is text-only")
            return NO_VISION
        grids = [example.vision[key] for key in ("image_grid_thw", "video_grid_thw") if key in example.vision]
        return footprint(np.concatenate(grids), self.vision) if grids else NO_VISION

    def fits_alone(self, example: Example) -> bool:
        """Whether the example fits an empty row (else it can never be packed)."""
        return len(example) <= self.seq_len and (self.budget is None or
                                                 self.budget.admits(self.vision_footprint(example)))


def vision_items(example: Example, spec: PackingSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """The example's images and videos in token order, as ``(pixel rows [n, patch_dim], grid [3])``."""
    queues = {}
    for token_id, (pixels_key, grid_key) in ((spec.tokens.image_token_id, ("pixel_values", "image_grid_thw")),
                                            (spec.tokens.video_token_id, ("pixel_values_videos", "video_grid_thw"))):
        grids = example.vision.get(grid_key, np.zeros((0, 3), np.int64))
        bounds = np.concatenate([[0], np.cumsum(grids.prod(-1))])
        queues[token_id] = iter([(example.vision[pixels_key][lo:hi], grid)
                                 for lo, hi, grid in zip(bounds[:-1], bounds[1:], grids)])
    ids = example.input_ids
    starts = np.flatnonzero(np.isin(ids, list(queues)))
    items, i = [], 0
    while i < starts.size:
        rows, grid = next(queues[int(ids[starts[i]])])
        items.append((rows, grid))
        i += int(grid.prod()) // spec.vision.merge_unit
    return items


def _stack(trees):
    return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def assemble_batch(rows: list[list[Example]], spec: PackingSpec) -> PackedBatch:
    """Packs ``rows`` (each a list of examples that fit one row; at most ``spec.rows`` of them,
    the rest padding) into a ``PackedBatch`` (module docstring)."""
    if len(rows) > spec.rows:
        raise ValueError(f"{len(rows)} rows given for a batch of {spec.rows}")
    rows = list(rows) + [[] for _ in range(spec.rows - len(rows))]
    shape = (spec.rows, spec.seq_len)
    input_ids, segment_ids, targets = (np.zeros(shape, np.int32) for _ in range(3))
    loss_mask = np.zeros(shape, np.float32)
    position_ids = np.zeros((spec.rows, 3, spec.seq_len), np.int32)
    pixel_rows, layouts = [], []
    for b, row in enumerate(rows):
        offset = 0
        for segment, example in enumerate(row, 1):
            n = len(example)
            if offset + n > spec.seq_len:
                raise ValueError(f"row {b} holds {offset + n} tokens > seq_len {spec.seq_len}")
            span = slice(offset, offset + n)
            input_ids[b, span], segment_ids[b, span] = example.input_ids, segment
            position_ids[b, :, span] = example.position_ids
            targets[b, offset:offset + n - 1] = example.input_ids[1:]
            loss_mask[b, offset:offset + n - 1] = example.label_mask[1:]
            offset += n
        if spec.vision is not None:
            items = [item for example in row for item in vision_items(example, spec)]
            grids = np.asarray([grid for _, grid in items], np.int64).reshape(-1, 3)
            layouts.append(padded_layout(spec.vision, grids, spec.budget))  # checks the budget
            pixels = np.zeros((spec.budget.patches, spec.vision.patch_dim), np.float32)
            if items:
                real = np.concatenate([patches for patches, _ in items])
                pixels[:real.shape[0]] = real
            pixel_rows.append(pixels)
    vision = (None, None) if spec.vision is None else (np.stack(pixel_rows), _stack(layouts))
    return PackedBatch(input_ids, segment_ids, position_ids, targets, loss_mask, *vision)


class BatchPlanner:
    """First-fit placement of examples into the rows of one batch (module docstring)."""

    def __init__(self, spec: PackingSpec):
        self.spec = spec
        self.rows: list[list[Example]] = [[] for _ in range(spec.rows)]
        self._tokens = [0] * spec.rows
        self._vision = [NO_VISION] * spec.rows

    @property
    def empty(self) -> bool:
        return not any(self._tokens)

    def add(self, example: Example) -> bool:
        """Places the example in the first row with room for it; False if no row has room."""
        used = self.spec.vision_footprint(example)
        for b in range(self.spec.rows):
            total = self._vision[b] + used
            if self._tokens[b] + len(example) <= self.spec.seq_len and (
                    self.spec.budget is None or self.spec.budget.admits(total)):
                self.rows[b].append(example)
                self._tokens[b] += len(example)
                self._vision[b] = total
                return True
        return False

    def assemble(self) -> PackedBatch:
        return assemble_batch(self.rows, self.spec)


class PackIterDataset(grain.IterDataset):
    """grain transformation: an ``IterDataset`` of ``Example`` -> one of ``PackedBatch``.

    A finite parent ends with a last, partly filled batch (its empty rows are padding).
    """

    def __init__(self, parent: grain.IterDataset, spec: PackingSpec):
        super().__init__(parent)
        self.spec = spec

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self.spec)

    def __str__(self) -> str:
        return f"PackIterDataset(rows={self.spec.rows}, seq_len={self.spec.seq_len})"


class _PackIterator(grain.DatasetIterator):
    """State: ``{"parent": parent state before the waiting example, "dropped": count}``."""

    def __init__(self, parent: grain.DatasetIterator, spec: PackingSpec):
        super().__init__(parent)
        self._spec = spec
        self._waiting: Example | None = None  # read, but did not fit the last batch
        self._waiting_state = None
        self._dropped = 0

    def __next__(self) -> PackedBatch:
        planner = BatchPlanner(self._spec)
        consecutive_drops = 0
        while True:
            if self._waiting is None:
                state = copy.deepcopy(self._parent.get_state())
                try:
                    example = next(self._parent)
                except StopIteration:
                    break
                if not self._spec.fits_alone(example):
                    consecutive_drops += 1
                    self._drop(example, consecutive_drops)
                    continue
                self._waiting, self._waiting_state = example, state
            consecutive_drops = 0
            if not planner.add(self._waiting):
                break
            self._waiting = None
        if planner.empty:
            raise StopIteration
        return planner.assemble()

    def _drop(self, example: Example, consecutive: int):
        self._dropped += 1
        spec = self._spec
        if self._dropped == 1 or self._dropped % 100 == 0:
            log.warning("packing dropped %d example(s) too large for one row (latest: %s, %d tokens, vision %s; "
                        "seq_len %d, budget %s)", self._dropped, example.name, len(example),
                        spec.vision_footprint(example), spec.seq_len, spec.budget)
        if consecutive >= MAX_CONSECUTIVE_DROPS:
            raise ValueError(f"{consecutive} consecutive examples do not fit an empty row (seq_len {spec.seq_len}, "
                             f"vision budget {spec.budget}); raise data.seq_len / data.max_patches")

    @property
    def dropped(self) -> int:
        """Examples dropped so far because they exceed one row."""
        return self._dropped

    def get_state(self) -> dict:
        parent = self._waiting_state if self._waiting is not None else self._parent.get_state()
        return {"parent": copy.deepcopy(parent), "dropped": self._dropped}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._waiting, self._waiting_state = None, None
        self._dropped = int(state["dropped"])
