"""Hugging Face ``config.json`` (Qwen2.5-VL or InfiniteVL) -> ``VisionLanguageConfig``.

Accepted layouts:
- transformers v5 Qwen2.5-VL: nested ``text_config`` / ``vision_config`` with ``rope_parameters``;
- hub Qwen2.5-VL (legacy, flat): text fields at the top level, ``rope_scaling`` with
  ``mrope_section``, ``vision_config`` nested (``in_chans``);
- InfiniteVL (flat, ``model_type: infinite_vl``, spec section 1.1): the GDN fields at the top
  level; without ``layer_types`` every 4th layer (0, 4, ...) is sliding attention, the rest GDN.

The layer pattern comes from the config: Qwen2.5-VL is all full attention (a sliding-window
Qwen2.5-VL, ``use_sliding_window: true``, is rejected: its per-layer window rule is not ported).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from infinitevl_jax.models.config import (MMATE_TYPES, DecoderConfig, GatedDeltaNetConfig, MultimodalTokens,
                                          VisionConfig, VisionLanguageConfig, hybrid_layer_types)

_FAMILIES = ("qwen2_5_vl", "infinite_vl")


def _text_fields(d: Mapping[str, Any]) -> dict:
    """Text settings: the nested ``text_config`` over the top level (flat files have none)."""
    return {**{k: v for k, v in d.items() if k != "vision_config"}, **(d.get("text_config") or {})}


def _rope(text: Mapping[str, Any]) -> tuple[float, tuple[int, ...] | None]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1e6))
    section = rope.get("mrope_section")
    return float(theta), None if section is None else tuple(int(s) for s in section)


def _layer_types(family: str, text: Mapping[str, Any]) -> tuple[str, ...]:
    n = int(text["num_hidden_layers"])
    if family == "infinite_vl":
        return tuple(text.get("layer_types") or hybrid_layer_types(n))
    if text.get("use_sliding_window"):
        raise NotImplementedError("Qwen2.5-VL with use_sliding_window=true (window on layers >= "
                                  "max_window_layers) is not supported; the released checkpoints use false")
    return ("full_attention",) * n


def decoder_config_from_hf(d: Mapping[str, Any], *, dtype: str = "bfloat16",
                           param_dtype: str = "float32") -> DecoderConfig:
    family = d.get("model_type")
    if family not in _FAMILIES:
        raise ValueError(f"config.json model_type {family!r} is not one of {_FAMILIES}")
    text = _text_fields(d)
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {text['hidden_act']!r} is not supported (Qwen2.5-VL uses silu)")
    theta, section = _rope(text)
    heads = int(text["num_attention_heads"])
    layer_types = _layer_types(family, text)
    gdn = GatedDeltaNetConfig(
        num_heads=int(text.get("num_linear_heads", 16)),
        head_k_dim=int(text.get("linear_head_dim", 128)),
        head_v_dim=int(text.get("linear_head_dim", 128)) * int(text.get("expand_v", 2)),
        conv_size=int(text.get("conv_size", 4)),
        norm_eps=float(text.get("norm_eps", 1e-5)))
    if family == "infinite_vl" and int(text.get("num_linear_key_value_heads", gdn.num_heads)) != gdn.num_heads:
        raise NotImplementedError("GDN with num_linear_key_value_heads != num_linear_heads is not supported")
    return DecoderConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        layer_types=layer_types,
        num_attention_heads=heads,
        num_key_value_heads=int(text.get("num_key_value_heads", heads)),
        head_dim=int(text["hidden_size"]) // heads,
        rope_theta=theta,
        mrope_section=section,
        sliding_window=int(text["sliding_window"]) if "sliding_attention" in layer_types else None,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        gdn=gdn,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def vision_config_from_hf(v: Mapping[str, Any], *, dtype: str = "bfloat16",
                          param_dtype: str = "float32") -> VisionConfig:
    if v.get("hidden_act", "silu") != "silu":
        raise ValueError(f"vision hidden_act {v['hidden_act']!r} is not supported (Qwen2.5-VL uses silu)")
    rope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=int(v["depth"]),
        hidden_size=int(v["hidden_size"]),
        num_heads=int(v["num_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        out_hidden_size=int(v["out_hidden_size"]),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        patch_size=int(v.get("patch_size", 14)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", ())),
        tokens_per_second=float(v.get("tokens_per_second", 2)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        dtype=dtype,
        param_dtype=param_dtype,
    )


def config_from_hf(d: Mapping[str, Any], *, dtype: str = "bfloat16",
                   param_dtype: str = "float32") -> VisionLanguageConfig:
    """The whole model config from a parsed ``config.json``."""
    text = _text_fields(d)
    defaults = MultimodalTokens()
    tokens = MultimodalTokens(**{f: int(d.get(f, text.get(f, getattr(defaults, f))))
                                 for f in MultimodalTokens.__dataclass_fields__})
    vision = d.get("vision_config")
    return VisionLanguageConfig(
        decoder=decoder_config_from_hf(d, dtype=dtype, param_dtype=param_dtype),
        vision=None if vision is None else vision_config_from_hf(vision, dtype=dtype, param_dtype=param_dtype),
        tokens=tokens)


INFINITEVL_ARCHITECTURE = "InfiniteVLQwen2_5_VLForConditionalGeneration"
INFINITEVL_AUTO_MAP = {
    "AutoConfig": "configuration_infinitevl.InfiniteVLConfig",
    "AutoModel": f"modeling_infinitevl.{INFINITEVL_ARCHITECTURE}",
    "AutoModelForCausalLM": f"modeling_infinitevl.{INFINITEVL_ARCHITECTURE}",
}


def _vision_to_hf(v: VisionConfig) -> dict:
    return dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads, intermediate_size=v.intermediate_size,
                hidden_act="silu", in_channels=v.in_channels, patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                out_hidden_size=v.out_hidden_size,
                tokens_per_second=int(v.tokens_per_second) if float(v.tokens_per_second).is_integer()
                else v.tokens_per_second)


# Fields of a source config.json we do not model but keep on export (text_config first, then top level).
PASSTHROUGH_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings", "attention_dropout",
                      "initializer_range", "use_cache")


def config_to_hf(cfg: VisionLanguageConfig, base: Mapping[str, Any] | None = None) -> dict:
    """A flat (legacy-layout) ``config.json`` dict for ``cfg``; ``config_from_hf`` inverts it.

    A model with GDN or sliding-attention layers becomes an InfiniteVL config (``model_type:
    infinite_vl``, ``auto_map`` to the official remote code, explicit ``layer_types``); an
    all-full-attention model becomes a plain Qwen2.5-VL config that transformers loads natively.
    ``base`` (the config.json the weights came from, either layout) supplies the
    ``PASSTHROUGH_FIELDS``; every architecture field is ours.
    """
    dec = cfg.decoder
    if set(dec.layer_types) & set(MMATE_TYPES):
        raise NotImplementedError("LinMU (M-MATE) models have no published PyTorch checkpoint layout to export to; "
                                  "keep their run directories (load_pretrained, `infinitevl eval --model DIR`)")
    full_only = set(dec.layer_types) == {"full_attention"}
    source = _text_fields(base or {})
    out = {k: source[k] for k in PASSTHROUGH_FIELDS if k in source}
    rope = {"type": "mrope" if full_only else "default", "mrope_section": list(dec.mrope_section or ())}
    if not full_only:
        rope["rope_type"] = "default"
    out.update(
        vocab_size=dec.vocab_size, hidden_size=dec.hidden_size, intermediate_size=dec.intermediate_size,
        num_hidden_layers=dec.num_layers, num_attention_heads=dec.num_attention_heads,
        num_key_value_heads=dec.num_key_value_heads, hidden_act="silu", rms_norm_eps=dec.rms_norm_eps,
        rope_theta=dec.rope_theta, rope_scaling=rope, tie_word_embeddings=dec.tie_word_embeddings,
        torch_dtype="bfloat16", **dataclasses.asdict(cfg.tokens))
    if dec.mrope_section is None:
        out.pop("rope_scaling")
    if full_only:
        out.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"],
                   use_sliding_window=False, sliding_window=32768, max_window_layers=dec.num_layers)
    else:
        g = dec.gdn
        if g.head_v_dim % g.head_k_dim:
            raise ValueError(f"InfiniteVL's config expresses head_v_dim as linear_head_dim * expand_v; "
                             f"{g.head_v_dim} is not a multiple of {g.head_k_dim}")
        if "full_attention" in dec.layer_types:
            raise NotImplementedError("an InfiniteVL config cannot mix full_attention with other layer types")
        out.update(model_type="infinite_vl", architectures=[INFINITEVL_ARCHITECTURE], auto_map=INFINITEVL_AUTO_MAP,
                   layer_types=list(dec.layer_types), use_sliding_window=True,
                   sliding_window=dec.sliding_window if dec.sliding_window is not None else 8192,
                   num_linear_heads=g.num_heads, num_linear_key_value_heads=g.num_heads,
                   linear_head_dim=g.head_k_dim, expand_v=g.head_v_dim // g.head_k_dim, conv_size=g.conv_size,
                   norm_eps=g.norm_eps, use_gate=True, use_short_conv=True, mode="chunk")
    if cfg.vision is not None:
        out["vision_config"] = _vision_to_hf(cfg.vision)
    return out
