"""Inputs: tokenizers, chat template, image / video processors, bundled data sets."""

from infinitevl_jax.data.image_processor import ImageProcessor, expand_placeholders, load_image, smart_resize
from infinitevl_jax.data.video import Video, VideoProcessor, load_video, sample_frame_indices

__all__ = [
    "ImageProcessor", "Video", "VideoProcessor", "expand_placeholders", "load_image", "load_video",
    "sample_frame_indices", "smart_resize",
]
