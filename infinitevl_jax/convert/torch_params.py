"""Moving a whole ``VisionLanguageModel``'s parameters to and from PyTorch-named tensors.

Everything is checked before anything is read or written: every missing and every unexpected
key is named, every shape mismatch names the key and both shapes, and a present but tied
``lm_head.weight`` must equal the embedding (it is then redundant, as in transformers'
in-memory state dicts). Tensors may be in-memory arrays or memory-mapped views
(``safetensors_io``); with shardings, each device's shard is read on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.convert.name_map import (HEAD_KEY, Entry, check_keys, decoder_entries, detect_style,
                                             param_sources, to_torch, vision_entries)
from infinitevl_jax.models.config import VisionLanguageConfig


def _under(root: str, entries: list[Entry]) -> list[Entry]:
    return [dataclasses.replace(e, path=(root, *e.path)) for e in entries]


def model_entries(cfg: VisionLanguageConfig, style: str = "legacy") -> list[Entry]:
    """Entries of ``VisionLanguageModel`` (paths from the model root: ``language_model``, ``visual``)."""
    entries = _under("language_model", decoder_entries(cfg.decoder, style))
    if cfg.vision is not None:
        entries += _under("visual", vision_entries(cfg.vision, style))
    return entries


def checkpoint_entries(cfg: VisionLanguageConfig, tensors: Mapping[str, np.ndarray]) -> list[Entry]:
    """The entries for ``tensors`` (either key style) after checking the key set against ``cfg``."""
    entries = model_entries(cfg, detect_style(tensors.keys()))
    keys = set(tensors.keys())
    if cfg.decoder.tie_word_embeddings and HEAD_KEY in keys:
        embedding = next(e.key for e in entries if e.path == ("language_model", "embed_tokens"))
        if not np.array_equal(tensors[HEAD_KEY], tensors[embedding]):
            raise ValueError(f"{HEAD_KEY} differs from {embedding}, but the config has tie_word_embeddings=true")
        keys.discard(HEAD_KEY)
    check_keys(entries, keys)
    return entries


def load_params(cfg: VisionLanguageConfig, tensors: Mapping[str, np.ndarray], params: nnx.State,
                shardings: nnx.State | None = None) -> nnx.State:
    """``params`` (an abstract or concrete ``nnx.State`` of ``nnx.Param``) filled from ``tensors``.

    Values are cast to each parameter's dtype. With ``shardings`` (a matching state of
    ``jax.sharding.Sharding``), every array is built shard by shard with
    ``jax.make_array_from_callback``, so no host holds a whole parameter it does not need.
    """
    entries = checkpoint_entries(cfg, tensors)
    variables = dict(nnx.to_flat_state(params))
    unmapped = sorted(".".join(map(str, p)) for p in set(variables) - {e.path for e in entries})
    if unmapped:
        raise NotImplementedError(f"parameters without a PyTorch name (the name map is incomplete): {unmapped}")
    sources = param_sources(entries, tensors, {path: tuple(v.shape) for path, v in variables.items()})
    flat_shardings = None if shardings is None else dict(nnx.to_flat_state(shardings))
    for path, variable in variables.items():
        source, dtype = sources[path], variable.get_value().dtype
        if flat_shardings is None:
            value = jnp.asarray(source.read().astype(dtype))
        else:
            sharding = flat_shardings[path]
            sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
            value = jax.make_array_from_callback(source.shape, sharding,
                                                 lambda index, s=source: s.read(index).astype(dtype))
        variable.set_value(value)
    return nnx.from_flat_state(list(variables.items()))


def load_torch_tensors(model, tensors: Mapping[str, np.ndarray]) -> None:
    """Assigns PyTorch-named tensors (either key style) to ``model``'s parameters, in place."""
    nnx.update(model, load_params(model.cfg, tensors, nnx.state(model, nnx.Param)))


def torch_tensors(model, style: str = "legacy") -> dict[str, np.ndarray]:
    """``{PyTorch key: array}`` of every parameter (no tied head), in the parameters' dtype."""
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    return to_torch(model_entries(model.cfg, style),
                    {path: np.asarray(jax.device_get(v.get_value())) for path, v in variables.items()})
