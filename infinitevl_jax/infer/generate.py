"""Generation: chat requests (text + images) -> left-padded batch -> chunked prefill -> decode loop.

A batch of prompts of different lengths is left-padded to the longest one. Pads are invisible
(the cache's ``start``; see ``Decoder.init_cache``) and real tokens take their positions from
``rope_index`` over the real tokens only, so each row generates exactly what it generates alone.
Decoding feeds every row one token per step at position ``real tokens so far + rope_delta``; a
row that emits a stop token is finished (later tokens of it are discarded), and the loop ends
when every row is finished or after ``max_new_tokens``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import NamedTuple, Sequence

import jax
import numpy as np
from tqdm import tqdm

from infinitevl_jax.data.image_processor import ImageProcessor, expand_placeholders
from infinitevl_jax.data.tokenizer import chat_prompt
from infinitevl_jax.infer.engine import DecoderEngine, full_attention_capacity
from infinitevl_jax.infer.sampling import SamplingConfig
from infinitevl_jax.models.config import MultimodalTokens
from infinitevl_jax.models.decoder import DecoderCache
from infinitevl_jax.models.vlm import VisionLanguageModel

IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
MULTIMODAL_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                     "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


def encode_for_model(tokenizer, text: str, tokens: MultimodalTokens) -> list[int]:
    """``tokenizer.encode(text)`` with the multimodal special tokens mapped to the model's ids.

    A checkpoint's tokenizer already agrees with its model; the byte tokenizer used with a
    random-weight preset of the real vocabulary does not (e.g. ``<|image_pad|>`` is 262 there but
    151655 in the model), and this maps one onto the other.
    """
    remap = {}
    for field, name in MULTIMODAL_TOKENS.items():
        if name not in tokenizer.special_ids:
            raise ValueError(f"the tokenizer has no {name} token")
        remap[tokenizer.special_ids[name]] = getattr(tokens, field)
    return [remap.get(i, i) for i in tokenizer.encode(text)]


class PromptBatch(NamedTuple):
    """A left-padded batch ready for ``DecoderEngine.prefill``.

    embeds ``[B, T, D]``; position_ids int32 ``[3, B, T]`` (pads 0); left_padding and lengths
    int32 ``[B]`` (pads, real tokens); rope_deltas int32 ``[B]``; vision_mask bool ``[B, T]``.
    """

    embeds: jax.Array
    position_ids: np.ndarray
    left_padding: np.ndarray
    lengths: np.ndarray
    rope_deltas: np.ndarray
    vision_mask: np.ndarray


def prepare_prompts(model: VisionLanguageModel, token_ids: Sequence[Sequence[int]], **vision) -> PromptBatch:
    """Left-pads ``token_ids`` (one list per row) and runs ``model.prepare`` with the vision inputs
    of all rows (``pixel_values``/``image_grid_thw`` etc. in row order)."""
    if not token_ids or any(len(ids) == 0 for ids in token_ids):
        raise ValueError("every prompt needs at least one token")
    lengths = np.array([len(ids) for ids in token_ids], np.int32)
    width = int(lengths.max())
    ids = np.zeros((len(token_ids), width), np.int32)  # pad id 0: any non-special id (never seen)
    mask = np.zeros_like(ids)
    for row, row_ids in enumerate(token_ids):
        ids[row, width - len(row_ids):] = row_ids
        mask[row, width - len(row_ids):] = 1
    prepared = model.prepare(ids, attention_mask=mask, **vision)
    return PromptBatch(prepared.embeds, np.asarray(prepared.position_ids, np.int32), width - lengths, lengths,
                       np.asarray(prepared.rope_deltas, np.int32).reshape(-1), np.asarray(prepared.vision_mask))


@dataclasses.dataclass
class Generation:
    """tokens: per row, the generated ids (a stop token ends a row and is not included);
    finish_reasons: ``"stop"`` or ``"length"`` per row; cache: after the last token fed;
    seconds: wall time of the decode loop (excluding the prefill)."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    cache: DecoderCache
    seconds: float


def generate_tokens(engine: DecoderEngine, cache: DecoderCache, logits, counts, rope_deltas, *,
                    max_new_tokens: int, key, sampling: SamplingConfig = SamplingConfig(),
                    stop_ids: Sequence[int] = (), vocab_limit: int | None = None,
                    progress: bool = False) -> Generation:
    """Decodes after a prefill.

    Args:
      engine, cache: the prefilled stream (the cache is consumed: decode steps donate it).
      logits: ``[B, V]`` logits of each row's last prompt token.
      counts: int ``[B]``: real tokens before the first generated one (its position is
        ``count + rope_delta``); rope_deltas: int ``[B]`` (``PromptBatch.rope_deltas``).
      max_new_tokens: most tokens per row; key: a PRNG key (the draws are reproducible).
      stop_ids: ids that end a row; vocab_limit: sample only ids below it.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    batch = logits.shape[0]
    key, first = jax.random.split(key)
    tokens = engine.sample(logits, first, sampling, vocab_limit)
    counts, rope_deltas = np.asarray(counts, np.int32), np.asarray(rope_deltas, np.int32)
    stop = set(int(i) for i in stop_ids)
    out, reasons = [[] for _ in range(batch)], ["length"] * batch
    start = time.perf_counter()
    for step in tqdm(range(max_new_tokens), desc="decode", unit="tok", file=sys.stdout, disable=not progress):
        for row, token in enumerate(np.asarray(tokens).tolist()):
            if reasons[row] == "stop":
                continue
            if token in stop:
                reasons[row] = "stop"
            else:
                out[row].append(token)
        if all(r == "stop" for r in reasons) or step == max_new_tokens - 1:
            break
        tokens, counts, key, cache = engine.decode_step(cache, tokens, counts, rope_deltas, key, sampling, vocab_limit)
    return Generation(out, reasons, cache, time.perf_counter() - start)


@dataclasses.dataclass(frozen=True)
class Request:
    """One chat turn: the user's text and the images shown before it (paths, PIL images or arrays)."""

    text: str
    images: tuple = ()


