"""Image / video processors against transformers' Qwen2-VL processors on the CPU.

Images: compared with ``Qwen2VLImageProcessorPil`` (the PIL backend; the default class needs
torchvision). Videos: transformers' only video processor needs torchvision, so the video path is
compared with a float64 NumPy reference of the documented rules, using transformers'
``smart_resize`` and ``VideoMetadata.sampled_fps`` and torch's ``arange`` as transformers samples.
"""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageSequence

from infinitevl_jax.data.image_processor import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    ImageProcessor,
    expand_placeholders,
    patchify,
    smart_resize,
)
from infinitevl_jax.data.video import VideoProcessor, load_video, sample_frame_indices

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_image
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import VideoMetadata

SMALL = {"min_pixels": 56 * 56, "max_pixels": 64 * 28 * 28}  # keeps test arrays small
RNG = np.random.default_rng(0)


def random_image(height, width, channels=3):
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("min_pixels,max_pixels", [
    (56 * 56, 12_845_056), (56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (56 * 56, 64 * 28 * 28)])
def test_smart_resize_matches_transformers(min_pixels, max_pixels):
    sides = [28, 29, 41, 55, 100, 333, 448, 517, 700, 1000, 1344, 4000]
    for h in sides:
        for w in sides:
            want = hf_image.smart_resize(h, w, 28, min_pixels, max_pixels)
            assert smart_resize(h, w, 28, min_pixels, max_pixels) == want, (h, w)
    assert smart_resize(448, 448, 28, 3136, 12_845_056) == (448, 448)
    assert smart_resize(700, 1000, 28, 3136, 12_845_056) == (700, 1008)


def test_smart_resize_rejects_tiny_and_thin_images():
    with pytest.raises(ValueError, match="smaller than 28 px"):
        smart_resize(27, 100)
    with pytest.raises(ValueError, match="aspect ratio above 200"):
        smart_resize(28, 5601)


def test_images_match_transformers(tmp_path):
    rgba_path, rotated_path = tmp_path / "rgba.png", tmp_path / "rotated.jpg"
    Image.fromarray(random_image(80, 50, 4), "RGBA").save(rgba_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.fromarray(random_image(60, 100)).save(rotated_path, exif=exif)
    palette = Image.fromarray(random_image(70, 70, 1)[..., 0], "L").convert("P")
    palette.info["transparency"] = 3
    images = [
        Image.fromarray(random_image(700, 1000)),  # scaled down (floor)
        random_image(30, 45),  # tiny, scaled up (ceil)
        Image.fromarray(random_image(333, 517, 4), "RGBA"),  # composited onto white
        Image.fromarray(random_image(90, 61, 1)[..., 0], "L"),
        palette,
        random_image(47, 95, 4),
        random_image(64, 29, 1),
        str(rgba_path),
        rotated_path,
    ]
    ours = ImageProcessor(**SMALL)(images)
    hf_images = images[:-1] + [str(rotated_path)]  # transformers takes str paths only
    hf = hf_image.Qwen2VLImageProcessorPil(**SMALL)(hf_images, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], hf["image_grid_thw"])
    assert ours["image_grid_thw"].dtype == np.int64 and ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == hf["pixel_values"].shape
    assert np.abs(ours["pixel_values"] - hf["pixel_values"]).max() <= 1e-6
    assert tuple(ours["image_grid_thw"][-1]) == (1, 8, 4)  # EXIF-rotated: 100x60 (HxW)


def test_default_settings_match_transformers_on_448_image():
    image = random_image(448, 448)
    ours = ImageProcessor()(image)
    hf = hf_image.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12_845_056)([image], return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], [[1, 32, 32]])
    assert np.abs(ours["pixel_values"] - hf["pixel_values"]).max() <= 1e-6
    assert expand_placeholders(IMAGE_TOKEN, ours["image_grid_thw"]) == IMAGE_TOKEN * 256


def test_gray_2d_array_is_gray_channel_array():
    gray = random_image(50, 70, 1)
    a, b = ImageProcessor(**SMALL)(gray[..., 0]), ImageProcessor(**SMALL)(gray)
    np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])


def test_patch_rows_layout():
    """Row (t, block_row, block_col, my, mx) holds pixels[2t:2t+2, :, py, px] laid out (C, T, py, px)."""
    pixels = np.arange(3 * 3 * 56 * 84, dtype=np.float32).reshape(3, 3, 56, 84)
    rows, grid = patchify(pixels, patch_size=14, temporal_patch_size=2, merge_size=2)
    assert grid == (2, 4, 6) and rows.shape == (48, 1176)
    padded = np.concatenate([pixels, pixels[-1:]])
    for t, by, bx, my, mx in [(0, 0, 0, 0, 0), (0, 1, 2, 1, 0), (1, 1, 1, 0, 1), (1, 0, 2, 1, 1)]:
        row = ((t * 2 + by) * 3 + bx) * 4 + my * 2 + mx
        y, x = (2 * by + my) * 14, (2 * bx + mx) * 14
        want = padded[2 * t:2 * t + 2, :, y:y + 14, x:x + 14].transpose(1, 0, 2, 3).ravel()
        np.testing.assert_array_equal(rows[row], want)


