"""Tests for ``infinitevl_jax.data.positions`` against transformers' Qwen2.5-VL ``get_rope_index``."""

import numpy as np
import pytest

from infinitevl_jax.data.positions import MultimodalTokens, decode_position_ids, rope_index

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

TOK = MultimodalTokens()
IMG, VID, VS, VE = TOK.image_token_id, TOK.video_token_id, TOK.vision_start_token_id, TOK.vision_end_token_id
PAD = 0


class _HFRopeIndex:
    """The two methods ``get_rope_index`` uses, on a bare config (no weights are built)."""

    get_rope_index = Qwen2_5_VLModel.get_rope_index
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids
    compute_3d_position_ids = Qwen2_5_VLModel.compute_3d_position_ids

    def __init__(self):
        self.config = Qwen2_5_VLConfig(vision_config={"spatial_merge_size": 2, "tokens_per_second": 2})
        self.rope_deltas = None


class _Cache:
    def __init__(self, length):
        self.length = length

    def get_seq_length(self):
        return self.length


def _tensor(x, dtype=torch.long):
    return None if x is None else torch.tensor(np.asarray(x), dtype=dtype)


def hf_rope_index(input_ids, *, image_grid_thw=None, video_grid_thw=None, second_per_grid_ts=None,
                  attention_mask=None):
    """transformers' positions and deltas; second_per_grid_ts as the processor's float32 tensor."""
    ids = torch.tensor(np.asarray(input_ids))
    token_types = (ids == IMG).long() + 2 * (ids == VID).long()  # what the processor returns
    position_ids, deltas = _HFRopeIndex().get_rope_index(
        ids, token_types, image_grid_thw=_tensor(image_grid_thw), video_grid_thw=_tensor(video_grid_thw),
        second_per_grid_ts=_tensor(second_per_grid_ts, torch.float32), attention_mask=_tensor(attention_mask))
    return position_ids.numpy(), deltas.numpy()


def text(n, first=10):
    return list(range(first, first + n))


def image(grid, merge=2):
    """``<|vision_start|>`` + placeholders for a ``(t, h, w)`` grid + ``<|vision_end|>``."""
    return [VS] + [IMG] * (int(np.prod(grid)) // merge**2) + [VE]


def video(grid, merge=2):
    return [VS] + [VID] * (int(np.prod(grid)) // merge**2) + [VE]


def assert_matches_hf(input_ids, **kwargs):
    ours = rope_index(input_ids, **kwargs)
    theirs = hf_rope_index(input_ids, **kwargs)
    assert ours[0].shape == theirs[0].shape and ours[1].shape == theirs[1].shape
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])
    return ours


def test_text_only():
    ids = np.array([text(7)])
    positions, deltas = assert_matches_hf(ids)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(7), (3, 1, 7)))
    assert deltas.tolist() == [[0]]


@pytest.mark.parametrize("grid", [(1, 4, 6), (1, 6, 10), (1, 2, 14)], ids=["4x6", "odd-6x10", "odd-2x14"])
def test_one_image(grid):
    ids = np.array([text(3) + image(grid) + text(4)])
    positions, _ = assert_matches_hf(ids, image_grid_thw=[grid])
    h, w = grid[1] // 2, grid[2] // 2
    block = positions[:, 0, 4:4 + h * w]  # after three text tokens and <|vision_start|>
    np.testing.assert_array_equal(block[0], 4)
    np.testing.assert_array_equal(block[1], 4 + np.repeat(np.arange(h), w))
    np.testing.assert_array_equal(block[2], 4 + np.tile(np.arange(w), h))
    assert positions[0, 0, 4 + h * w] == 4 + max(h, w)  # <|vision_end|> at largest + 1


