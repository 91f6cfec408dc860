"""Qwen2.5-VL video preprocessing: decode frames with Pillow, sample at ``fps``, patchify.

Sources: a sequence of frames (PIL images, uint8 arrays, paths), a uint8 array [T, H, W, C], a
directory of frame images (natural name order), or a file Pillow reads as multi-frame (GIF,
animated WebP/PNG, TIFF). Other containers (mp4, ...) need a decoder such as PyAV; decode them to
frames first and pass ``Video(frames, fps)``.

Sampling follows transformers' ``Qwen2VLVideoProcessor.sample_frames`` (5.23): n = T / src_fps * fps,
clamped to [min_frames, max_frames] and to T, floored to a multiple of temporal_patch_size, indices
floor(i * T / n). ``second_per_grid_ts`` = temporal_patch_size / sampled fps with sampled fps =
n / T * src_fps (transformers' ``VideoMetadata.sampled_fps``). Frames with no known source rate are
taken as already sampled at ``fps`` (transformers 4.x's default of 2.0; 5.23 falls back to 24).
Differences from transformers' torch implementation: indices are exact integers (its float32
``torch.arange`` is off by one frame past ~16k frames, and for some (T, n) returns n + 1 indices);
videos shorter than temporal_patch_size keep all their frames (transformers divides by zero);
frames are resized with Pillow like images (transformers resizes videos with torchvision).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from infinitevl_jax.data.image_processor import FrameProcessor, load_image

VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28


@dataclasses.dataclass(frozen=True)
class Video:
    """Decoded RGB frames and the rate they were captured at (None: already sampled)."""

    frames: tuple[Image.Image, ...]
    fps: float | None = None

    def __post_init__(self):
        if not self.frames:
            raise ValueError("the video has no frames")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"a video's fps must be positive; got {self.fps}")


def load_video(source, fps: float | None = None) -> Video:
    """A ``Video`` from frames, a [T, H, W, C] array, a frame directory or a multi-frame image file.

    ``fps`` is the source frame rate; for a file it defaults to the one its frame durations give.
    """
    if isinstance(source, Video):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            return Video(tuple(load_image(p) for p in _frame_files(path)), fps)
        frames, file_fps = _read_frames(path)
        return Video(frames, fps if fps is not None else file_fps)
    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise ValueError(f"video arrays must be [T, H, W, C]; got shape {source.shape}")
        return Video(tuple(load_image(frame) for frame in source), fps)
    if isinstance(source, (list, tuple)):
        return Video(tuple(load_image(frame) for frame in source), fps)
    raise TypeError(f"a video must be a list of frames, a [T, H, W, C] array, a Video or a path; got "
                    f"{type(source).__name__} (wrap one video's frames in a list)")


def _frame_files(directory: str) -> list[str]:
    """Image files of a directory in natural order (frame2 before frame10)."""
    extensions = Image.registered_extensions()
    names = [n for n in os.listdir(directory) if os.path.splitext(n)[1].lower() in extensions]
    if not names:
        raise ValueError(f"no image files in video directory {directory!r}")
    return [os.path.join(directory, n) for n in sorted(names, key=_natural_key)]


def _natural_key(name: str) -> list[int | str]:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _read_frames(path: str) -> tuple[tuple[Image.Image, ...], float | None]:
    """All frames of a file Pillow can open, and the rate from their durations (ms), if any."""
    try:
        with Image.open(path) as image:
            frames, durations = [], []
            for frame in ImageSequence.Iterator(image):
                frames.append(load_image(frame))
                durations.append(frame.info.get("duration", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"video file not found: {path!r}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read video file {path!r} with Pillow (GIF, WebP, PNG, TIFF frames); "
                         f"decode other formats to frames first: {e}") from None
    total_ms = sum(durations)
    return tuple(frames), (len(frames) * 1000 / total_ms if total_ms > 0 else None)


def sample_frame_indices(total: int, source_fps: float, fps: float, *, temporal_patch_size: int = 2,
                         min_frames: int = 4, max_frames: int = 768) -> np.ndarray:
    """int64 [n] indices of the frames kept when sampling ``fps`` frames per second (see module doc)."""
    max_n = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    n = min(max(total / source_fps * fps, min_frames), max_n)
    n = math.floor(n / temporal_patch_size) * temporal_patch_size
    if n == 0:
        return np.arange(total)
    return np.arange(n) * total // n


@dataclasses.dataclass(frozen=True)
class VideoProcessor(FrameProcessor):
    """Qwen2.5-VL video processor: per-frame pixel bounds 128*28*28..768*28*28, sampling at ``fps``."""

    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    def __post_init__(self):
        super().__post_init__()
        if not self.fps > 0:
            raise ValueError(f"the sampling fps must be positive; got {self.fps}")

    def sample(self, video: Video) -> tuple[list[Image.Image], float]:
        """The frames kept and their rate; a video with no source rate is kept whole at ``fps``."""
        if video.fps is None:
            return list(video.frames), self.fps
        total = len(video.frames)
        indices = sample_frame_indices(total, video.fps, self.fps, temporal_patch_size=self.temporal_patch_size,
                                       min_frames=self.min_frames, max_frames=self.max_frames)
        return [video.frames[i] for i in indices], len(indices) / total * video.fps

    def __call__(self, videos) -> dict[str, np.ndarray]:
        """One video (a ``Video``, path or [T, H, W, C] array) or a list of videos (sources as in
        ``load_video``) -> ``pixel_values_videos`` float32 [sum t*h*w, 1176], ``video_grid_thw`` int64
        [N, 3], ``second_per_grid_ts`` float32 [N]."""
        if isinstance(videos, (Video, str, os.PathLike, np.ndarray)):
            videos = [videos]
        if not isinstance(videos, (list, tuple)):
            raise TypeError(f"videos must be a video or a list of videos; got {type(videos).__name__}")
        if not videos:
            raise ValueError("no videos given")
        rows, grids, seconds = [], [], []
        for source in videos:
            frames, sampled_fps = self.sample(load_video(source))
            video_rows, grid = self.encode(frames)
            rows.append(video_rows)
            grids.append(grid)
            seconds.append(self.temporal_patch_size / sampled_fps)
        return {
            "pixel_values_videos": np.concatenate(rows),
            "video_grid_thw": np.array(grids, np.int64),
            "second_per_grid_ts": np.array(seconds, np.float32),
        }
