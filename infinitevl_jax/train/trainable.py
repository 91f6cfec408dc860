"""Which parameters a stage trains: boolean masks over the ``nnx.Param`` state (spec section 7.3).

A stage names groups; a parameter is trainable when any group matches its path:

    gdn_mixers        the mixers of ``linear_attention`` layers (every GDN tensor: q/k/v/g/a/b/o
                      projections, q/k/v convs, A_log, dt_bias, o_norm)
    attention_mixers  the mixers of softmax layers (sliding or full): q/k/v/o with biases
    mlps              the decoder layers' SwiGLU MLPs
    flex_ma           M-MATE layers' Flex-MA branch and their branch mix (``mix_proj``)
    local_swin        M-MATE layers' Local-Swin branch (q/k/v/o with biases)
    lora              LoRA adapters (``train.lora``), and nothing else
    all               every parameter but LoRA adapters (pre-training from scratch, e.g. the
                      quickstart's teacher)

Everything the groups do not match (embeddings, norms, head, ViT, merger for the first four) is
frozen. The original's distillation trains exactly the GDN mixers; its SFT the GDN mixers plus
the SWA q/k/v/o.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from infinitevl_jax.models.config import MMATE_TYPES

STAGE_TRAINABLE = {
    "distill_layerwise": ("gdn_mixers",),
    "distill_e2e": ("gdn_mixers",),
    "sft": ("gdn_mixers", "attention_mixers"),
    "long_sft": ("lora",),
    "linmu_flex_ma": ("flex_ma",),
    "linmu_local_swin": ("flex_ma", "local_swin"),
    "linmu_lora": ("flex_ma", "local_swin", "lora"),
}
LORA_NAMES = ("lora_a", "lora_b")


def param_path(key_path) -> tuple:
    """A jax key path into an ``nnx.State`` as nnx's path tuple (``('language_model', ...)``)."""
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path
                 if not isinstance(k, jax.tree_util.GetAttrKey))


def _layer_kind(path: tuple, block_pattern: tuple) -> tuple[str | None, str | None]:
    """(layer kind, sub-module) of a decoder-layer parameter, else (None, None)."""
    if path[:3] == ("language_model", "blocks", "layers") and len(path) > 4:
        return block_pattern[path[3]], path[4]
    return None, None


def _matches(group: str, path: tuple, block_pattern: tuple) -> bool:
    kind, part = _layer_kind(path, block_pattern)
    if group == "gdn_mixers":
        return kind == "linear_attention" and part == "mixer" and path[-1] not in LORA_NAMES
    if group == "attention_mixers":
        return kind in ("sliding_attention", "full_attention") and part == "mixer" and path[-1] not in LORA_NAMES
    if group in ("flex_ma", "local_swin"):
        branch = ("flex_ma", "mix_proj") if group == "flex_ma" else ("local_swin",)
        return (kind in MMATE_TYPES and part == "mixer" and len(path) > 5 and path[5] in branch
                and path[-1] not in LORA_NAMES)
    if group == "mlps":
        return part == "mlp" and path[-1] not in LORA_NAMES
    if group == "lora":
        return path[-1] in LORA_NAMES
    if group == "all":
        return path[-1] not in LORA_NAMES
    raise ValueError(f"unknown trainable group {group!r}; groups: gdn_mixers, attention_mixers, flex_ma, "
                     "local_swin, mlps, lora, all")


def trainable_mask(params: nnx.State, block_pattern: Sequence[str], groups: Sequence[str]) -> nnx.State:
    """Bool per parameter (same tree as ``params``): True where a group of ``groups`` matches.

    ``block_pattern``: the decoder's ``cfg.decoder.block_pattern``. Raises when a group matches
    no parameter (e.g. ``lora`` before ``apply_lora``), since that stage would train nothing.
    """
    block_pattern = tuple(block_pattern)
    if not groups:
        raise ValueError("a stage needs at least one trainable group")
    for group in groups:
        hits = jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(
            lambda p, _, g=group: _matches(g, param_path(p), block_pattern), params))
        if not any(hits):
            raise ValueError(f"trainable group {group!r} matches no parameter of this model")
    return jax.tree_util.tree_map_with_path(
        lambda p, _: any(_matches(g, param_path(p), block_pattern) for g in groups), params)


def count_trainable(params: nnx.State, mask: nnx.State) -> tuple[int, int]:
    """(trainable, total) parameter counts of ``params`` under ``mask``."""
    sizes = [int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params)]
    flags = jax.tree_util.tree_leaves(mask)
    if len(sizes) != len(flags):
        raise ValueError(f"the trainable mask has {len(flags)} leaves for {len(sizes)} parameters")
    return sum(s for s, on in zip(sizes, flags) if on), sum(sizes)


def describe_trainable(params: nnx.State, mask: nnx.State) -> str:
    """A listing for the log: each trainable parameter with its shape and size, then the totals."""
    trainable, total = count_trainable(params, mask)
    lines = [f"  {'.'.join(map(str, param_path(path)))} {tuple(np.shape(value))} {int(np.prod(np.shape(value))):,}"
             for (path, value), on in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                          jax.tree_util.tree_leaves(mask)) if on]
    head = f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
    return "\n".join([head, *lines])
