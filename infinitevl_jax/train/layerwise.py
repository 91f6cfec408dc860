"""Teacher-forced layer-wise runs of the decoder (stage 1 distillation, spec section 7.2).

``residual_stream`` runs a decoder once and keeps every layer boundary: ``H[0]`` = the input
embeddings, ``H[l + 1]`` = layer l's output (the full residual stream after its MLP, before the
final norm). ``layers_on_inputs`` runs each layer l of another decoder alone on ``H[l]``. Both
scan the stacked blocks (``models.stacking.scan_stacked``), so any two layer patterns with the
same number of layers line up: layer l = block ``l // P``, position ``l % P`` of the pattern.
"""

from __future__ import annotations

import jax.numpy as jnp

from infinitevl_jax.models.decoder import Decoder
from infinitevl_jax.models.stacking import scan_stacked


def _check(decoder: Decoder, embeds, position_ids):
    cfg = decoder.cfg
    if embeds.ndim != 3 or embeds.shape[-1] != cfg.hidden_size:
        raise ValueError(f"embeds must be [B, T, {cfg.hidden_size}]; got {embeds.shape}")
    if position_ids.shape not in ((3, *embeds.shape[:2]), embeds.shape[:2]):
        raise ValueError(f"position_ids must be [3, B, T] or [B, T] for embeds {embeds.shape}; got "
                         f"{position_ids.shape}")


def residual_stream(decoder: Decoder, embeds, position_ids, segment_ids=None, vision_mask=None):
    """Every layer boundary of one forward: ``[L + 1, B, T, D]`` in the compute dtype.

    embeds ``[B, T, D]``; position_ids ``[3, B, T]`` (mRoPE) or ``[B, T]``; segment_ids ``[B, T]``;
    vision_mask bool ``[B, T]`` (M-MATE layers).
    """
    _check(decoder, embeds, position_ids)
    cos, sin = decoder.rope(position_ids)
    runs = decoder.runs(vision_mask, position_ids, segment_ids)
    x = embeds.astype(decoder.cfg.compute_dtype)

    def step(block, h, _):
        outs = []
        for layer in block.layers:
            h, _cache = layer(h, cos, sin, segment_ids=segment_ids, runs=runs)
            outs.append(h)
        return h, jnp.stack(outs)

    _, outs = scan_stacked(decoder.blocks, step, x, None, decoder.cfg.remat)  # [blocks, P, B, T, D]
    return jnp.concatenate([x[None], outs.reshape(-1, *x.shape)], axis=0)


def layers_on_inputs(decoder: Decoder, inputs, position_ids, segment_ids=None, vision_mask=None):
    """Layer l of ``decoder`` run alone on ``inputs[l]``: ``[L, B, T, D]`` from ``[L, B, T, D]``."""
    cfg = decoder.cfg
    if inputs.ndim != 4 or inputs.shape[0] != cfg.num_layers:
        raise ValueError(f"inputs must be [{cfg.num_layers} layers, B, T, D]; got {inputs.shape}")
    _check(decoder, inputs[0], position_ids)
    cos, sin = decoder.rope(position_ids)
    runs = decoder.runs(vision_mask, position_ids, segment_ids)
    period = len(cfg.block_pattern)
    per_block = inputs.astype(cfg.compute_dtype).reshape(cfg.num_blocks, period, *inputs.shape[1:])

    def step(block, carry, xs):
        outs = [layer(xs[i], cos, sin, segment_ids=segment_ids, runs=runs)[0] for i, layer in enumerate(block.layers)]
        return carry, jnp.stack(outs)

    _, outs = scan_stacked(decoder.blocks, step, jnp.zeros((), jnp.float32), per_block, cfg.remat)
    return outs.reshape(inputs.shape)
