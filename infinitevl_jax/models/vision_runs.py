"""Where the vision tokens of a sequence are, and the token orders M-MATE layers read them in.

A *vision run* is a maximal stretch of vision tokens (``<|image_pad|>`` / ``<|video_pad|>``
placeholders) inside one call of the decoder and one packed segment: one image, one video, or
one streamed frame. Inside a run every token has merged-grid coordinates (frame, row, col),
recovered from its mRoPE ids relative to the run's first token (whose ids are ``(s, s, s)``):

    row = id_h - id_h[first],  col = id_w - id_w[first],
    frame = number of earlier tokens of the run at (row, col) = (0, 0)   (a frame starts there)

With 1-D positions (no mRoPE) a run is one row: ``row = 0``, ``col`` = offset in the run.

Orders are permutations of the time axis that move vision tokens only inside their run, so text
tokens keep their places and causality across runs holds:

- ``scan_order``: row-major (frame, row, col) or column-major (frame, col, row) raster of each
  run, the Rotary Major Scan of LinGen switched from layer to layer;
- ``window_order``: Swin windows of (frames, rows, cols) grid cells, optionally shifted by half
  a window, each window contiguous (row-major inside), windows row-major; ``window_groups``
  names each window by the place of its first token.

All functions are jit-compatible and work on ``[B, T]`` arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class VisionRuns(NamedTuple):
    """Per token, int32 / bool ``[B, T]``: ``is_vision``; ``run`` = time index of the run's first
    token (-1 for text); ``frame``, ``row``, ``col`` = grid coordinates inside the run (0 for text)."""

    is_vision: jax.Array
    run: jax.Array
    frame: jax.Array
    row: jax.Array
    col: jax.Array


def _carry_forward(flag, values):
    """``values`` at the last position <= t where ``flag`` holds (``[B, T]``; 0 before the first)."""
    t = jnp.arange(flag.shape[1])
    last = jax.lax.cummax(jnp.where(flag, t[None], -1), axis=1)
    return jnp.take_along_axis(values, jnp.maximum(last, 0), axis=1), last


def vision_runs(vision_mask, position_ids, segment_ids=None) -> VisionRuns:
    """Runs and grid coordinates (module docstring) of ``vision_mask`` bool ``[B, T]``.

    position_ids: ``[3, B, T]`` mRoPE ids or ``[B, T]``; segment_ids: optional ``[B, T]`` (a
    run never crosses a segment boundary).
    """
    is_vision = jnp.asarray(vision_mask, bool)
    batch, seq_len = is_vision.shape
    previous = jnp.pad(is_vision[:, :-1], ((0, 0), (1, 0)))
    starts = is_vision & ~previous
    if segment_ids is not None:
        starts = starts | (is_vision & (segment_ids != jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)),
                                                               constant_values=-1)))
    t = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    if position_ids.ndim == 3:
        first_h, _ = _carry_forward(starts, position_ids[1])
        first_w, first = _carry_forward(starts, position_ids[2])
        row, col = position_ids[1] - first_h, position_ids[2] - first_w
    else:
        first_t, first = _carry_forward(starts, t)
        row, col = jnp.zeros_like(t), t - first_t
    zero = jnp.zeros((), jnp.int32)
    row = jnp.where(is_vision, row, zero).astype(jnp.int32)
    col = jnp.where(is_vision, col, zero).astype(jnp.int32)
    frame_starts = jnp.cumsum(is_vision & (row == 0) & (col == 0), axis=1, dtype=jnp.int32)
    first_count, _ = _carry_forward(starts, frame_starts)
    frame = jnp.where(is_vision, frame_starts - first_count, zero)
    run = jnp.where(is_vision, first, -1).astype(jnp.int32)
    return VisionRuns(is_vision, run, frame, row, col)


def _order(runs: VisionRuns, keys) -> jax.Array:
    """Permutation ``[B, T]`` sorting tokens by (run or own index, *keys); text keys are 0."""
    t = jnp.arange(runs.run.shape[1], dtype=jnp.int32)
    primary = jnp.where(runs.is_vision, runs.run, t[None])
    keys = [jnp.where(runs.is_vision, k, 0) for k in keys]
    return jax.vmap(lambda *ks: jnp.lexsort(ks[::-1]).astype(jnp.int32))(primary, *keys)


def scan_order(runs: VisionRuns, column_major: bool) -> jax.Array:
    """Permutation ``[B, T]``: each run in (frame, row, col) order, or (frame, col, row)."""
    inner = (runs.col, runs.row) if column_major else (runs.row, runs.col)
    return _order(runs, (runs.frame, *inner))


def _window_cells(runs: VisionRuns, window: tuple[int, int, int], shifted: bool):
    """(frame, row, col) window index of each vision token; shifted windows start half a window early."""
    shift = [w // 2 if shifted else 0 for w in window]
    return tuple((c + s) // w for c, s, w in zip((runs.frame, runs.row, runs.col), shift, window))


def window_order(runs: VisionRuns, window: tuple[int, int, int], shifted: bool) -> jax.Array:
    """Permutation ``[B, T]`` making every Swin window of every run contiguous (module docstring)."""
    return _order(runs, (*_window_cells(runs, window, shifted), runs.frame, runs.row, runs.col))


def permute(x, order):
    """``x [B, T, ...]`` gathered along time by ``order [B, T]``."""
    index = order.reshape(order.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def inverse(order):
    """The inverse permutation of ``order [B, T]``: ``permute(permute(x, order), inverse(order)) == x``."""
    t = jnp.broadcast_to(jnp.arange(order.shape[1], dtype=jnp.int32), order.shape)
    return jax.vmap(lambda o, v: jnp.zeros_like(v).at[o].set(v))(order, t)


def window_groups(runs: VisionRuns, order, window: tuple[int, int, int], shifted: bool, offset=0):
    """int32 ``[B, T]`` in ``order``'s arrangement: for a vision token, ``offset`` + the place of its
    window's first token; -1 for text. ``offset`` (e.g. the stream index) keeps names unique across calls."""
    cells = [permute(c, order) for c in (runs.run, *_window_cells(runs, window, shifted))]
    is_vision = permute(runs.is_vision, order)
    same = [c == jnp.pad(c[:, :-1], ((0, 0), (1, 0)), constant_values=-1) for c in cells]
    previous_vision = jnp.pad(is_vision[:, :-1], ((0, 0), (1, 0)))
    new_window = is_vision & ~(previous_vision & same[0] & same[1] & same[2] & same[3])
    t = jnp.arange(order.shape[1], dtype=jnp.int32)
    first = jax.lax.cummax(jnp.where(new_window, t[None], -1), axis=1)
    return jnp.where(is_vision, first + offset, -1).astype(jnp.int32)
