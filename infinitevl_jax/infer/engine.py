"""Jitted prefill chunks and decode steps of one decoder, compiled once per shape.

The decoder is split once into its graph and a flat list of its arrays (``flat_params``); the
two device functions are plain ``jax.jit`` functions of (parameter list, cache, inputs), so a
call costs no module-graph walk and each compiles once per input shape:

- ``prefill``: feeds T tokens (ids or embeddings) in chunks of at most ``chunk_size`` (never
  splitting a vision run); a shorter piece is right-padded to a power-of-two bucket (at least
  ``min_bucket``) and run with ``valid_len`` (padding changes nothing in the cache). Distinct
  compiled shapes: ``chunk_size`` and the buckets below it, whatever T is. Returns each row's
  logits at token T - 1.
- ``decode_step``: one token per row at mRoPE position ``count + rope_delta`` (text: the same on
  all three axes), then the next token sampled on the device; the cache buffer is donated, so
  the step updates it in place. Its shapes never change, so it compiles once per batch size and
  sampling setting.

Sizes: a hybrid decoder's cache has a fixed size; a full-attention (teacher) cache holds
``max_len`` tokens (``full_attention_capacity``) and must not be overrun: past it, its ring
buffer would silently turn the teacher into a sliding window of ``max_len``.
"""

from __future__ import annotations

import collections
import functools
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from infinitevl_jax.infer.flat_params import merge_flat, split_flat, unroll_by_default
from infinitevl_jax.infer.sampling import SamplingConfig, sample_tokens
from infinitevl_jax.models.decoder import Decoder, DecoderCache


def chunk_plan(seq_len: int, chunk_size: int, min_bucket: int = 16, no_cut=None) -> list[tuple[int, int, int]]:
    """``(start, length, padded_length)`` per piece: pieces of ``chunk_size`` tokens, each shorter
    one right-padded to the smallest power of two >= its length (at least ``min_bucket``, at
    most ``chunk_size``).

    ``no_cut``: optional bool ``[seq_len]``, True where a piece must not start (a token that
    continues a vision run, which M-MATE layers take whole); a piece then ends early, at the
    run's start. Raises when a run is longer than ``chunk_size``.
    """
    if seq_len < 1:
        raise ValueError(f"nothing to prefill: {seq_len} tokens")
    if chunk_size < 1 or min_bucket < 1:
        raise ValueError(f"chunk_size and min_bucket must be >= 1; got {chunk_size}, {min_bucket}")
    pieces, start = [], 0
    while start < seq_len:
        end = min(start + chunk_size, seq_len)
        if no_cut is not None:
            while start < end < seq_len and no_cut[end]:
                end -= 1
            if end == start:
                raise ValueError(f"a vision run from token {start} is longer than the prefill chunk_size "
                                 f"({chunk_size}); raise chunk_size")
        length = end - start
        bucket = chunk_size if length == chunk_size else max(min_bucket, 1 << (length - 1).bit_length())
        pieces.append((start, length, min(bucket, chunk_size)))
        start = end
    return pieces


def run_continuations(vision_mask) -> np.ndarray | None:
    """bool ``[T]``: tokens continuing a vision run in any row of ``vision_mask`` ``[B, T]`` (None: None)."""
    if vision_mask is None:
        return None
    v = np.asarray(vision_mask, bool)
    return np.concatenate([[False], np.any(v[:, 1:] & v[:, :-1], axis=0)])


def cache_bytes(cache) -> int:
    """Bytes of every array in a cache (or any pytree)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def full_attention_capacity(decoder: Decoder, cache: DecoderCache) -> int | None:
    """Tokens a full-attention layer's cache holds (None: the pattern has none, no limit)."""
    types = decoder.cfg.block_pattern
    if "full_attention" not in types:
        return None
    return int(cache.layers[types.index("full_attention")].k.shape[2])  # [blocks, B, capacity, H, D]


def _prefill_chunk(skeleton, params, cache, inputs, position_ids, vision_mask, valid_len):
    decoder = merge_flat(skeleton, params)
    ids, embeds = (inputs, None) if inputs.ndim == 2 else (None, inputs)
    hidden, cache = decoder.hidden_states(ids, inputs_embeds=embeds, position_ids=position_ids, cache=cache,
                                          valid_len=valid_len, vision_mask=vision_mask)
    last = jax.lax.dynamic_index_in_dim(hidden, valid_len - 1, axis=1, keepdims=False)  # [B, D]
    return decoder.logits(last), cache


