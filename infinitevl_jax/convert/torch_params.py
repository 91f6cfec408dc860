"""Moving a whole ``VisionLanguageModel``'s parameters to and from PyTorch-named tensors.

``load_torch_tensors`` checks everything before it writes anything: every missing and every
unexpected key is named, every shape mismatch names the key and both shapes, and a present but
tied ``lm_head.weight`` must equal the embedding (it is then redundant, as in transformers'
in-memory state dicts).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.convert.name_map import (HEAD_KEY, Entry, check_keys, decoder_entries, detect_style,
                                             from_torch, to_torch, vision_entries)
from infinitevl_jax.models.config import VisionLanguageConfig


def _under(root: str, entries: list[Entry]) -> list[Entry]:
    return [dataclasses.replace(e, path=(root, *e.path)) for e in entries]


def model_entries(cfg: VisionLanguageConfig, style: str = "legacy") -> list[Entry]:
    """Entries of ``VisionLanguageModel`` (paths from the model root: ``language_model``, ``visual``)."""
    entries = _under("language_model", decoder_entries(cfg.decoder, style))
    if cfg.vision is not None:
        entries += _under("visual", vision_entries(cfg.vision, style))
    return entries


def _param_state(model):
    state = nnx.state(model, nnx.Param)
    return state, dict(nnx.to_flat_state(state))


def load_torch_tensors(model, tensors: Mapping[str, np.ndarray]) -> None:
    """Assigns PyTorch-named tensors (either key style) to ``model``'s parameters, cast to their dtype."""
    cfg: VisionLanguageConfig = model.cfg
    entries = model_entries(cfg, detect_style(tensors.keys()))
    keys = set(tensors.keys())
    if cfg.decoder.tie_word_embeddings and HEAD_KEY in keys:
        embedding = next(e.key for e in entries if e.path == ("language_model", "embed_tokens"))
        if not np.array_equal(np.asarray(tensors[HEAD_KEY]), np.asarray(tensors[embedding])):
            raise ValueError(f"{HEAD_KEY} differs from {embedding}, but the config has tie_word_embeddings=true")
        keys.discard(HEAD_KEY)
    check_keys(entries, keys)
    state, variables = _param_state(model)
    unmapped = sorted(".".join(map(str, p)) for p in set(variables) - {e.path for e in entries})
    if unmapped:
        raise NotImplementedError(f"parameters without a PyTorch name (the name map is incomplete): {unmapped}")
    flat = from_torch(entries, tensors, {path: tuple(v.shape) for path, v in variables.items()})
    for path, value in flat.items():
        variables[path].set_value(jnp.asarray(value, variables[path].get_value().dtype))
    nnx.update(model, state)


def torch_tensors(model, style: str = "legacy") -> dict[str, np.ndarray]:
    """``{PyTorch key: array}`` of every parameter (no tied head), in the parameters' dtype."""
    _, variables = _param_state(model)
    return to_torch(model_entries(model.cfg, style),
                    {path: np.asarray(v.get_value()) for path, v in variables.items()})
