"""The hybrid decoder: embeddings, scanned blocks of pre-norm layers, final norm, tied logits.

Each layer: ``h = x + Mixer(RMSNorm_in(x)); out = h + MLP(RMSNorm_post(h))`` where the mixer is
a ``SelfAttention`` (sliding or full), a ``GatedDeltaNet`` or LinMU's ``MMate`` according to
``layer_types``.
Layers are grouped into ``num_blocks`` identical blocks of ``block_pattern`` (e.g. [SWA, GDN,
GDN, GDN]); the blocks' parameters are stacked on a leading axis and run with ``lax.scan``
(optionally rematerialised), so compile time does not grow with depth. ``Decoder.unstacked``
gives the inference form: separate blocks, unrolled (see ``DecoderEngine``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.models.config import MMATE_TYPES, DecoderConfig
from infinitevl_jax.models.gated_deltanet import GatedDeltaNet, init_gated_deltanet_cache
from infinitevl_jax.models.layers import RMSNorm, SwiGLU
from infinitevl_jax.models.mmate import MMate, init_mmate_cache
from infinitevl_jax.models.sliding_attention import SelfAttention, init_kv_cache
from infinitevl_jax.models.stacking import (run_unrolled, scan_stacked, scan_stacked_updating, stacked,
                                            with_unstacked_blocks)
from infinitevl_jax.models.vision_runs import VisionRuns, vision_runs
from infinitevl_jax.ops.rope import rope_cos_sin

class DecoderCache(NamedTuple):
    """Decode state of the whole decoder; its size never depends on how many tokens were seen
    (except a full-attention layer's, fixed by ``max_len``).

    layers: one cache per position in ``block_pattern``, each stacked over blocks (leading axis
      ``num_blocks``); index: int32 scalar, tokens seen so far (the stream index of the next
      token, padding included); start: int32 ``[B]``, stream index of each row's first real
      token: the tokens before it are left padding, invisible to every later token.
    """

    layers: tuple
    index: jax.Array
    start: jax.Array


class StreamSpan(NamedTuple):
    """Where one cached call sits in the stream: ``index`` (int32 scalar) = tokens before it,
    ``start`` (int32 ``[B]``) = each row's first real token, ``valid_len`` (int32 scalar) = real
    tokens of the call (a prefix; the rest is right padding the cache never sees)."""

    index: jax.Array
    start: jax.Array
    valid_len: jax.Array

    def valid(self, seq_len: int) -> jax.Array:
        """bool ``[B, seq_len]``: real tokens of the call (not left or right padding)."""
        t = jnp.arange(seq_len)
        return ((self.index + t)[None] >= self.start[:, None]) & (t < self.valid_len)[None]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer_type: str, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        if layer_type == "linear_attention":
            self.mixer = GatedDeltaNet(cfg, rngs=rngs)
        elif layer_type in MMATE_TYPES:
            self.mixer = MMate(cfg, shifted=layer_type == "mmate_shifted", rngs=rngs)
        else:
            self.mixer = SelfAttention(cfg, cfg.window_of(layer_type), rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, dtype=cfg.compute_dtype,
                          param_dtype=cfg.weight_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, *, cache=None, span: StreamSpan | None = None, segment_ids=None,
                 runs: VisionRuns | None = None):
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            stream = {} if span is None else dict(valid=span.valid(x.shape[1]), valid_len=span.valid_len)
            h, cache = self.mixer(h, cache=cache, segment_ids=segment_ids, **stream)
        elif self.layer_type in MMATE_TYPES:
            stream = {} if span is None else span._asdict()
            h, cache = self.mixer(h, cos, sin, runs, cache=cache, segment_ids=segment_ids, **stream)
        else:
            stream = {} if span is None else span._asdict()
            h, cache = self.mixer(h, cos, sin, cache=cache, segment_ids=segment_ids, **stream)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class DecoderBlock(nnx.Module):
    """One period of the layer pattern."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, t, rngs=rngs) for t in cfg.block_pattern])

    def __call__(self, x, cos, sin, *, caches=None, span=None, segment_ids=None, runs=None):
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, c = layer(x, cos, sin, cache=None if caches is None else caches[i], span=span,
                         segment_ids=segment_ids, runs=runs)
            new_caches.append(c)
        return x, (None if caches is None else tuple(new_caches))


class Decoder(nnx.Module):
    """Token ids (or embeddings) -> logits, with an optional constant-size decode cache."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.weight_dtype),
            logical_axes=("vocab", "embed"))

        self.blocks = stacked(lambda r: DecoderBlock(cfg, rngs=r), cfg.num_blocks, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.weight_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size, cfg.vocab_size), cfg.weight_dtype),
            logical_axes=("embed", "vocab"))

    def init_cache(self, batch: int, max_len: int | None = None, *, left_padding=None) -> DecoderCache:
        """Empty cache; ``max_len`` is required only when the pattern has full-attention layers.

        ``left_padding``: optional int ``[batch]``, leading pad tokens per row in what will be fed
        first (a left-padded batch of prompts of different lengths); they stay invisible.
        """
        cfg = self.cfg
        def layer_cache(t):
            if t == "linear_attention":
                return init_gated_deltanet_cache(cfg, batch)
            if t in MMATE_TYPES:
                return init_mmate_cache(cfg, batch)
            return init_kv_cache(cfg, cfg.window_of(t), batch, max_len)

        per_block = tuple(layer_cache(t) for t in cfg.block_pattern)
        stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_blocks, *a.shape)), per_block)
        start = jnp.zeros((batch,), jnp.int32) if left_padding is None else jnp.asarray(left_padding, jnp.int32)
        if start.shape != (batch,):
            raise ValueError(f"left_padding must have one entry per row, shape ({batch},); got {start.shape}")
        return DecoderCache(layers=stacked, index=jnp.zeros((), jnp.int32), start=start)

    def unstacked(self) -> "Decoder":
        """This decoder with its blocks as ``num_blocks`` separate modules run by a Python loop
        (``stacking.unstack``): the same function, faster decoding on GPU, slower compiles. The
        block parameters are copied (the decoder's memory for them doubles while both exist);
        everything else is shared. For inference: training code expects the stacked blocks."""
        return with_unstacked_blocks(self)

    def embed(self, input_ids):
        """``[B, T]`` ids -> ``[B, T, D]`` embeddings in the compute dtype."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.cfg.compute_dtype)

    def rope(self, position_ids):
        """Rotary ``(cos, sin)`` ``[B, T, head_dim]`` in the compute dtype for ``[B, T]`` or ``[3, B, T]`` ids."""
        cfg = self.cfg
        return rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, mrope_section=cfg.mrope_section,
                            dtype=cfg.compute_dtype)

    def logits(self, hidden):
        """Final-normed hidden states ``[..., D]`` -> float32 logits ``[..., vocab]`` (tied or own head)."""
        head = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden, head.astype(self.cfg.compute_dtype)).astype(jnp.float32)

    def runs(self, vision_mask, position_ids, segment_ids=None) -> VisionRuns | None:
        """The vision runs M-MATE layers read (None when the pattern has none); ``vision_mask``
        bool ``[B, T]`` (None: all text)."""
        if not set(self.cfg.block_pattern) & set(MMATE_TYPES):
            return None
        if vision_mask is None:
            vision_mask = jnp.zeros(position_ids.shape[-2:], bool)
        elif vision_mask.shape != position_ids.shape[-2:]:
            raise ValueError(f"vision_mask must be [B, T] = {position_ids.shape[-2:]}; got {vision_mask.shape}")
        return vision_runs(vision_mask, position_ids, segment_ids)

    def hidden_states(self, input_ids=None, *, inputs_embeds=None, position_ids=None, segment_ids=None,
                      cache: DecoderCache | None = None, valid_len=None, vision_mask=None):
        """The decoder without its head: ``(final-normed hidden [B, T, D], new cache or None)``.

        Arguments as in ``__call__``; use it to take logits of a few positions only (a prefill
        needs the last real token's).
        """
        cfg = self.cfg
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.compute_dtype)
        batch, seq_len, width = x.shape
        if width != cfg.hidden_size:
            raise ValueError(f"inputs_embeds width {width} != hidden_size {cfg.hidden_size}")
        span = None if cache is None else self._span(cache, batch, seq_len, valid_len)
        if cache is None and valid_len is not None:
            raise ValueError("valid_len (right padding) needs a cache; without one, pass segment_ids")
        index = jnp.zeros((), jnp.int32) if cache is None else cache.index
        if position_ids is None:
            position_ids = jnp.broadcast_to(index + jnp.arange(seq_len), (batch, seq_len))
        cos, sin = self.rope(position_ids)
        runs = self.runs(vision_mask, position_ids, segment_ids)

        step = lambda block, h, caches: block(h, cos, sin, caches=caches, span=span, segment_ids=segment_ids,
                                              runs=runs)
        layers = None if cache is None else cache.layers
        if isinstance(self.blocks, nnx.List):
            x, layers = run_unrolled(self.blocks, step, x, layers)
        elif cache is None:
            x, _ = scan_stacked(self.blocks, step, x, None, cfg.remat)
        else:
            x, layers = scan_stacked_updating(self.blocks, step, x, layers, cfg.remat)
        new_cache = None if cache is None else DecoderCache(layers, index + span.valid_len, cache.start)
        return self.norm(x), new_cache

    @staticmethod
    def _span(cache: DecoderCache, batch: int, seq_len: int, valid_len) -> StreamSpan:
        if cache.start.shape != (batch,):
            raise ValueError(f"the cache holds {cache.start.shape[0]} rows but the input has {batch}")
        if valid_len is None:
            valid_len = seq_len
        elif isinstance(valid_len, int) and not 0 <= valid_len <= seq_len:
            raise ValueError(f"valid_len must be in [0, {seq_len}] (the call's tokens); got {valid_len}")
        return StreamSpan(cache.index, cache.start, jnp.asarray(valid_len, jnp.int32))

    def __call__(self, input_ids=None, *, inputs_embeds=None, position_ids=None, segment_ids=None,
                 cache: DecoderCache | None = None, valid_len=None, vision_mask=None):
        """Runs the decoder.

        Args:
          input_ids: ``[B, T]`` int token ids (or pass ``inputs_embeds`` ``[B, T, D]``).
          position_ids: RoPE positions, ``[B, T]`` or mRoPE ``[3, B, T]``; default: stream index.
          segment_ids: ``[B, T]`` packed-sequence ids (no cache): no attention, conv or state
            crosses a segment boundary.
          cache: ``DecoderCache`` from ``init_cache`` or a previous call.
          valid_len: with a cache, the number of real tokens (int, may be traced), a prefix of
            the T given; the rest is right padding: it changes nothing in the cache, which
            advances by ``valid_len`` (so one compiled shape serves every shorter chunk).
          vision_mask: bool ``[B, T]``, True at vision tokens; read by M-MATE layers only (their
            backward scan and windows cover vision runs, ``models.vision_runs``). None: all text.

        Returns ``(logits [B, T, vocab] float32, new cache or None)``.
        """
        hidden, cache = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                                           segment_ids=segment_ids, cache=cache, valid_len=valid_len,
                                           vision_mask=vision_mask)
        return self.logits(hidden), cache
