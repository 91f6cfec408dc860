"""Multimodal RoPE position ids, as Qwen2.5-VL's ``get_rope_index`` builds them (host-side NumPy).

Every token gets three ids (temporal, height, width), ``position_ids[3, B, T]``. Per sample, over the
tokens that ``attention_mask`` keeps, with ``start`` = the next free position (0 at first):

- a text token takes ``start`` on all three axes, and ``start`` grows by one;
- a vision block is a maximal run of ``image_token_id`` (or ``video_token_id``) placeholders; it
  consumes the next row of ``image_grid_thw`` (``video_grid_thw``) in batch order, and with the
  merged grid ``(t, H, W) = (t, h / merge, w / merge)`` the token at ``(tau, y, x)`` (tau-major,
  then y, then x) gets ``(start + time(tau), start + y, start + x)``. ``time(tau) = tau`` for
  images (whose t is 1) and ``trunc(tau * tokens_per_second * second_per_grid_t)`` for videos,
  evaluated in float32 as transformers does on the processor's float32 ``second_per_grid_ts``;
- after a block, ``start`` = (largest id in the block) + 1.

Padding gets 0 on every axis, and ``rope_delta = (largest id) + 1 - (number of real tokens)``: a
token appended after ``n`` real tokens sits at ``n + rope_delta`` on all three axes.

This equals transformers 5.23 ``Qwen2_5_VLModel.get_rope_index`` (blocks found from the
placeholder runs, so ``<|vision_start|>`` is not needed; pads 0; deltas counted over real tokens;
float temporal step truncated after the multiply), with one exception: transformers 5.23 resumes
the text after a video at ``start + max(H, W)`` instead of largest + 1, which differs once a video's
temporal ids outrun its spatial ones (most real videos). Largest + 1 is Qwen2.5-VL's own rule, used
by transformers 4.x up to 5.2 (spec §3.3, pitfall 10).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from infinitevl_jax.models.config import MultimodalTokens


_TEXT, _IMAGE, _VIDEO = 0, 1, 2
_NAMES = {_IMAGE: "image", _VIDEO: "video"}


def rope_index(
    input_ids,
    *,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    attention_mask=None,
    spatial_merge_size: int = 2,
    tokens_per_second: int = 2,
    image_token_id: int = MultimodalTokens.image_token_id,
    video_token_id: int = MultimodalTokens.video_token_id,
):
    """mRoPE position ids of a batch, following the rules in the module docstring.

    Args:
      input_ids: int ``[B, T]``.
      image_grid_thw, video_grid_thw: int ``[n, 3]`` patch grids ``(t, h, w)`` before the spatial
        merge, one row per block, in order of appearance across the batch (row 0 first).
      second_per_grid_ts: float ``[n_video]``, seconds per temporal grid (temporal_patch_size / fps);
        1.0 for every video when omitted.
      attention_mask: ``[B, T]``, nonzero for real tokens (left padding or any other layout).

    Returns:
      ``(position_ids int32 [3, B, T], rope_deltas int32 [B, 1])``.

    Raises:
      ValueError: the number of image (video) blocks differs from the rows of its grid, a block's
        length differs from ``t * h * w / merge**2``, a grid's h or w is not a multiple of the
        merge size, or ``second_per_grid_ts`` does not have one entry per video.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
    mask = _mask(attention_mask, input_ids.shape)
    kinds = np.where(input_ids == image_token_id, _IMAGE, np.where(input_ids == video_token_id, _VIDEO, _TEXT))
    runs = [_runs(kinds[b][mask[b]]) for b in range(input_ids.shape[0])]
    blocks = {
        _IMAGE: _blocks(_IMAGE, image_grid_thw, np.ones(_num_rows(image_grid_thw)), 1, spatial_merge_size),
        _VIDEO: _blocks(_VIDEO, video_grid_thw, _seconds(second_per_grid_ts, _num_rows(video_grid_thw)),
                        tokens_per_second, spatial_merge_size),
    }
    _check_block_counts(runs, blocks)
    queues = {kind: iter(items) for kind, items in blocks.items()}

    position_ids = np.zeros((3, *input_ids.shape), np.int32)
    rope_deltas = np.zeros((input_ids.shape[0], 1), np.int32)
    for b, sample_runs in enumerate(runs):
        positions = _sample_positions(sample_runs, queues, b)
        position_ids[:, b, mask[b]] = positions
        rope_deltas[b, 0] = (positions.max() + 1 if positions.size else 0) - positions.shape[1]
    return position_ids, rope_deltas


