"""Qwen2.5-VL image preprocessing: RGB, smart resize, CLIP normalisation, patch rows, placeholders.

Matches transformers' ``Qwen2VLImageProcessorPil`` (5.23) value for value: Pillow bicubic resize of
uint8 RGB, ``x * (1/255)`` in float64 cast to float32, ``(x - mean) / std`` in float32. Each patch
row holds 3 * temporal_patch_size * patch_size**2 = 1176 values ordered (channel, frame, py, px);
rows run per temporal slice, per 2x2 merge block in raster order, the block's 4 patches in raster
order, so every 4 consecutive rows are one merged (LLM) token.

One deviation from transformers: images smaller than ``factor`` (28 px) on a side are rejected, as
the original Qwen2-VL ``smart_resize`` did, instead of being silently scaled up.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 12_845_056  # Qwen2.5-VL-3B preprocessor_config; transformers' default is 28*28*1280.
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with min_pixels <= area <= max_pixels.

    Each side is rounded to the nearest multiple (Python's half-to-even ``round``). If the area is then
    above ``max_pixels``, both sides are divided by sqrt(H*W / max_pixels) and floored to multiples
    (at least ``factor``); if below ``min_pixels``, multiplied by sqrt(min_pixels / (H*W)) and ceiled.
    """
    if min(height, width) < factor:
        raise ValueError(f"image of {height}x{width} px (HxW) is smaller than {factor} px on a side")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height}x{width} px (HxW) has an aspect ratio above {MAX_ASPECT_RATIO}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def load_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, a uint8 array [H, W] or [H, W, 1|3|4], or a file path.

    Conversions follow transformers: files are EXIF-rotated and converted with ``convert("RGB")``
    (alpha dropped); in-memory images with transparency are composited onto white; gray arrays
    are repeated to 3 channels.
    """
    if isinstance(image, (str, os.PathLike)):
        return _open_image(os.fspath(image))
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image))
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    raise TypeError(f"an image must be a PIL image, a numpy array or a file path; got {type(image).__name__}")


def _open_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path!r}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image file {path!r}: {e}") from None


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, 1|3|4] -> uint8 [H, W, 3]; alpha is blended onto white, rounded."""
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255); got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be [H, W] or [H, W, C] with C in (1, 3, 4); got shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def normalize(frames: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] = (x / 255 - mean) / std (rescale in float64)."""
    scaled = (frames.astype(np.float64) * (1 / 255)).astype(np.float32)
    out = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return out.transpose(0, 3, 1, 2)


def normalize_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 ``[3, 256]``: ``normalize``'s value of each uint8 level per channel, so a lookup
    ``table[c, x]`` reproduces it bit for bit (e.g. on the device, from uploaded uint8 pixels)."""
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, None, :, None], (1, 1, 256, 3))
    return np.ascontiguousarray(normalize(levels, mean, std)[0, :, 0, :])


