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

LAYER_TYPES = ("sliding_attention", "full_attention", "linear_attention", "mmate", "mmate_shifted")
MMATE_TYPES = ("mmate", "mmate_shifted")
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def smallest_period(pattern: tuple) -> tuple:
    """Shortest prefix p of ``pattern`` (len(p) divides len(pattern)) that repeats to form it."""
    n = len(pattern)
    for p in range(1, n + 1):
        if n % p == 0 and all(pattern[i] == pattern[i % p] for i in range(n)):
            return tuple(pattern[:p])
    raise ValueError("pattern is empty")


def _from_mapping(cls, d: Mapping[str, Any], what: str) -> dict:
    """``dict(d)`` after checking every key is a field of dataclass ``cls`` (unknown keys are errors)."""
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known: {sorted(fields)}")
    return d


class _PrecisionFields:
    """Shared by the configs with ``dtype`` (compute), ``param_dtype`` and ``remat`` fields."""

    def _check_precision_fields(self, what: str) -> None:
        for name, table in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in table:
                raise ValueError(f"{what}{name}={getattr(self, name)!r}; choose one of {list(table)}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]


@dataclasses.dataclass(frozen=True)
class GatedDeltaNetConfig:
    """Gated DeltaNet mixer dims (spec section 2.1)."""

    num_heads: int = 16
    head_k_dim: int = 128
    head_v_dim: int = 256
    conv_size: int = 4
    norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class MMateConfig:
    """LinMU's M-MATE mixer (``models/mmate.py``, every choice argued in ``docs/linmu.md``).

    The SSM's heads, head size and state size are the attention's (``num_attention_heads``,
    ``head_dim``, d_state = ``head_dim``): the Mamba-in-the-Llama init maps W_q/W_k/W_v into C/B/x.

    conv_size: Flex-MA's causal depthwise conv over x, B and C (Mamba2's 4).
    window: Local-Swin's (frames, rows, cols) window over a vision run's merged-token grid.
    text_window: keys (itself included) a text token attends to in Local-Swin, causally.
    """

    conv_size: int = 4
    window: tuple[int, int, int] = (2, 4, 4)
    text_window: int = 128

    def __post_init__(self):
        if self.conv_size < 1:
            raise ValueError(f"mmate conv_size must be >= 1; got {self.conv_size}")
        if len(self.window) != 3 or min(self.window) < 1:
            raise ValueError(f"mmate window must be three sizes >= 1 (frames, rows, cols); got {self.window}")
        if self.text_window < 1:
            raise ValueError(f"mmate text_window must be >= 1; got {self.text_window}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MMateConfig":
        d = _from_mapping(cls, d, "mmate")
        if "window" in d:
            d["window"] = tuple(d["window"])
        return cls(**d)

    @property
    def window_tokens(self) -> int:
        """Most tokens one Local-Swin window holds."""
        return self.window[0] * self.window[1] * self.window[2]


@dataclasses.dataclass(frozen=True)
class DecoderConfig(_PrecisionFields):
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
    mmate: MMateConfig = MMateConfig()
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
        self._check_precision_fields("")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def block_pattern(self) -> tuple[str, ...]:
        """The smallest repeating period of ``layer_types``."""
        return smallest_period(self.layer_types)

    @property
    def num_blocks(self) -> int:
        return self.num_layers // len(self.block_pattern)

    def window_of(self, layer_type: str) -> int | None:
        """Keys per query (including itself) for an attention layer type."""
        return self.sliding_window if layer_type == "sliding_attention" else None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DecoderConfig":
        """Builds from a (ConfigDict-like) mapping; unknown keys are an error, not ignored."""
        d = _from_mapping(cls, d, "decoder")
        gdn = _from_mapping(GatedDeltaNetConfig, d.pop("gdn", {}) or {}, "gdn")
        d["layer_types"] = tuple(d["layer_types"])
        if d.get("mrope_section") is not None:
            d["mrope_section"] = tuple(d["mrope_section"])
        mmate = MMateConfig.from_dict(d.pop("mmate", {}) or {})
        return cls(gdn=GatedDeltaNetConfig(**gdn), mmate=mmate, **d)


def mmate_layer_types(num_layers: int) -> tuple[str, ...]:
    """LinMU's pattern: every layer M-MATE, odd layers with shifted windows and column-major scans."""
    return tuple("mmate_shifted" if i % 2 else "mmate" for i in range(num_layers))


def hybrid_layer_types(num_layers: int, period: int = 4) -> tuple[str, ...]:
    """InfiniteVL's pattern: sliding attention at i % period == 0, Gated DeltaNet elsewhere."""
    return tuple("sliding_attention" if i % period == 0 else "linear_attention" for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class VisionConfig(_PrecisionFields):
    """Qwen2.5-VL vision tower (spec section 1.2 and 5): ViT over 14x14x2 patches, 2x2 merger.

    ``window_size`` is in pixels (112 = 4x4 merged tokens per attention window);
    ``fullatt_block_indexes`` are the blocks attending over a whole temporal slice instead.
    """

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"vision head_dim ({self.hidden_size // self.num_heads}) must be a multiple of 4 "
                             "(2-D rotary over rows and columns)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} outside 0..{self.depth - 1}")
        merged_patch = self.spatial_merge_size * self.patch_size
        if self.window_size % merged_patch:
            raise ValueError(f"window_size ({self.window_size}) must be a multiple of "
                             f"spatial_merge_size * patch_size = {merged_patch}")
        self._check_precision_fields("vision ")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4)."""
        return self.spatial_merge_size ** 2

    @property
    def window_merged(self) -> int:
        """Merged tokens per window side (4)."""
        return self.window_size // (self.spatial_merge_size * self.patch_size)

    @property
    def full_attention_pattern(self) -> tuple[bool, ...]:
        """Per block: True where it attends over the whole temporal slice."""
        return tuple(i in self.fullatt_block_indexes for i in range(self.depth))

    @property
    def block_pattern(self) -> tuple[bool, ...]:
        """The smallest repeating period of ``full_attention_pattern`` (4B: 7 windowed + 1 full)."""
        return smallest_period(self.full_attention_pattern)

    @property
    def num_blocks(self) -> int:
        return self.depth // len(self.block_pattern)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VisionConfig":
        d = _from_mapping(cls, d, "vision")
        d["fullatt_block_indexes"] = tuple(d.get("fullatt_block_indexes", cls.fullatt_block_indexes))
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class MultimodalTokens:
    """Special token ids of the Qwen2.5-VL vocabulary (spec section 1.1); the tiny byte
    tokenizer's presets override them. Each image/video becomes ``<|vision_start|>``, its
    ``<|image_pad|>``/``<|video_pad|>`` run (one per merged token), ``<|vision_end|>``."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653


@dataclasses.dataclass(frozen=True)
class VisionLanguageConfig:
    """The whole model: text decoder, optional vision tower, multimodal token ids."""

    decoder: DecoderConfig
    vision: VisionConfig | None = None
    tokens: MultimodalTokens = MultimodalTokens()

    def __post_init__(self):
        if self.vision is not None and self.vision.out_hidden_size != self.decoder.hidden_size:
            raise ValueError(f"vision out_hidden_size ({self.vision.out_hidden_size}) must equal the decoder's "
                             f"hidden_size ({self.decoder.hidden_size})")
        ids = dataclasses.astuple(self.tokens)
        if max(ids) >= self.decoder.vocab_size:
            raise ValueError(f"multimodal token ids {self.tokens} must be < vocab_size ({self.decoder.vocab_size})")

    def to_config(self) -> dict:
        """The ``model`` / ``vision`` / ``tokens`` sections that ``from_config`` reads (JSON-ready)."""
        return {"model": dataclasses.asdict(self.decoder),
                "vision": None if self.vision is None else dataclasses.asdict(self.vision),
                "tokens": dataclasses.asdict(self.tokens)}

    def with_dtypes(self, dtype: str | None = None, param_dtype: str | None = None) -> "VisionLanguageConfig":
        """The same model with another compute and/or parameter dtype (None keeps the current one)."""
        change = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
        return dataclasses.replace(
            self, decoder=dataclasses.replace(self.decoder, **change),
            vision=None if self.vision is None else dataclasses.replace(self.vision, **change))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "VisionLanguageConfig":
        """From a loaded preset: ``model`` (decoder), optional ``vision`` and ``tokens`` sections."""
        vision = config.get("vision")
        return cls(decoder=DecoderConfig.from_dict(config["model"]),
                   vision=None if vision is None else VisionConfig.from_dict(vision),
                   tokens=MultimodalTokens(**_from_mapping(MultimodalTokens, config.get("tokens") or {}, "tokens")))