# Grids whose spatial extent exceeds the temporal one, where transformers 5.23 also resumes at
# largest + 1 (see test_text_after_long_video for the other case).
@pytest.mark.parametrize("seconds,grid", [
    (2.0, (2, 2, 10)),     # fps 1: step 4
    (4.0, (2, 2, 18)),     # fps 0.5: step 8
    (2 / 3, (3, 2, 6)),    # fps 3: step 4/3, temporal ids 0, 1, 2
    (1.0, (3, 4, 10)),     # fps 2: step 2
])
def test_video(seconds, grid):
    ids = np.array([text(2) + video(grid) + text(3)])
    assert_matches_hf(ids, video_grid_thw=[grid], second_per_grid_ts=[seconds])


def test_video_temporal_rounding_is_float32_and_dtype_independent():
    # fps 2.3: tau=69 gives 69 * 2 * (2 / 2.3) = 120 exactly; float32 truncates to 119, float64 to 120.
    # The processor hands transformers float32, so 119 is what the model sees; any input dtype gives it.
    grid, seconds = (70, 2, 2), 2 / 2.3
    ids = np.array([text(2) + [VS] + [VID] * 70])
    positions, _ = assert_matches_hf(ids, video_grid_thw=[grid], second_per_grid_ts=[seconds])
    assert positions[0, 0, 3 + 69] - 3 == 119
    for dtype in (np.float32, np.float64):
        same, _ = rope_index(ids, video_grid_thw=[grid], second_per_grid_ts=np.array([seconds], dtype))
        np.testing.assert_array_equal(same, positions)


def test_video_without_seconds_uses_one_second():
    ids = np.array([text(2) + video((3, 4, 12)) + text(2)])
    positions, _ = assert_matches_hf(ids, video_grid_thw=[(3, 4, 12)])
    np.testing.assert_array_equal(np.unique(positions[0, 0, 3:3 + 36]) - 3, [0, 2, 4])


def test_text_after_long_video():
    # Temporal ids 0, 4, 8, 12 outrun the 2x2 spatial grid: text resumes at largest + 1 (Qwen2.5-VL,
    # transformers <= 5.2, spec §3.3); transformers 5.23 restarts at start + max(H, W) instead.
    grid = (4, 4, 4)
    ids = np.array([text(2) + video(grid) + text(3)])
    positions, deltas = rope_index(ids, video_grid_thw=[grid], second_per_grid_ts=[2.0])
    theirs, _ = hf_rope_index(ids, video_grid_thw=[grid], second_per_grid_ts=[2.0])
    np.testing.assert_array_equal(positions[:, :, :19], theirs[:, :, :19])  # text, vision_start, video
    assert positions[0, 0, 18] == 3 + 12
    np.testing.assert_array_equal(positions[:, 0, 19:], np.broadcast_to(np.arange(16, 20), (3, 4)))
    assert deltas.tolist() == [[20 - ids.shape[1]]]


def test_mixed_interleaved():
    grids_img, grid_vid = [(1, 4, 6), (1, 6, 2)], (2, 4, 12)
    ids = np.array([text(3) + image(grids_img[0]) + text(2, 50) + video(grid_vid) + text(4, 60)
                    + image(grids_img[1]) + text(2, 70)])
    assert_matches_hf(ids, image_grid_thw=grids_img, video_grid_thw=[grid_vid], second_per_grid_ts=[0.5])


def test_left_padded_batch():
    row0 = text(2) + image((1, 4, 4)) + text(3)
    row1 = text(1) + video((2, 2, 8)) + text(2) + image((1, 2, 6)) + text(2)
    width = max(len(row0), len(row1)) + 2
    ids = np.array([[PAD] * (width - len(row)) + row for row in (row0, row1)])
    mask = (np.arange(width) >= width - np.array([[len(row0)], [len(row1)]])).astype(np.int64)
    positions, deltas = assert_matches_hf(
        ids, attention_mask=mask, image_grid_thw=[(1, 4, 4), (1, 2, 6)], video_grid_thw=[(2, 2, 8)],
        second_per_grid_ts=[1.0])
    assert (positions[:, mask == 0] == 0).all()
    np.testing.assert_array_equal(deltas[:, 0], positions.max(axis=(0, 2)) + 1 - mask.sum(-1))


def test_text_only_padded():
    ids = np.array([[PAD, PAD] + text(5), text(7)])
    mask = (ids != PAD).astype(np.int64)
    assert_matches_hf(ids, attention_mask=mask)