def test_rows_of_levels_equal_encode_bit_for_bit():
    """The device-side path (uint8 patches, then a per-channel lookup) gives ``encode``'s values
    exactly, in NumPy and jitted jax.numpy; an odd frame count pads the temporal patch the same way."""
    processor = ImageProcessor(**SMALL)
    for frames in ([Image.fromarray(random_image(70, 93))], [Image.fromarray(random_image(60, 90)) for _ in range(3)]):
        rows, grid = processor.encode(frames)
        levels = processor.resized(frames)
        assert levels.dtype == np.uint8
        for xp in (np, jnp):
            got, got_grid = (processor.rows_of_levels(levels) if xp is np else
                             (jax.jit(lambda x: processor.rows_of_levels(x, xp=jnp)[0])(levels), grid))
            assert got_grid == grid and np.asarray(got).dtype == np.float32
            np.testing.assert_array_equal(np.asarray(got), rows)


# ---------------------------------------------------------------------------------- placeholders
def test_expand_placeholders_matches_transformers():
    texts = [f"<|vision_start|>{IMAGE_TOKEN}<|vision_end|>a{VIDEO_TOKEN}b", f"{IMAGE_TOKEN}c{IMAGE_TOKEN}"]
    image_grids, video_grids = np.array([[1, 4, 6], [1, 2, 2], [1, 6, 4]]), np.array([[2, 4, 4]])
    fake = SimpleNamespace(image_token=IMAGE_TOKEN, video_token=VIDEO_TOKEN, audio_token=None,
                           image_processor=SimpleNamespace(merge_size=2), video_processor=SimpleNamespace(merge_size=2),
                           all_special_multimodal_tokens=[IMAGE_TOKEN, VIDEO_TOKEN])
    image_reps = [Qwen2_5_VLProcessor.replace_image_token(fake, {"image_grid_thw": image_grids}, i) for i in range(3)]
    video_reps = [Qwen2_5_VLProcessor.replace_video_token(fake, {"video_grid_thw": video_grids}, 0)]
    want, _ = ProcessorMixin.get_text_with_replacements(fake, list(texts), image_reps, video_reps)
    assert expand_placeholders(texts, image_grids, video_grids) == want
    assert expand_placeholders(texts[1], image_grids[1:]) == want[1]
    with pytest.raises(ValueError, match="3 <\\|image_pad\\|> placeholders in the text but 2 grids"):
        expand_placeholders(texts, image_grids[:2], video_grids)
    with pytest.raises(ValueError, match="video_pad"):
        expand_placeholders(texts, image_grids)


# ------------------------------------------------------------------------------------------ videos
def hf_sample_indices(total, source_fps, fps, tps=2, min_frames=4, max_frames=768):
    """Qwen2VLVideoProcessor.sample_frames' rules; indices from torch's float32 arange as it does."""
    max_n = math.floor(min(max_frames, total) / tps) * tps
    n = math.floor(min(max(total / source_fps * fps, min_frames), max_n, total) / tps) * tps
    return torch.arange(0, total, total / n).int().numpy(), n


def test_sample_frame_indices_matches_transformers_rules():
    checked = 0
    for total in range(2, 300):
        for source_fps in (1.0, 2.5, 24.0, 29.97, 30.0, 60.0):
            for fps in (0.5, 2.0):
                want, n = hf_sample_indices(total, source_fps, fps)
                got = sample_frame_indices(total, source_fps, fps)
                assert len(got) == n and n % 2 == 0
                if len(want) == n:  # torch.arange sometimes returns n + 1 indices (transformers bug)
                    np.testing.assert_array_equal(got, want)
                    checked += 1
    assert checked > 3000
    np.testing.assert_array_equal(sample_frame_indices(1, 30.0, 2.0), [0])  # too short to sample: kept


