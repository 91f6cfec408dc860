"""Building a student from a full-attention Qwen2.5-VL teacher: InfiniteVL (spec section 7.1) or
LinMU (``docs/linmu.md``).

The student keeps the teacher's embeddings, norms, MLPs, head, vision tower and merger, and the
attention of the layers that stay softmax attention (now run with a sliding window). Every
other layer's attention is replaced by a Gated DeltaNet mixer with the original's "mimic init":

    q/k/v/g/o projections  PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    a_proj, b_proj         0           => beta = sigmoid(0) = 0.5
    A_log                  0           => A = 1
    dt_bias                softplus^-1(0.001) = log(expm1(0.001)) => g = -0.001 per token
    q/k/v conv taps        0, except the current-token tap = 1 (the conv starts as identity)
    o_norm weight          1

No teacher weight is copied into a GDN mixer (the original does not either).

A LinMU student replaces every attention by an M-MATE mixer (``models/mmate.py``) initialised
from that layer's attention (Mamba-in-the-Llama's mapping for Flex-MA):

    flex_ma.x_proj <- v_proj, B_proj <- k_proj, C_proj <- q_proj (weights and biases),
    flex_ma.out_proj <- o_proj;  local_swin.{q,k,v,o}_proj <- {q,k,v,o}_proj
    z_proj                 PyTorch's default Linear init
    dt_proj, dir_proj      0   => dt = softplus(dt_bias) = 0.001, both direction gates 0.5
    A_log                  0   => A = -1 (both directions);  D = 1
    x/B/C convs            identity (current-token tap 1);  o_norm weight 1
    mix_proj               0   => the branches start mixed half and half

The copy goes through the PyTorch-named tensors of the name map, so the teacher's and student's
different block stackings never need special cases.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax.sharding import Mesh

from infinitevl_jax.convert.name_map import KEY_STYLES
from infinitevl_jax.convert.pretrained import assemble_model
from infinitevl_jax.convert.torch_params import load_params, torch_tensors
from infinitevl_jax.models.config import (MMATE_TYPES, GatedDeltaNetConfig, MMateConfig, VisionLanguageConfig,
                                         hybrid_layer_types, mmate_layer_types)
from infinitevl_jax.train.sharding import param_shardings

DT_INIT = 0.001


ARCHITECTURES = ("infinitevl", "linmu")


def student_config(teacher: VisionLanguageConfig, *, arch: str = "infinitevl", period: int = 4,
                   sliding_window: int = 8192, gdn: GatedDeltaNetConfig | None = None,
                   mmate: MMateConfig | None = None) -> VisionLanguageConfig:
    """A student's layout over a teacher.

    ``infinitevl``: sliding attention at layers i % period == 0, GDN elsewhere; ``gdn`` defaults
    to the teacher's query heads and head dim with values twice as wide (InfiniteVL-4B over
    Qwen2.5-VL-3B: 16 heads, d_k 128, d_v 256). ``linmu``: every layer M-MATE (``mmate``,
    default ``MMateConfig()``), shifted on odd layers; ``period``/``sliding_window`` unused.
    """
    dec = teacher.decoder
    if set(dec.layer_types) != {"full_attention"}:
        raise ValueError(f"the teacher must be all full attention; got layer_types {sorted(set(dec.layer_types))}")
    if arch == "linmu":
        decoder = dataclasses.replace(dec, layer_types=mmate_layer_types(dec.num_layers), mmate=mmate or MMateConfig())
        return dataclasses.replace(teacher, decoder=decoder)
    if arch != "infinitevl":
        raise ValueError(f"unknown student architecture {arch!r}; choose one of {ARCHITECTURES}")
    gdn = gdn or dataclasses.replace(dec.gdn, num_heads=dec.num_attention_heads, head_k_dim=dec.head_dim,
                                     head_v_dim=2 * dec.head_dim)
    decoder = dataclasses.replace(dec, layer_types=hybrid_layer_types(dec.num_layers, period),
                                  sliding_window=sliding_window, gdn=gdn)
    return dataclasses.replace(teacher, decoder=decoder)


def _linear_init(rng: np.random.Generator, out_features: int, in_features: int) -> np.ndarray:
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32)


def mimic_init_tensors(cfg: VisionLanguageConfig, layer: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The mimic-init GDN tensors of decoder layer ``layer``, PyTorch-named and PyTorch-laid-out."""
    dec, g = cfg.decoder, cfg.decoder.gdn
    d, key_dim, value_dim = dec.hidden_size, g.num_heads * g.head_k_dim, g.num_heads * g.head_v_dim

    def conv(channels):
        taps = np.zeros((channels, 1, g.conv_size), np.float32)
        taps[:, 0, -1] = 1.0
        return taps

    p = f"{KEY_STYLES['legacy']['decoder']}layers.{layer}.self_attn."
    return {
        p + "q_proj.weight": _linear_init(rng, key_dim, d), p + "k_proj.weight": _linear_init(rng, key_dim, d),
        p + "v_proj.weight": _linear_init(rng, value_dim, d), p + "g_proj.weight": _linear_init(rng, value_dim, d),
        p + "o_proj.weight": _linear_init(rng, d, value_dim),
        p + "a_proj.weight": np.zeros((g.num_heads, d), np.float32),
        p + "b_proj.weight": np.zeros((g.num_heads, d), np.float32),
        p + "A_log": np.zeros((g.num_heads,), np.float32),
        p + "dt_bias": np.full((g.num_heads,), np.log(np.expm1(DT_INIT)), np.float32),
        p + "q_conv1d.weight": conv(key_dim), p + "k_conv1d.weight": conv(key_dim),
        p + "v_conv1d.weight": conv(value_dim), p + "o_norm.weight": np.ones((g.head_v_dim,), np.float32),
    }


