"""Frozen dataclasses the model modules take, built from ml_collections presets in ``configs/``.

A preset fully determines parameter shapes. The decoder's layer pattern is ``layer_types``
(one entry per layer); it is run as ``num_layers / period`` scanned blocks of the smallest
repeating period (InfiniteVL-4B: 9 blocks of [SWA, GDN, GDN, GDN]; the teacher: 36 blocks of
[full attention]).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

LAYER_TYPES = ("sliding_attention", "full_attention", "linear_attention")
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Gated DeltaNet mixer dims (spec section 2.1)."""

    num_heads: int = 16
    head_k_dim: int = 128
    head_v_dim: int = 256
    conv_size: int = 4
    norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Text decoder: embeddings, a pattern of SWA / full-attention / GDN layers, tied head."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] | None = (16, 24, 24)
    sliding_window: int | None = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    gdn: GatedDeltaNetConfig = GatedDeltaNetConfig()
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    delta_rule_impl: str = "auto"
    attention_impl: str = "auto"
    remat: str = "none"

    def __post_init__(self):
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"unknown layer_types {bad}; allowed: {LAYER_TYPES}")
        if not self.layer_types:
            raise ValueError("layer_types is empty: the decoder needs at least one layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings; got {self.head_dim}")
        if self.mrope_section is not None and 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"sliding_attention layers need sliding_window >= 1; got {self.sliding_window}")
        for name, table in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in table:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {list(table)}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def block_pattern(self) -> tuple[str, ...]:
        """Smallest period p (dividing num_layers) with layer_types[i] == layer_types[i % p]."""
        n = self.num_layers
        for p in range(1, n + 1):
            if n % p == 0 and all(self.layer_types[i] == self.layer_types[i % p] for i in range(n)):
                return self.layer_types[:p]
        raise AssertionError("unreachable: p = n always matches")

    @property
    def num_blocks(self) -> int:
        return self.num_layers // len(self.block_pattern)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def window_of(self, layer_type: str) -> int | None:
        """Keys per query (including itself) for an attention layer type."""
        return self.sliding_window if layer_type == "sliding_attention" else None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderConfig":
        """Builds from a (ConfigDict-like) mapping; unknown keys are an error, not ignored."""
        d = dict(d)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown decoder config keys {unknown}; known: {sorted(fields)}")
        gdn = dict(d.pop("gdn", {}) or {})
        gdn_fields = {f.name for f in dataclasses.fields(GatedDeltaNetConfig)}
        if set(gdn) - gdn_fields:
            raise ValueError(f"unknown gdn config keys {sorted(set(gdn) - gdn_fields)}; known: {sorted(gdn_fields)}")
        d["layer_types"] = tuple(d["layer_types"])
        if d.get("mrope_section") is not None:
            d["mrope_section"] = tuple(d["mrope_section"])
        return cls(gdn=GatedDeltaNetConfig(**gdn), **d)


def hybrid_layer_types(num_layers: int, period: int = 4) -> tuple[str, ...]:
    """InfiniteVL's pattern: sliding attention at i % period == 0, Gated DeltaNet elsewhere."""
    return tuple("sliding_attention" if i % period == 0 else "linear_attention" for i in range(num_layers))
