"""A streaming session: frames and text go in as they arrive, answers come out, memory stays flat.

Token layout (one ChatML user turn that keeps growing; spec section 8.2's demo, with standard
positions)::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n      at creation
    <|vision_start|> frame frame ... frame                          a run of frames
    <|vision_end|> text ...                                          push_text closes the run
    ... {question}<|im_end|>\\n<|im_start|>assistant\\n -> answer      ask(), on a copy of the state

A frame is an image resized to ``frame_size`` x ``frame_size`` (448: 256 merged tokens), encoded
by the ViT on its own and fed as one chunk. Positions follow the standard (transformers)
Qwen2.5-VL rules, with a run of frames treated as one video block that grows with stream
time: with ``base`` = the next free position when the run began at time ``t0``, a frame at time
``t`` (seconds) puts its merged token (y, x) at ``(base + floor((t - t0) * tokens_per_second),
base + y, base + x)`` -- ``rope_index``'s ``trunc(tau * tokens_per_second * second_per_grid_t)``
for evenly spaced frames -- and text resumes at (largest position so far) + 1.

``ask`` prefills the question on the current cache and decodes; caches are immutable arrays, so
the stream's own cache and positions are untouched and the stream goes on as if nothing was
asked. The stream index (the sliding-window ring buffer's counter) advances on every push.
Pushes donate the stream's cache (it is updated in place, not copied): an earlier
``session.cache`` is invalid after the next push.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from PIL import Image

from infinitevl_jax.data.image_processor import load_image
from infinitevl_jax.data.tokenizer import chat_prompt
from infinitevl_jax.infer.engine import DecoderEngine, full_attention_capacity
from infinitevl_jax.infer.generate import (Answer, encode_for_model, generate_tokens, image_processor_for, stop_ids_of,
                                          vocab_limit_of)
from infinitevl_jax.infer.sampling import SamplingConfig
from infinitevl_jax.infer.vision_encoder import VisionEncoder
from infinitevl_jax.models.vlm import VisionLanguageModel

_QUESTION = "\x00question\x00"


def chat_turn_parts(system: str) -> tuple[str, str]:
    """``chat_prompt`` split around the user's text: (everything before it, everything after it)."""
    before, after = chat_prompt(_QUESTION, system=system).split(_QUESTION)
    return before, after