@dataclasses.dataclass
class Answer:
    """A generated reply: text, ids (without the stop token), why it ended, and timings."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float


def stop_ids_of(tokenizer) -> list[int]:
    """Ids that end an assistant turn: ``<|im_end|>`` (``eos_id``) and ``<|endoftext|>`` if known."""
    return [tokenizer.eos_id] + [tokenizer.special_ids[t] for t in ("<|endoftext|>",) if t in tokenizer.special_ids]


def vocab_limit_of(tokenizer, model: VisionLanguageModel) -> int:
    """Ids the answer may use: the tokenizer's (a model's embedding table may have padding rows)."""
    return min(tokenizer.vocab_size, model.cfg.decoder.vocab_size)


def image_processor_for(model: VisionLanguageModel) -> ImageProcessor:
    """The Qwen2.5-VL image processor with the model's patch, merge and temporal sizes."""
    vision = model.cfg.vision
    if vision is None:
        raise ValueError("this model config has no vision tower: it cannot take images")
    return ImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                          temporal_patch_size=vision.temporal_patch_size)


def encode_requests(model: VisionLanguageModel, tokenizer, requests: Sequence[Request]):
    """Chat-templated token ids per request and the batch's vision inputs (``model.prepare`` keywords)."""
    token_ids, pixels, grids = [], [], []
    for request in requests:
        text = chat_prompt(IMAGE_SLOT * len(request.images) + request.text)
        grid = None
        if request.images:
            vision = image_processor_for(model)(list(request.images))
            pixels.append(vision["pixel_values"])
            grids.append(grid := vision["image_grid_thw"])
            text = expand_placeholders(text, grid, merge_size=model.cfg.vision.spatial_merge_size)
        token_ids.append(encode_for_model(tokenizer, text, model.cfg.tokens))
    vision = {} if not pixels else {"pixel_values": np.concatenate(pixels), "image_grid_thw": np.concatenate(grids)}
    return token_ids, vision


def generate(model: VisionLanguageModel, tokenizer, requests: Sequence[Request], *, max_new_tokens: int = 64,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0, engine: DecoderEngine | None = None,
             chunk_size: int = 4096, max_len: int | None = None, progress: bool = False) -> list[Answer]:
    """Answers a batch of chat requests (one assistant turn each) with the tokenizer's vocabulary.

    ``engine`` reuses compiled functions across calls (default: a new one with ``chunk_size``);
    ``max_len`` sizes a full-attention (teacher) cache (default: longest prompt + ``max_new_tokens``);
    hybrid caches ignore it.
    Generation stops at ``<|im_end|>`` (the tokenizer's ``eos_id``) or ``<|endoftext|>``.
    """
    engine = engine or DecoderEngine(model.language_model, chunk_size=chunk_size)
    token_ids, vision = encode_requests(model, tokenizer, requests)
    start = time.perf_counter()
    prompts = prepare_prompts(model, token_ids, **vision)
    width = prompts.embeds.shape[1]
    decoder = model.language_model
    if "full_attention" in decoder.cfg.layer_types:
        max_len = max_len or width + max_new_tokens
    else:
        max_len = None  # sliding windows keep their full size: one cache shape for every prompt
    cache = decoder.init_cache(len(requests), max_len, left_padding=prompts.left_padding)
    capacity = full_attention_capacity(decoder, cache)
    if capacity is not None and width + max_new_tokens - 1 > capacity:
        raise ValueError(f"the full-attention cache holds {capacity} tokens but the prompt ({width} with padding) "
                         f"plus {max_new_tokens} new tokens need {width + max_new_tokens - 1}; raise max_len")
    logits, cache = engine.prefill(cache, prompts.position_ids, inputs_embeds=prompts.embeds,
                                   vision_mask=prompts.vision_mask, donate=True, progress=progress)
    jax.block_until_ready(logits)
    prefill_seconds = time.perf_counter() - start
    result = generate_tokens(engine, cache, logits, prompts.lengths, prompts.rope_deltas,
                             max_new_tokens=max_new_tokens, key=jax.random.key(seed), sampling=sampling,
                             stop_ids=stop_ids_of(tokenizer), vocab_limit=vocab_limit_of(tokenizer, model),
                             progress=progress)
    return [Answer(tokenizer.decode(ids), ids, reason, int(n), prefill_seconds, result.seconds)
            for ids, reason, n in zip(result.tokens, result.finish_reasons, prompts.lengths)]