def test_no_vision_start():
    # Blocks are runs of placeholder tokens; <|vision_start|> is not needed to find them.
    ids = np.array([text(3) + [IMG] * 6 + text(2)])
    positions, _ = assert_matches_hf(ids, image_grid_thw=[(1, 4, 6)])
    assert positions[1, 0, 3:9].tolist() == [3, 3, 3, 4, 4, 4]


def test_all_padding_row():
    ids = np.array([[PAD] * 4, text(4)])
    positions, deltas = rope_index(ids, attention_mask=ids != PAD)
    assert (positions[:, 0] == 0).all() and deltas.tolist() == [[0], [0]]


def _hf_decode(deltas, *, past, length, attention_mask=None):
    """transformers' cached-decoding positions ``[3, B, length]`` for the given rope_deltas."""
    model = _HFRopeIndex()
    model.rope_deltas = torch.tensor(np.asarray(deltas, np.int64))
    embeds = torch.zeros(deltas.shape[0], length, 1)
    positions = model.compute_3d_position_ids(
        None, None, None, embeds, _tensor(attention_mask), _Cache(past))
    return positions[..., -length:].numpy()


def test_decode_positions_match_hf_cached_decoding():
    ids = np.array([text(3) + image((1, 4, 6)) + text(2), text(1) + video((2, 2, 8)) + text(2)])
    grids = {"image_grid_thw": [(1, 4, 6)], "video_grid_thw": [(2, 2, 8)], "second_per_grid_ts": [1.0]}
    positions, deltas = assert_matches_hf(ids, **grids)
    ours = np.asarray(decode_position_ids(ids.shape[1], deltas, length=3))
    np.testing.assert_array_equal(ours, _hf_decode(deltas, past=ids.shape[1], length=3))  # cache_position + delta
    np.testing.assert_array_equal(ours[0, :, 0], positions.max(axis=(0, 2)) + 1)


def test_decode_positions_left_padded():
    rows = [text(2) + image((1, 4, 4)) + text(3), text(6)]
    width = 12
    ids = np.array([[PAD] * (width - len(row)) + row for row in rows])
    mask = (np.arange(width) >= width - np.array([[len(row)] for row in rows])).astype(np.int64)
    positions, deltas = assert_matches_hf(ids, attention_mask=mask, image_grid_thw=[(1, 4, 4)])
    ours = np.asarray(decode_position_ids(mask.sum(-1), deltas, length=2))
    full_mask = np.concatenate([mask, np.ones((2, 2), np.int64)], axis=1)
    np.testing.assert_array_equal(ours, _hf_decode(deltas, past=width, length=2, attention_mask=full_mask))
    np.testing.assert_array_equal(ours[:, :, 0], positions[:, :, -1] + 1)  # generate(): last prompt id + 1


@pytest.mark.parametrize("kwargs,ids,match", [
    ({"image_grid_thw": [(1, 4, 4)]}, text(2) + image((1, 4, 4)) * 2, "2 image blocks .* 1 rows"),
    ({"image_grid_thw": [(1, 4, 4)] * 2}, text(2) + image((1, 4, 4)), "1 image blocks .* 2 rows"),
    ({"video_grid_thw": [(2, 4, 4)]}, text(2), "0 video blocks .* 1 rows"),
    ({"image_grid_thw": [(1, 4, 6)]}, text(2) + image((1, 4, 4)), "image 0 .* 4 placeholder tokens .* needs 6"),
    ({"image_grid_thw": [(1, 5, 4)]}, text(2) + [IMG] * 5, r"image_grid_thw\[0\] = \(1, 5, 4\).*multiples"),
    ({"video_grid_thw": [(2, 4, 4)], "second_per_grid_ts": [1.0, 2.0]}, video((2, 4, 4)), "2 entries for 1 videos"),
])
def test_errors(kwargs, ids, match):
    with pytest.raises(ValueError, match=match):
        rope_index(np.array([ids]), **kwargs)