class StreamingSession:
    """Frames and text in (``push_frame``, ``push_text``), answers out (``ask``); batch of one.

    Args:
      model: a ``VisionLanguageModel`` with a vision tower.
      tokenizer: its tokenizer (``encode``, ``decode``, ``special_ids``, ``eos_id``, ``vocab_size``).
      engine: compiled functions to reuse (default: a new ``DecoderEngine`` with ``chunk_size``).
      vision: the compiled vision tower to reuse (default: a new ``VisionEncoder``).
      frame_size: frames are resized to this square size first (None: the processor's own resize).
      system: the system prompt.
      max_len: tokens a full-attention (teacher) cache holds; required for such a model.
    """

    def __init__(self, model: VisionLanguageModel, tokenizer, *, engine: DecoderEngine | None = None,
                 vision: VisionEncoder | None = None, chunk_size: int = 4096, frame_size: int | None = 448,
                 system: str = "You are a helpful assistant.", max_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.engine = engine or DecoderEngine(model.language_model, chunk_size=chunk_size)
        self.vision = vision or VisionEncoder(model.visual, image_processor_for(model))
        self.frame_size = frame_size
        self.cache = model.language_model.init_cache(1, max_len)
        self.capacity = full_attention_capacity(model.language_model, self.cache)
        self.next_position = 0  # largest position so far + 1: where text goes next
        self.tokens_seen = 0  # the cache's stream index, kept on the host (no device sync)
        self.stream_time = None  # seconds of the latest frame
        self._run = None  # (base position, start time) of the open run of frames, or None
        prefix, self._question_suffix = chat_turn_parts(system)
        self.push_text(prefix)

    def _special(self, name: str) -> int:
        field = {"<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}[name]
        return getattr(self.model.cfg.tokens, field)

    def _text_ids(self, text: str) -> list[int]:
        """Token ids of ``text``, after ``<|vision_end|>`` if a run of frames is open."""
        ids = encode_for_model(self.tokenizer, text, self.model.cfg.tokens)
        return ([self._special("<|vision_end|>")] if self._run is not None else []) + ids

    def _check_room(self, cache_tokens: int, new: int):
        if self.capacity is not None and cache_tokens + new > self.capacity:
            raise ValueError(f"the full-attention cache holds {self.capacity} tokens; the stream has "
                             f"{cache_tokens} and needs {new} more (raise max_len)")

    def _feed(self, position_ids, *, input_ids=None, inputs_embeds=None, vision_mask=None):
        length = position_ids.shape[-1]
        self._check_room(self.tokens_seen, length)
        _, self.cache = self.engine.prefill(self.cache, position_ids, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                            vision_mask=vision_mask, donate=True)  # updated in place, not copied
        self.tokens_seen += length

    def _text_positions(self, count: int) -> np.ndarray:
        return np.broadcast_to(self.next_position + np.arange(count, dtype=np.int32), (3, 1, count))

    def push_text(self, text: str):
        """Appends text to the stream (closing an open run of frames with ``<|vision_end|>``)."""
        ids = self._text_ids(text)
        if not ids:
            return
        self._run = None
        self._feed(self._text_positions(len(ids)), input_ids=np.asarray([ids], np.int32))
        self.next_position += len(ids)

    def push_frame(self, frame, seconds: float):
        """Appends one frame (PIL image, uint8 array or path) seen at stream time ``seconds``.

        The device work is dispatched asynchronously; ``synchronize`` waits for it.
        """
        if self.stream_time is not None and seconds < self.stream_time:
            raise ValueError(f"frames must arrive in time order: {seconds} s after {self.stream_time} s")
        image = load_image(frame)
        if self.frame_size is not None:
            image = image.resize((self.frame_size, self.frame_size), Image.Resampling.BICUBIC)
        features, grid = self.vision.encode_frames(image)  # [H * W, D]
        if self._run is None:
            start = self._special("<|vision_start|>")
            self._feed(self._text_positions(1), input_ids=np.asarray([[start]], np.int32))
            self.next_position += 1
            self._run = (self.next_position, seconds)
        base, start_time = self._run
        merge = self.model.cfg.vision.spatial_merge_size
        height, width = grid[1] // merge, grid[2] // merge
        temporal = base + math.floor((seconds - start_time) * self.model.cfg.vision.tokens_per_second)
        cells = np.arange(height * width)  # raster order: row cells // width, column cells % width
        positions = np.stack([np.full(cells.size, temporal), base + cells // width, base + cells % width])
        self._feed(positions[:, None].astype(np.int32), inputs_embeds=features[None],
                   vision_mask=np.ones((1, positions.shape[1]), bool))
        self.next_position = max(self.next_position, int(positions.max()) + 1)
        self.stream_time = seconds

    def synchronize(self):
        """Waits until every pushed frame and text has gone through the model."""
        jax.block_until_ready(self.cache)

    def ask(self, question: str, *, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
            seed: int = 0) -> Answer:
        """Answers ``question`` about everything pushed so far; the stream itself is not changed."""
        ids = self._text_ids(question + self._question_suffix)
        self._check_room(self.tokens_seen, len(ids) + max_new_tokens - 1)
        start = time.perf_counter()
        logits, cache = self.engine.prefill(self.cache, self._text_positions(len(ids)),
                                            input_ids=np.asarray([ids], np.int32))
        jax.block_until_ready(logits)
        prefill_seconds = time.perf_counter() - start
        result = generate_tokens(self.engine, cache, logits, [self.next_position + len(ids)], [0],
                                 max_new_tokens=max_new_tokens, key=jax.random.key(seed), sampling=sampling,
                                 stop_ids=stop_ids_of(self.tokenizer),
                                 vocab_limit=vocab_limit_of(self.tokenizer, self.model))
        return Answer(self.tokenizer.decode(result.tokens[0]), result.tokens[0], result.finish_reasons[0], len(ids),
                      prefill_seconds, result.seconds)