def decode_position_ids(index, rope_deltas, length: int = 1):
    """Position ids ``[3, B, length]`` of ``length`` tokens appended after ``index`` real tokens.

    Generated tokens are text, so all three axes hold ``index + i + rope_delta`` (i < length). This
    is transformers' cached decoding: ``(cumsum(attention_mask) - 1) + rope_deltas``, which without
    padding is ``cache_position + rope_deltas``.

    Args:
      index: int or int ``[B]``: real (unpadded) tokens already in the sequence, e.g. the prompt's
        ``attention_mask.sum(-1)``; with left padding this is not the padded cache index.
      rope_deltas: int ``[B, 1]`` from ``rope_index``.
      length: number of new tokens (static under jit).
    """
    deltas = jnp.reshape(jnp.asarray(rope_deltas, jnp.int32), (-1, 1))
    start = jnp.reshape(jnp.asarray(index, jnp.int32), (-1, 1))
    positions = start + deltas + jnp.arange(length, dtype=jnp.int32)
    return jnp.broadcast_to(positions, (3, *positions.shape))


def _mask(attention_mask, shape):
    """Boolean ``[B, T]`` mask of real tokens (all true when ``attention_mask`` is None)."""
    if attention_mask is None:
        return np.ones(shape, bool)
    mask = np.asarray(attention_mask).astype(bool)
    if mask.shape != shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {shape}")
    return mask


def _runs(kinds):
    """Maximal runs of equal values in a 1-D array, as ``[(kind, start, stop), ...]``."""
    if kinds.size == 0:
        return []
    edges = np.flatnonzero(np.diff(kinds)) + 1
    starts, stops = np.concatenate([[0], edges]), np.concatenate([edges, [kinds.size]])
    return [(int(kinds[lo]), int(lo), int(hi)) for lo, hi in zip(starts, stops)]


def _num_rows(grid_thw):
    return 0 if grid_thw is None else len(grid_thw)


def _seconds(second_per_grid_ts, num_videos):
    """Seconds per temporal grid ``[num_videos]`` (1.0 each when omitted)."""
    if second_per_grid_ts is None:
        return np.ones(num_videos)
    seconds = np.asarray(second_per_grid_ts, np.float64).reshape(-1)
    if seconds.size != num_videos:
        raise ValueError(f"second_per_grid_ts has {seconds.size} entries for {num_videos} videos")
    return seconds


def _blocks(kind, grid_thw, seconds, tokens_per_second, merge):
    """One ``(name, merged (t, H, W), float32 temporal step)`` per grid row, validated."""
    name = _NAMES[kind]
    grid = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64)
    if grid.ndim != 2 or grid.shape[1] != 3:
        raise ValueError(f"{name}_grid_thw must be [n, 3], got shape {grid.shape}")
    blocks = []
    for i, (t, h, w) in enumerate(grid.tolist()):
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise ValueError(f"{name}_grid_thw[{i}] = {(t, h, w)}: t, h, w must be positive and h, w "
                             f"multiples of spatial_merge_size={merge}")
        step = np.float32(tokens_per_second) * np.float32(seconds[i])
        blocks.append((f"{name} {i}", (t, h // merge, w // merge), step))
    return blocks


def _check_block_counts(runs, blocks):
    """Each kind has exactly as many placeholder runs in the batch as grid rows."""
    for kind, items in blocks.items():
        found = sum(run_kind == kind for sample_runs in runs for run_kind, _, _ in sample_runs)
        if found != len(items):
            name = _NAMES[kind]
            raise ValueError(f"input_ids hold {found} {name} blocks (runs of {name} placeholder tokens) "
                             f"but {name}_grid_thw has {len(items)} rows")


def _sample_positions(runs, queues, b):
    """Position ids ``[3, n]`` of one sample's ``n`` real tokens, given its runs."""
    pieces, start = [], 0
    for kind, lo, hi in runs:
        if kind == _TEXT:
            piece = np.broadcast_to(np.arange(start, start + hi - lo), (3, hi - lo))
        else:
            name, grid, step = next(queues[kind])
            if hi - lo != np.prod(grid):
                raise ValueError(f"{name} (sample {b}, real token {lo}) has {hi - lo} placeholder tokens but "
                                 f"its merged grid {grid} needs {np.prod(grid)}")
            piece = start + _vision_offsets(grid, step)
        pieces.append(piece)
        start = int(piece.max()) + 1
    return np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)


def _vision_offsets(grid, step):
    """Offsets ``[3, t*H*W]`` of a merged ``(t, H, W)`` grid: ``(trunc(tau*step), y, x)``, tau-major."""
    t, height, width = grid
    times = (np.arange(t, dtype=np.float32) * step).astype(np.int64)
    tau, y, x = np.meshgrid(times, np.arange(height), np.arange(width), indexing="ij")
    return np.stack([tau, y, x]).reshape(3, -1)