def mmate_init_tensors(cfg: VisionLanguageConfig, layer: int, attention: dict[str, np.ndarray],
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The M-MATE tensors of decoder layer ``layer`` (module docstring) from that layer's teacher
    attention tensors ``attention`` (``q_proj.weight`` ... ``o_proj.weight``, PyTorch-named)."""
    dec = cfg.decoder
    d, heads, q_dim = dec.hidden_size, dec.num_attention_heads, dec.num_attention_heads * dec.head_dim
    kv_dim = dec.num_key_value_heads * dec.head_dim

    def conv(channels):
        taps = np.zeros((channels, 1, dec.mmate.conv_size), np.float32)
        taps[:, 0, -1] = 1.0
        return taps

    flex = {f"{new}.{kind}": attention[f"{old}.{kind}"] for new, old in
            (("x_proj", "v_proj"), ("B_proj", "k_proj"), ("C_proj", "q_proj")) for kind in ("weight", "bias")}
    flex.update({
        "out_proj.weight": attention["o_proj.weight"], "z_proj.weight": _linear_init(rng, q_dim, d),
        "dt_proj.weight": np.zeros((2 * heads, d), np.float32), "dir_proj.weight": np.zeros((2 * heads, d), np.float32),
        "x_conv1d.weight": conv(kv_dim), "B_conv1d.weight": conv(kv_dim), "C_conv1d.weight": conv(q_dim),
        "A_log": np.zeros((2 * heads,), np.float32),
        "dt_bias": np.full((2 * heads,), np.log(np.expm1(DT_INIT)), np.float32),
        "D": np.ones((heads,), np.float32), "o_norm.weight": np.ones((dec.head_dim,), np.float32)})
    p = f"{KEY_STYLES['legacy']['decoder']}layers.{layer}.self_attn."
    out = {f"{p}flex_ma.{k}": np.asarray(v) for k, v in flex.items()}
    out.update({f"{p}local_swin.{k}": np.asarray(v) for k, v in attention.items()})
    out.update({f"{p}mix_proj.weight": np.zeros((1, d), np.float32), f"{p}mix_proj.bias": np.zeros((1,), np.float32)})
    return out


def student_from_teacher(teacher, cfg: VisionLanguageConfig | None = None, *, seed: int = 0,
                         mesh: Mesh | None = None):
    """A student ``VisionLanguageModel`` (config ``cfg``, default ``student_config(teacher.cfg)``:
    InfiniteVL's; a LinMU config gives M-MATE layers) built from a teacher ``VisionLanguageModel``;
    new tensors drawn from ``seed``; with ``mesh``,
    parameters are placed in their shardings."""
    cfg = cfg or student_config(teacher.cfg)
    if cfg.decoder.num_layers != teacher.cfg.decoder.num_layers:
        raise ValueError(f"student has {cfg.decoder.num_layers} layers, teacher {teacher.cfg.decoder.num_layers}")
    tensors = torch_tensors(teacher, "legacy")
    rng = np.random.default_rng(seed)
    for layer, kind in enumerate(cfg.decoder.layer_types):
        if kind == "linear_attention" or kind in MMATE_TYPES:
            prefix = f"{KEY_STYLES['legacy']['decoder']}layers.{layer}.self_attn."
            attention = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
            tensors.update(mimic_init_tensors(cfg, layer, rng) if kind == "linear_attention"
                           else mmate_init_tensors(cfg, layer, attention, rng))
    return assemble_model(cfg, lambda params: load_params(
        cfg, tensors, params, None if mesh is None else param_shardings(params, mesh)))