def patch_grid(frames_hw: tuple[int, int, int], patch_size: int, temporal_patch_size: int) -> tuple[int, int, int]:
    """Patch grid ``(t, h, w)`` of T frames of H x W pixels: ``(ceil(T / tps), H / p, W / p)``."""
    frames, height, width = frames_hw
    return -(-frames // temporal_patch_size), height // patch_size, width // patch_size


def patchify(pixels, patch_size: int, temporal_patch_size: int, merge_size: int,
             xp=np) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, C, H, W] (any dtype) -> (rows [t*h*w, C*tps*p*p], grid (t, h, w)).

    T is padded up to a multiple of temporal_patch_size by repeating the last frame, so t = ceil(T/tps),
    h = H/p, w = W/p. Row order: t, merge-block row, merge-block column, then the merge_size**2
    patches of the block in raster order; row layout (channel, frame, py, px). ``xp``: the array
    module (NumPy, or ``jax.numpy`` inside a jitted function).
    """
    if pad := -pixels.shape[0] % temporal_patch_size:
        pixels = xp.concatenate([pixels, xp.repeat(pixels[-1:], pad, axis=0)])
    frames, channels, height, width = pixels.shape
    t, h, w = patch_grid((frames, height, width), patch_size, temporal_patch_size)
    x = pixels.reshape(t, temporal_patch_size, channels, h // merge_size, merge_size, patch_size,
                       w // merge_size, merge_size, patch_size)
    # -> (t, block_row, block_col, merge_y, merge_x, channel, frame, py, px)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, channels * temporal_patch_size * patch_size**2), (t, h, w)


@dataclasses.dataclass(frozen=True)
class FrameProcessor:
    """Settings and the frames -> patch rows step shared by the image and video processors."""

    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    resample: Image.Resampling = Image.Resampling.BICUBIC

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels; got {self.min_pixels}, {self.max_pixels}")

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def resized(self, frames: Sequence[Image.Image]) -> np.ndarray:
        """RGB frames of one size -> uint8 ``[T, H, W, 3]`` at the ``smart_resize`` size."""
        width, height = frames[0].size
        if any(frame.size != (width, height) for frame in frames):
            sizes = sorted({frame.size for frame in frames})
            raise ValueError(f"all frames of a video must have one size; got (W, H) sizes {sizes}")
        new_h, new_w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return np.stack([np.asarray(frame.resize((new_w, new_h), self.resample)) for frame in frames])

    def encode(self, frames: Sequence[Image.Image]) -> tuple[np.ndarray, tuple[int, int, int]]:
        """RGB frames of one size -> (float32 rows [t*h*w, 3*tps*p*p], grid (t, h, w))."""
        pixels = normalize(self.resized(frames), self.image_mean, self.image_std)
        return patchify(pixels, self.patch_size, self.temporal_patch_size, self.merge_size)

    def rows_of_levels(self, frames, xp=np):
        """``encode`` after the resize: uint8 ``[T, H, W, 3]`` (from ``resized``) -> (float32 rows,
        grid). The uint8 levels are patchified first and each then looked up in
        ``normalize_table``, so the values are ``encode``'s bit for bit; with ``xp=jax.numpy``
        inside a jitted function this runs on the device from a uint8 upload (4x smaller)."""
        levels, grid = patchify(frames.transpose(0, 3, 1, 2), self.patch_size, self.temporal_patch_size,
                                self.merge_size, xp=xp)
        channel = np.repeat(np.arange(3, dtype=np.int32), levels.shape[1] // 3)  # row layout: channel first
        table = normalize_table(self.image_mean, self.image_std).ravel()
        return xp.take(xp.asarray(table), channel * 256 + levels.astype(np.int32)), grid


@dataclasses.dataclass(frozen=True)
class ImageProcessor(FrameProcessor):
    """Qwen2.5-VL image processor; each image is one frame, duplicated to fill a temporal patch."""

    def __call__(self, images) -> dict[str, np.ndarray]:
        """One image or a list (PIL, uint8 arrays, paths) -> ``pixel_values`` float32 [sum t*h*w, 1176]
        and ``image_grid_thw`` int64 [N, 3] (t = 1)."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("no images given")
        encoded = [self.encode([load_image(image)]) for image in images]
        return {
            "pixel_values": np.concatenate([rows for rows, _ in encoded]),
            "image_grid_thw": np.array([grid for _, grid in encoded], np.int64),
        }


def expand_placeholders(text: str | Sequence[str], image_grid_thw=None, video_grid_thw=None, *,
                        merge_size: int = 2) -> str | list[str]:
    """Repeat each ``<|image_pad|>`` / ``<|video_pad|>`` t*h*w / merge_size**2 times.

    Grids [N, 3] are consumed in order of appearance across the whole batch of texts, as in
    transformers' ``Qwen2_5_VLProcessor``; the placeholder count of each kind must equal its N.
    """
    texts = [text] if isinstance(text, str) else list(text)
    counts = {}
    for token, grids in ((IMAGE_TOKEN, image_grid_thw), (VIDEO_TOKEN, video_grid_thw)):
        grids = np.zeros((0, 3), np.int64) if grids is None else np.asarray(grids).reshape(-1, 3)
        found = sum(t.count(token) for t in texts)
        if found != len(grids):
            raise ValueError(f"{found} {token} placeholders in the text but {len(grids)} grids")
        counts[token] = iter(int(n) for n in grids.prod(-1) // merge_size**2)
    pattern = re.compile(f"{re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)}")
    expanded = [pattern.sub(lambda m: m.group() * next(counts[m.group()]), t) for t in texts]
    return expanded[0] if isinstance(text, str) else expanded