def test_videos_match_reference(tmp_path):
    processor = VideoProcessor(min_pixels=56 * 56, max_pixels=8 * 28 * 28)
    array = RNG.integers(0, 256, (9, 60, 90, 3), dtype=np.uint8)
    odd = [Image.fromarray(random_image(70, 50)) for _ in range(3)]
    gif_frames = [Image.fromarray(random_image(60, 90)) for _ in range(12)]
    gif_path = tmp_path / "clip.gif"
    gif_frames[0].save(gif_path, save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    with Image.open(gif_path) as gif:  # palette-quantised by the GIF encoder
        decoded_gif = [frame.convert("RGB") for frame in ImageSequence.Iterator(gif)]
    frame_dir = tmp_path / "frames"
    frame_dir.mkdir()
    for i, frame in enumerate(gif_frames):
        frame.save(frame_dir / f"f{i + 1}.png")

    # (source, frames, source fps, indices transformers keeps)
    cases = [
        (load_video(array, fps=6.0), [Image.fromarray(f) for f in array], 6.0, hf_sample_indices(9, 6.0, 2.0)[0]),
        (odd, odd, None, np.arange(3)),
        (gif_path, decoded_gif, 10.0, hf_sample_indices(12, 10.0, 2.0)[0]),
        (frame_dir, gif_frames, None, np.arange(12)),  # f1.png ... f12.png in natural order
    ]
    out = processor([source for source, *_ in cases])
    offset = 0
    for i, (_, frames, source_fps, indices) in enumerate(cases):
        rows, grid = reference_rows(frames, indices, processor)
        np.testing.assert_array_equal(out["video_grid_thw"][i], grid)
        got = out["pixel_values_videos"][offset:offset + len(rows)]
        assert np.abs(got - rows).max() < 2e-6
        offset += len(rows)
        sampled_fps = processor.fps if source_fps is None else VideoMetadata(
            total_num_frames=len(frames), fps=source_fps, frames_indices=list(indices)).sampled_fps
        assert out["second_per_grid_ts"][i] == np.float32(2 / sampled_fps)
    assert offset == len(out["pixel_values_videos"])
    assert out["pixel_values_videos"].dtype == np.float32 and out["video_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(out["video_grid_thw"][:, 0], [2, 2, 2, 6])
    np.testing.assert_allclose(out["second_per_grid_ts"], [0.75, 1.0, 0.6, 1.0], rtol=1e-6)


def reference_rows(frames, indices, processor):
    """float64 patch rows [t*h*w, 1176] and grid of frames[indices] by the documented rules."""
    frames = [frames[i] for i in indices]
    width, height = frames[0].size
    new_h, new_w = hf_image.smart_resize(height, width, 28, processor.min_pixels, processor.max_pixels)
    pixels = np.stack([np.asarray(f.resize((new_w, new_h), Image.Resampling.BICUBIC)) for f in frames])
    pixels = ((pixels / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(0, 3, 1, 2)
    if len(pixels) % 2:
        pixels = np.concatenate([pixels, pixels[-1:]])
    rows = []
    for t in range(len(pixels) // 2):
        for by in range(new_h // 28):
            for bx in range(new_w // 28):
                for my in range(2):
                    for mx in range(2):
                        y, x = (2 * by + my) * 14, (2 * bx + mx) * 14
                        rows.append(pixels[2 * t:2 * t + 2, :, y:y + 14, x:x + 14].transpose(1, 0, 2, 3).ravel())
    return np.stack(rows), (len(pixels) // 2, new_h // 14, new_w // 14)


# ------------------------------------------------------------------------------------------ errors
def test_image_errors_are_clear(tmp_path):
    process = ImageProcessor(**SMALL)
    with pytest.raises(ValueError, match="20x50 px .* smaller than 28 px"):
        process(random_image(20, 50))
    with pytest.raises(ValueError, match="aspect ratio"):
        process(random_image(28, 5700))
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        process([str(missing)])
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image file .*broken.png"):
        process(broken)
    with pytest.raises(ValueError, match="uint8"):
        process(np.zeros((40, 40, 3), np.float32))
    with pytest.raises(ValueError, match="shape \\(40, 40, 2\\)"):
        process(np.zeros((40, 40, 2), np.uint8))
    with pytest.raises(ValueError, match="shape \\(1, 40, 40, 3\\)"):
        process(np.zeros((1, 40, 40, 3), np.uint8))
    with pytest.raises(TypeError, match="PIL image, a numpy array or a file path"):
        process([3])
    with pytest.raises(ValueError, match="no images"):
        process([])


def test_video_errors_are_clear(tmp_path):
    process = VideoProcessor(min_pixels=56 * 56, max_pixels=8 * 28 * 28)
    with pytest.raises(ValueError, match="no videos"):
        process([])
    with pytest.raises(ValueError, match="no frames"):
        process([[]])
    with pytest.raises(ValueError, match="no frames"):
        process(np.zeros((0, 40, 40, 3), np.uint8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files in video directory .*empty"):
        process(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="clip.mp4"):
        process(str(tmp_path / "clip.mp4"))
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a-truncated")
    with pytest.raises(ValueError, match="cannot read video file .*broken.gif"):
        process(broken)
    with pytest.raises(ValueError, match="one size"):
        process([[random_image(40, 40), random_image(40, 60)]])
    with pytest.raises(TypeError, match="wrap one video's frames in a list"):
        process([Image.fromarray(random_image(40, 40))])
    with pytest.raises(ValueError, match="fps must be positive"):
        load_video([random_image(40, 40)], fps=0)
    with pytest.raises(ValueError, match="fps must be positive"):
        VideoProcessor(fps=0.0)
