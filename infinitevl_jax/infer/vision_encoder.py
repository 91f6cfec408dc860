"""Compiled calls of one vision tower, for inference: pixel rows or uint8 frames in, merged tokens out.

``models.vision.encode_vision`` (``nnx.jit``) walks the tower's module graph in Python on every
call, which took longer than the ViT itself for a streamed 448 x 448 frame. ``VisionEncoder``
splits the tower once (``flat_params``), caches the device layout per grid (bounded), and has a second
entry, ``encode_frames``, that uploads the resized frames as uint8 and normalises and patchifies
them inside the jitted function (``FrameProcessor.rows_of_levels``: the image processor's values
bit for bit).

On GPU the tower runs unstacked by default (``VisionTransformer.unstacked``), for the reason
``DecoderEngine`` gives: in a scan, XLA copies each block's weights before reading them.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from infinitevl_jax.data.image_processor import FrameProcessor, load_image, patch_grid
from infinitevl_jax.infer.flat_params import merge_flat, split_flat, unroll_by_default
from infinitevl_jax.models.vision import VisionLayout, VisionTransformer, vision_layout


def _encode_rows(skeleton, params, pixel_values, layout):
    return merge_flat(skeleton, params).encode(pixel_values, layout)


def _encode_levels(skeleton, processor, params, levels, layout):
    return _encode_rows(skeleton, params, processor.rows_of_levels(levels, xp=jnp)[0], layout)


class VisionEncoder:
    """``encode`` (pixel rows, as ``encode_vision``) and ``encode_frames`` (images) of one tower.

    Args:
      source: the ``VisionTransformer``; after changing its weights call ``reload_weights``.
      processor: the image processor whose resize and normalisation ``encode_frames`` applies.
      unroll_layers: run ``source.unstacked()`` (default: on GPU); its block weights are copies.
      max_layouts: how many grids' device layouts to keep (least recently used dropped first): a
        stream has one grid, a server fed arbitrary image sizes would otherwise grow without
        bound. (Each distinct grid also compiles its own program, which jax caches.)
    """

    def __init__(self, source: VisionTransformer, processor: FrameProcessor, *, unroll_layers: bool | None = None,
                 max_layouts: int = 16):
        if max_layouts < 1:
            raise ValueError(f"max_layouts must be at least 1; got {max_layouts}")
        if processor.patch_size != source.cfg.patch_size or processor.merge_size != source.cfg.spatial_merge_size \
                or processor.temporal_patch_size != source.cfg.temporal_patch_size:
            raise ValueError(f"the processor's patch {processor.patch_size}, merge {processor.merge_size} and "
                             f"temporal patch {processor.temporal_patch_size} do not match the tower's config")
        self.source, self.processor = source, processor
        self.unroll_layers = unroll_by_default(unroll_layers)
        self.tower = self._runnable()
        skeleton, _, self._leaves = split_flat(self.tower)
        self._rows = jax.jit(functools.partial(_encode_rows, skeleton))
        self._levels = jax.jit(functools.partial(_encode_levels, skeleton, processor))
        self.max_layouts = max_layouts
        self._layouts: collections.OrderedDict[tuple, VisionLayout] = collections.OrderedDict()

    def _runnable(self) -> VisionTransformer:
        return self.source.unstacked() if self.unroll_layers else self.source

    def reload_weights(self):
        """Takes ``source``'s current weights; same shapes, so nothing recompiles."""
        self.tower = self._runnable()
        self._leaves = split_flat(self.tower)[2]

    def layout(self, grid_thw) -> VisionLayout:
        """``vision_layout`` of ``grid_thw [n, 3]``, built and put on the device once per distinct
        grid while it stays among the ``max_layouts`` most recently used."""
        grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
        key = tuple(map(tuple, grid.tolist()))
        if key in self._layouts:
            self._layouts.move_to_end(key)
        else:
            self._layouts[key] = jax.device_put(vision_layout(self.source.cfg, grid))
            if len(self._layouts) > self.max_layouts:
                self._layouts.popitem(last=False)
        return self._layouts[key]

    def encode(self, pixel_values, grid_thw):
        """``pixel_values [N, patch_dim]`` of the images/videos in ``grid_thw [n, 3]`` -> merged
        tokens ``[N / merge**2, out_hidden]`` (compute dtype)."""
        return self._rows(self._leaves, pixel_values, self.layout(grid_thw))

    def encode_frames(self, frames) -> tuple[jax.Array, tuple[int, int, int]]:
        """One image, or the frames of one video (PIL images, uint8 arrays or paths; one size), ->
        (merged tokens ``[t * h * w / merge**2, out_hidden]``, grid ``(t, h, w)``): the processor's
        resize on the host, then uint8 up, normalisation and patches on the device."""
        frames = list(frames) if isinstance(frames, (list, tuple)) else [frames]
        if not frames:
            raise ValueError("no frames given")
        levels = self.processor.resized([load_image(frame) for frame in frames])
        grid = patch_grid(levels.shape[:3], self.processor.patch_size, self.processor.temporal_patch_size)
        return self._levels(self._leaves, levels, self.layout([grid])), grid
