"""The vision-language model: ViT features spliced into the token embeddings, then the decoder.

Inputs follow transformers' Qwen2.5-VL exactly, so the output of ``Qwen2_5_VLProcessor`` (or of
``infinitevl_jax.data``'s processor) can be passed as is:

    input_ids            [B, T]   with one ``<|image_pad|>`` / ``<|video_pad|>`` per merged token
    pixel_values         [N, C*T*P*P], image_grid_thw [n_images, 3]          (optional)
    pixel_values_videos  [M, C*T*P*P], video_grid_thw [n_videos, 3],
                         second_per_grid_ts [n_videos]                        (optional)
    attention_mask       [B, T]   1 = token, 0 = padding (left or right)      (optional)

Embeddings: ``E[input_ids]``, with the k-th image-pad position (batch-major order) replaced by
the k-th merged image token from the ViT, and likewise for videos. Positions: mRoPE ids from
``rope_index`` over the whole sequence. Padding runs as its own segment (``segment_ids = attention_mask``):
real tokens never see pads, and Gated DeltaNet states restart at the first real token (the
PyTorch original lets left pads leak into the GDN state instead; spec section 11, pitfall 7).

Packed batches (``data.packing.PackedBatch``, several examples per row) go through
``prepare_packed`` instead: positions and segments come with the batch, each row's images and
videos run through the ViT as one padded item list (``data.vision_budget``), and the k-th vision
placeholder of row b (image or video, in token order) takes row b's k-th merged token. Every shape
is fixed by the batch, so it is jit-able and compiles once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.data.positions import rope_index
from infinitevl_jax.models.config import VisionConfig, VisionLanguageConfig
from infinitevl_jax.models.decoder import Decoder, DecoderCache
from infinitevl_jax.models.vision import AttentionGroups, VisionLayout, VisionTransformer, encode_vision


class PreparedInputs(NamedTuple):
    """Decoder inputs: embeds ``[B, T, D]``, position_ids ``[3, B, T]``, segment_ids ``[B, T]``
    (or None), rope_deltas ``[B, 1]`` (None for packed batches, which are never continued),
    vision_mask bool ``[B, T]`` (the image and video placeholders)."""

    embeds: jax.Array
    position_ids: jax.Array
    segment_ids: jax.Array | None
    rope_deltas: np.ndarray | None
    vision_mask: jax.Array

    def decoder_kwargs(self) -> dict:
        """The keyword arguments of ``Decoder.__call__`` / ``hidden_states`` these inputs fill."""
        return dict(inputs_embeds=self.embeds, position_ids=self.position_ids, segment_ids=self.segment_ids,
                    vision_mask=self.vision_mask)


class VisionLanguageOutput(NamedTuple):
    """logits ``[B, T, vocab]`` float32; cache (or None); rope_deltas ``[B, 1]`` (decode positions
    are ``stream index + rope_deltas`` on all three mRoPE axes)."""

    logits: jax.Array
    cache: DecoderCache | None
    rope_deltas: np.ndarray


def _splice(embeds, mask, order, features):
    """``embeds [B, T, D]`` with position (b, t) replaced by ``features[order[b, t]]`` where ``mask``."""
    rows = jnp.take(features.astype(embeds.dtype), jnp.clip(order, 0, features.shape[0] - 1), axis=0)
    return jnp.where(mask[..., None], rows, embeds)


def splice_features(embeds, input_ids, token_id, features):
    """Replaces the embeddings at ``input_ids == token_id`` by the rows of ``features`` in order.

    embeds ``[B, T, D]``, input_ids ``[B, T]``, features ``[K, D]`` where K is the number of
    matching positions (checked by the caller; jit-compatible).
    """
    mask = input_ids == token_id
    order = jnp.cumsum(mask.reshape(-1)).reshape(mask.shape) - 1
    return _splice(embeds, mask, order, features)


def splice_row_features(embeds, mask, features):
    """Per row: the k-th position where ``mask [B, T]`` holds takes ``features[b, k]`` (``[B, K, D]``);
    rows may use fewer than K features (the rest is padding)."""
    batch, k = features.shape[:2]
    order = jnp.cumsum(mask, axis=1) - 1 + (jnp.arange(batch) * k)[:, None]
    return _splice(embeds, mask, order, features.reshape(batch * k, -1))


def flatten_vision_layout(layout: VisionLayout) -> VisionLayout:
    """A per-row layout (every array with a leading ``B`` axis, ``P`` patches per row) as the
    layout of one ``[B * P]`` patch sequence: rows' patch ids offset by ``b * P``, groups
    concatenated, slots offset by ``b * G * L``. jit-compatible."""
    batch, patches = layout.rows.shape

    def groups(g: AttentionGroups) -> AttentionGroups:
        count, width = g.index.shape[1:]
        index = g.index + (jnp.arange(batch) * patches)[:, None, None]
        position = g.position + (jnp.arange(batch) * count * width)[:, None]
        return AttentionGroups(index.reshape(batch * count, width), g.lengths.reshape(-1), position.reshape(-1))

    return VisionLayout(layout.rows.reshape(-1), layout.cols.reshape(-1), groups(layout.window), groups(layout.full))


def _check_count(input_ids, token_id, features, what):
    count = int(np.sum(np.asarray(input_ids) == token_id))
    if count != features.shape[0]:
        raise ValueError(f"{what}: the ids hold {count} placeholder tokens (id {token_id}) but the vision tower "
                         f"produced {features.shape[0]} merged tokens; expand each placeholder to t*h*w/4 tokens")


@nnx.jit
def _run_decoder(decoder, embeds, position_ids, segment_ids, vision_mask, cache):
    return decoder(inputs_embeds=embeds, position_ids=position_ids, segment_ids=segment_ids, vision_mask=vision_mask,
                   cache=cache)


class VisionLanguageModel(nnx.Module):
    """``visual`` (Qwen2.5-VL ViT + merger, absent for text-only configs) and ``language_model``."""

    def __init__(self, cfg: VisionLanguageConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.visual = None if cfg.vision is None else VisionTransformer(cfg.vision, rngs=rngs)
        self.language_model = Decoder(cfg.decoder, rngs=rngs)

    def vision_mask(self, input_ids):
        """bool ``[B, T]``: the image and video placeholder tokens of ``input_ids``."""
        tokens = self.cfg.tokens
        return (input_ids == tokens.image_token_id) | (input_ids == tokens.video_token_id)

    def embed(self, input_ids, *, image_embeds=None, video_embeds=None):
        """``[B, T]`` ids (+ merged vision tokens ``[K, D]``) -> ``[B, T, D]`` embeddings."""
        tokens = self.cfg.tokens
        x = self.language_model.embed(input_ids)
        if image_embeds is not None:
            x = splice_features(x, input_ids, tokens.image_token_id, image_embeds)
        if video_embeds is not None:
            x = splice_features(x, input_ids, tokens.video_token_id, video_embeds)
        return x

    def _vision(self, pixel_values, grid_thw, token_id, input_ids, what):
        if pixel_values is None:
            return None
        if self.visual is None:
            raise ValueError(f"{what} given but this model config has no vision tower")
        if grid_thw is None:
            raise ValueError(f"{what} needs its grid_thw")
        features = encode_vision(self.visual, jnp.asarray(pixel_values), np.asarray(grid_thw))
        _check_count(input_ids, token_id, features, what)
        return features

    def prepare(self, input_ids, *, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
                video_grid_thw=None, second_per_grid_ts=None, attention_mask=None) -> PreparedInputs:
        """Host-level: runs the vision tower, splices its tokens and builds the mRoPE ids.

        ``input_ids`` must be whole sequences from their start (positions are counted from 0).
        """
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, time]; got shape {input_ids.shape}")
        tokens = self.cfg.tokens
        image_embeds = self._vision(pixel_values, image_grid_thw, tokens.image_token_id, input_ids, "pixel_values")
        video_embeds = self._vision(pixel_values_videos, video_grid_thw, tokens.video_token_id, input_ids,
                                    "pixel_values_videos")
        embeds = self.embed(jnp.asarray(input_ids), image_embeds=image_embeds, video_embeds=video_embeds)
        vision = self.cfg.vision or VisionConfig()  # text-only: positions ignore the vision settings
        position_ids, rope_deltas = rope_index(
            input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask,
            spatial_merge_size=vision.spatial_merge_size, tokens_per_second=vision.tokens_per_second,
            image_token_id=tokens.image_token_id, video_token_id=tokens.video_token_id)
        segment_ids = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return PreparedInputs(embeds, jnp.asarray(position_ids), segment_ids, rope_deltas,
                              self.vision_mask(jnp.asarray(input_ids)))

    def prepare_packed(self, batch) -> PreparedInputs:
        """Decoder inputs of a packed batch (``data.packing.PackedBatch`` or anything with its
        fields: input_ids, segment_ids ``[B, T]``, position_ids ``[B, 3, T]``, pixel_values
        ``[B, P, patch_dim]`` and a per-row vision_layout, or None for text only). jit-able.
        """
        input_ids = jnp.asarray(batch.input_ids)
        if input_ids.ndim != 2 or batch.position_ids.shape != (input_ids.shape[0], 3, input_ids.shape[1]):
            raise ValueError(f"packed input_ids must be [B, T] and position_ids [B, 3, T]; got "
                             f"{input_ids.shape} and {batch.position_ids.shape}")
        embeds = self.embed(input_ids)
        if batch.pixel_values is not None:
            if self.visual is None:
                raise ValueError("the batch has pixel_values but this model config has no vision tower")
            rows, patches = batch.pixel_values.shape[:2]
            features = self.visual.encode(jnp.reshape(batch.pixel_values, (rows * patches, -1)),
                                          flatten_vision_layout(batch.vision_layout))
            merged = patches // self.visual.cfg.merge_unit
            embeds = splice_row_features(embeds, self.vision_mask(input_ids), features.reshape(rows, merged, -1))
        position_ids = jnp.transpose(jnp.asarray(batch.position_ids), (1, 0, 2))
        return PreparedInputs(embeds, position_ids, jnp.asarray(batch.segment_ids), None,
                              self.vision_mask(input_ids))

    def __call__(self, input_ids, *, cache: DecoderCache | None = None, **inputs) -> VisionLanguageOutput:
        """Forward of whole sequences (``prepare`` + the decoder); ``inputs`` as in ``prepare``.

        With a ``cache`` (empty: this is a prefill) the returned cache continues the stream; tokens
        after the prompt sit at ``decode_position_ids(index, rope_deltas)``.
        """
        if cache is not None and int(cache.index) != 0:
            raise ValueError("VisionLanguageModel(...) takes whole sequences; continue a cache through "
                             "language_model(inputs_embeds=..., position_ids=decode_position_ids(...), cache=...)")
        prepared = self.prepare(input_ids, **inputs)
        logits, cache = _run_decoder(self.language_model, prepared.embeds, prepared.position_ids,
                                     prepared.segment_ids, prepared.vision_mask, cache)
        return VisionLanguageOutput(logits, cache, prepared.rope_deltas)
