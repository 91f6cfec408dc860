"""Flax NNX modules. ``Decoder`` is the hybrid (or all-attention teacher) text decoder."""

from infinitevl_jax.models.config import DecoderConfig, GatedDeltaNetConfig, hybrid_layer_types
from infinitevl_jax.models.decoder import Decoder, DecoderCache

__all__ = ["Decoder", "DecoderCache", "DecoderConfig", "GatedDeltaNetConfig", "hybrid_layer_types"]
