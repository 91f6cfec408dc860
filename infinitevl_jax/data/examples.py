"""Conversation -> tokenised training example: ids, label mask, vision inputs, mRoPE positions.

``ExampleEncoder(conversation)``:
1. runs the image / video processors on the conversation's media (``pixel_values`` +
   ``image_grid_thw``, ``pixel_values_videos`` + ``video_grid_thw`` + ``second_per_grid_ts``);
2. renders the ChatML pieces (``chat_template.render_pieces``), repeats each placeholder
   ``t*h*w / merge**2`` times (``expand_placeholders``) and encodes piece by piece, so the label
   mask is exact (assistant text + its ``<|im_end|>``);
3. builds the example's own mRoPE ids with ``rope_index`` (positions start at 0 per example, so a
   packed row holds each example exactly as it would run alone).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from infinitevl_jax.data.chat_template import DEFAULT_SYSTEM_PROMPT, Conversation, encode_pieces, render_pieces
from infinitevl_jax.data.image_processor import ImageProcessor, expand_placeholders
from infinitevl_jax.data.positions import rope_index
from infinitevl_jax.data.video import VideoProcessor
from infinitevl_jax.models.config import MultimodalTokens, VisionConfig

_TOKEN_NAMES = {
    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One tokenised conversation.

    input_ids: int32 ``[L]``; label_mask: bool ``[L]`` (True on assistant text and its
    ``<|im_end|>``); position_ids: int32 ``[3, L]`` (mRoPE, from 0); vision: the processor outputs
    present (``pixel_values [N, patch_dim]``, ``image_grid_thw [n, 3]``, ``pixel_values_videos``,
    ``video_grid_thw``, ``second_per_grid_ts``), so ``model(input_ids[None], **vision)`` runs it alone.
    """

    input_ids: np.ndarray
    label_mask: np.ndarray
    position_ids: np.ndarray
    vision: dict
    name: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def check_token_ids(tokenizer, tokens: MultimodalTokens) -> None:
    """The tokenizer's ids for the vision special tokens must be the model config's."""
    wrong = {field: (token, tokenizer.special_ids.get(token), getattr(tokens, field))
             for field, token in _TOKEN_NAMES.items() if tokenizer.special_ids.get(token) != getattr(tokens, field)}
    if wrong:
        detail = "; ".join(f"{tok}: tokenizer id {got}, config {field} = {want}" for field, (tok, got, want)
                           in wrong.items())
        raise ValueError(f"tokenizer and model config disagree on special token ids ({detail})")


@dataclasses.dataclass(frozen=True)
class ExampleEncoder:
    """Callable ``Conversation -> Example`` (module docstring). ``vision`` None: text-only model."""

    tokenizer: object
    tokens: MultimodalTokens
    vision: VisionConfig | None
    image_processor: ImageProcessor | None = None
    video_processor: VideoProcessor | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self):
        check_token_ids(self.tokenizer, self.tokens)
        if self.vision is not None:
            wanted = (self.vision.patch_size, self.vision.temporal_patch_size, self.vision.spatial_merge_size)
            for what, processor in (("image", self.image_processor), ("video", self.video_processor)):
                settings = None if processor is None else (
                    processor.patch_size, processor.temporal_patch_size, processor.merge_size)
                if settings != wanted:
                    raise ValueError(f"the {what} processor's (patch, temporal patch, merge) sizes must be the "
                                     f"vision tower's {wanted}; got {settings}")

    def __call__(self, conversation: Conversation) -> Example:
        vision = self._process_media(conversation)
        pieces = render_pieces(conversation.messages, system=self.system_prompt)
        merge = 1 if self.vision is None else self.vision.spatial_merge_size
        texts = expand_placeholders([text for text, _ in pieces], vision.get("image_grid_thw"),
                                    vision.get("video_grid_thw"), merge_size=merge)
        ids, labels = encode_pieces(zip(texts, (is_label for _, is_label in pieces)), self.tokenizer)
        input_ids = np.asarray(ids, np.int32)
        positions, _ = rope_index(
            input_ids[None], image_grid_thw=vision.get("image_grid_thw"), video_grid_thw=vision.get("video_grid_thw"),
            second_per_grid_ts=vision.get("second_per_grid_ts"), spatial_merge_size=merge,
            tokens_per_second=(self.vision or VisionConfig()).tokens_per_second,
            image_token_id=self.tokens.image_token_id, video_token_id=self.tokens.video_token_id)
        return Example(input_ids, np.asarray(labels, bool), positions[:, 0], vision, conversation.name)

    def _process_media(self, conversation: Conversation) -> dict:
        if (conversation.images or conversation.videos) and self.vision is None:
            raise ValueError(f"{conversation.name}: has images/videos but the model config has no vision tower")
        vision = {}
        try:
            if conversation.images:
                vision.update(self.image_processor(list(conversation.images)))
            if conversation.videos:
                vision.update(self.video_processor(list(conversation.videos)))
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise type(e)(f"{conversation.name}: {e}") from None
        return vision