def _decode_step(skeleton, sampling, vocab_limit, params, cache, tokens, counts, rope_deltas, key):
    decoder = merge_flat(skeleton, params)
    positions = (counts + rope_deltas)[:, None]  # [B, 1]
    if decoder.cfg.mrope_section is not None:
        positions = jnp.broadcast_to(positions, (3, *positions.shape))
    hidden, cache = decoder.hidden_states(tokens[:, None], position_ids=positions, cache=cache)
    key, draw = jax.random.split(key)
    return sample_tokens(decoder.logits(hidden[:, 0]), draw, sampling, vocab_limit), counts + 1, key, cache


class DecoderEngine:
    """``prefill`` / ``decode_step`` / ``sample`` of a ``Decoder`` (module docstring).

    After changing ``source``'s weights, call ``reload_weights``: a scanned engine shares the
    decoder's arrays, but an unrolled one holds copies made when it was built.

    ``unroll_layers`` (default: on GPU) runs ``source.unstacked()``: separate per-block weights in
    an unrolled loop. In a scan, XLA on GPU copies every weight slice out of its stack before the
    GEMM reads it, which doubled a decode step's weight traffic: an InfiniteVL-4B decode step
    spent 8.1 ms in kernels scanned and took 4.1 ms unrolled on an H200 (benchmarks/RESULTS.md).
    The block weights are copied once: while the caller keeps ``source``, they take twice the
    memory. The engine holds ``source`` only by a weak reference, so once the caller drops it
    the unrolled copy is the only one (``reload_weights`` then raises). Costs: longer compiles, and more host time per call (a streamed 448x448 frame's
    ``push_frame`` took 22.4 ms of host time unrolled vs 12.0 ms scanned, benchmarks/RESULTS.md).
    """

    def __init__(self, source: Decoder, *, chunk_size: int = 4096, min_bucket: int = 16,
                 unroll_layers: bool | None = None):
        chunk_plan(1, chunk_size, min_bucket)  # validates the sizes
        self.unroll_layers = unroll_by_default(unroll_layers)
        self._source = weakref.ref(source)
        self.chunk_size, self.min_bucket = chunk_size, min_bucket
        self.decoder = self._runnable()
        skeleton, self.params, self._leaves = split_flat(self.decoder)
        self._traces = collections.Counter()
        prefill = self._counted("prefill", functools.partial(_prefill_chunk, skeleton))
        self._prefill = jax.jit(prefill)
        self._prefill_donating = jax.jit(prefill, donate_argnums=(1,))
        self._decode = jax.jit(self._counted("decode", functools.partial(_decode_step, skeleton)),
                               static_argnums=(0, 1), donate_argnums=(3,))
        self._sample = jax.jit(sample_tokens, static_argnums=(2, 3))

    @property
    def source(self) -> Decoder:
        """The decoder this engine was built from (held weakly, see the class docstring)."""
        source = self._source()
        if source is None:
            raise RuntimeError(
                "this engine's source decoder no longer exists: the engine holds it only weakly, so that an "
                "unrolled engine does not keep a second copy of the weights alive; keep a reference to the "
                "decoder to call reload_weights")
        return source

    def _runnable(self) -> Decoder:
        """The decoder this engine runs: ``source`` itself, or its unstacked copy when unrolling."""
        return self.source.unstacked() if self.unroll_layers else self.source

    def reload_weights(self):
        """Takes ``source``'s current weights (e.g. after training steps); same shapes, so nothing
        recompiles. An unrolled engine copies them out of the stack again."""
        self.decoder = self._runnable()
        _, self.params, self._leaves = split_flat(self.decoder)

    def _counted(self, name, fn):
        """``fn`` that counts its traces: jit traces (and then compiles) once per new input signature."""

        def traced(*args):
            self._traces[name] += 1
            return fn(*args)

        return traced

    def compile_counts(self) -> dict[str, int]:
        """Programs traced and compiled so far by ``prefill`` (all chunk shapes) and ``decode_step``."""
        return {"prefill": self._traces["prefill"], "decode": self._traces["decode"]}

    def prefill(self, cache: DecoderCache, position_ids, *, input_ids=None, inputs_embeds=None, vision_mask=None,
                donate: bool = False, progress: bool = False):
        """Feeds T tokens to the cache in chunks.

        Args:
          cache: the stream so far (its ``start`` marks left padding, see ``Decoder.init_cache``).
          position_ids: int ``[3, B, T]`` mRoPE ids (or ``[B, T]`` for 1-D RoPE), host or device.
          input_ids: int ``[B, T]`` (host NumPy: padded on the host), or
          inputs_embeds: ``[B, T, D]`` embeddings (e.g. with vision tokens spliced in).
          vision_mask: bool ``[B, T]``, the vision tokens (M-MATE layers read it, and no chunk
            then splits a vision run); None: all text.
          donate: let XLA reuse the input cache's buffers (the caller must not use it again).
          progress: a tqdm bar over the chunks.

        Returns ``(logits [B, vocab] float32 of token T - 1, new cache)``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        inputs = np.asarray(input_ids, np.int32) if inputs_embeds is None else inputs_embeds
        if inputs.ndim != (2 if inputs_embeds is None else 3):
            raise ValueError(f"input_ids must be [B, T] / inputs_embeds [B, T, D]; got shape {inputs.shape}")
        batch, seq_len = inputs.shape[:2]
        position_ids = np.asarray(position_ids, np.int32)
        if position_ids.shape[-2:] != (batch, seq_len) or position_ids.ndim not in (2, 3):
            raise ValueError(f"position_ids must be [3, B, T] or [B, T] with (B, T) = {(batch, seq_len)}; "
                             f"got {position_ids.shape}")
        if cache.start.shape != (batch,):
            raise ValueError(f"the cache holds {cache.start.shape[0]} rows but the input has {batch}")
        vision = np.zeros((batch, seq_len), bool) if vision_mask is None else np.asarray(vision_mask, bool)
        if vision.shape != (batch, seq_len):
            raise ValueError(f"vision_mask must be [B, T] = {(batch, seq_len)}; got {vision.shape}")
        run = self._prefill_donating if donate else self._prefill
        pieces = chunk_plan(seq_len, self.chunk_size, self.min_bucket, run_continuations(vision))
        logits = None
        for start, length, padded in tqdm(pieces, desc="prefill", unit="chunk", file=sys.stdout,
                                          disable=not progress):
            piece = slice(start, start + length)
            logits, cache = run(self._leaves, cache, _right_pad(inputs[:, piece], padded),
                                _right_pad(position_ids[..., piece], padded, time_axis=-1),
                                _right_pad(vision[:, piece], padded), np.int32(length))
        return logits, cache

    def decode_step(self, cache: DecoderCache, tokens, counts, rope_deltas, key, sampling: SamplingConfig,
                    vocab_limit: int | None = None):
        """Feeds ``tokens`` int32 ``[B]`` at positions ``counts + rope_deltas`` (int32 ``[B]`` each)
        and samples the next ones. The cache is donated (do not reuse the one passed).

        Returns ``(next tokens [B], counts + 1, next key, cache)``.
        """
        return self._decode(sampling, vocab_limit, self._leaves, cache, tokens, counts, rope_deltas, key)

    def compiled_decode(self, cache: DecoderCache, sampling: SamplingConfig = SamplingConfig()):
        """The compiled decode step for this cache (``jax.stages.Compiled``): ``memory_analysis()``
        gives its temp, argument, output and aliased bytes (a temp size near the cache's own means a
        step copies the cache), ``as_text()`` its optimised HLO."""
        zeros = np.zeros((cache.start.shape[0],), np.int32)
        return self._decode.lower(sampling, None, self._leaves, cache, zeros, zeros, zeros,
                                  jax.random.key(0)).compile()

    def compiled_prefill(self, cache: DecoderCache, length: int, *, donate: bool = True):
        """The compiled prefill program for a text chunk of ``length`` tokens (``jax.stages.Compiled``;
        ``as_text()`` names the fusions a kernel profile shows, see ``compiled_decode``)."""
        batch = cache.start.shape[0]
        positions = (3,) * (self.decoder.cfg.mrope_section is not None) + (batch, length)
        run = self._prefill_donating if donate else self._prefill
        return run.lower(self._leaves, cache, np.zeros((batch, length), np.int32), np.zeros(positions, np.int32),
                         np.zeros((batch, length), bool), np.int32(length)).compile()

    def sample(self, logits, key, sampling: SamplingConfig, vocab_limit: int | None = None):
        """``sample_tokens`` jitted: int32 ``[B]`` from logits ``[B, V]``."""
        return self._sample(logits, key, sampling, vocab_limit)


def _right_pad(x, length: int, time_axis: int = 1):
    """Pads the time axis of ``x`` with zeros up to ``length`` (NumPy on the host, jnp on the device)."""
    missing = length - x.shape[time_axis]
    if missing == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[time_axis] = (0, missing)
    return np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)
