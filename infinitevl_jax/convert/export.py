"""``export_pytorch``: our weights -> a PyTorch checkpoint folder in the official InfiniteVL layout.

Output (spec sections 6.1-6.3): legacy key names (``model.*``, ``visual.*``; every transformers
version loads them), PyTorch layouts, bfloat16 by default, the tied head omitted, safetensors
with ``metadata={"format": "pt"}`` (sharded with ``model.safetensors.index.json`` above
``max_shard_bytes``), a flat ``config.json`` (InfiniteVL with ``auto_map``, or plain Qwen2.5-VL
for an all-full-attention teacher), and the tokenizer / processor files of ``source_dir``.

Everything is written into a temporary sibling folder that is renamed to ``out_dir`` only when
complete, so a failure or interruption never leaves a half-written checkpoint behind. In a
multi-process run every process must call this (the arrays are gathered collectively); only
process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from infinitevl_jax.convert.atomic import atomic_directory
from infinitevl_jax.convert.hf_checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, copy_sidecar_files, read_json
from infinitevl_jax.convert.hf_config import config_to_hf
from infinitevl_jax.convert.name_map import Entry
from infinitevl_jax.convert.safetensors_io import write_safetensors
from infinitevl_jax.convert.torch_params import model_entries
from infinitevl_jax.models.config import DTYPES, VisionLanguageConfig
from infinitevl_jax.train.checkpoint import SOURCE_CONFIG

DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9  # transformers' save_pretrained default ("5GB")


class ExportedTensor(NamedTuple):
    key: str
    shape: tuple[int, ...]
    nbytes: int
    entry: Entry


def export_plan(cfg: VisionLanguageConfig, param_shapes: dict[tuple, tuple], dtype: str = "bfloat16"
                ) -> list[ExportedTensor]:
    """Every tensor the export writes, with its PyTorch shape, computed from shapes alone.

    ``param_shapes``: ``{our parameter path: shape}`` (stacked ones with the block axis), from a
    concrete or an abstract (``nnx.eval_shape``) model; nothing is allocated.
    """
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    plan = []
    for e in model_entries(cfg, "legacy"):
        ours = param_shapes[e.path] if e.block is None else param_shapes[e.path][1:]
        shape = tuple(e.layout.to_torch(np.broadcast_to(np.int8(0), ours)).shape)
        plan.append(ExportedTensor(e.key, shape, itemsize * int(np.prod(shape)), e))
    return plan


def _shard_groups(plan: list[ExportedTensor], max_shard_bytes: int) -> list[list[ExportedTensor]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a bigger single tensor gets its own)."""
    groups, size = [[]], 0
    for t in plan:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def _host_value(param: jax.Array, block: int | None) -> np.ndarray:
    value = param if block is None else param[block]
    if not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def _base_config(source_dir: str | None) -> dict | None:
    """The Hugging Face config the weights came from: a run directory's copy, or a checkpoint's own."""
    for name in (SOURCE_CONFIG, CONFIG_FILE):
        if source_dir and os.path.isfile(os.path.join(source_dir, name)):
            return read_json(os.path.join(source_dir, name), name)
    return None


def export_pytorch(model, out_dir: str, *, dtype: str = "bfloat16", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   source_dir: str | None = None, overwrite: bool = False) -> list[str]:
    """Writes ``model`` (a ``VisionLanguageModel``) to ``out_dir``; returns the files written.

    Args:
      dtype: tensor dtype in the files (``bfloat16``, ``float16`` or ``float32``).
      max_shard_bytes: largest safetensors file; above it the weights are sharded with an index.
      source_dir: a run or checkpoint directory whose tokenizer / processor / generation files
        and InfiniteVL remote code (``*infinitevl*.py``) are copied, and whose Hugging Face
        config supplies the fields we do not model (``bos_token_id``, ...).
      overwrite: replace an existing ``out_dir`` (only after the new one is complete).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}; got {dtype!r}")
    cfg: VisionLanguageConfig = model.cfg
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    plan = export_plan(cfg, {p: tuple(v.shape) for p, v in params.items()}, dtype)
    groups = _shard_groups(plan, max_shard_bytes)
    names = [SINGLE_FILE] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    writer = jax.process_index() == 0
    with (atomic_directory(out_dir, overwrite=overwrite) if writer else contextlib.nullcontext()) as tmp:
        with tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc="exporting",
                  disable=not writer) as progress:
            for name, group in zip(names, groups):
                tensors = {}
                for t in group:
                    value = _host_value(params[t.entry.path].get_value(), t.entry.block)
                    tensors[t.key] = np.ascontiguousarray(t.entry.layout.to_torch(value)).astype(DTYPES[dtype])
                    progress.update(t.nbytes)
                if writer:
                    write_safetensors(os.path.join(tmp, name), tensors, {"format": "pt"})
        if not writer:
            return []
        written = list(names)
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for t in plan)},
                     "weight_map": {t.key: n for n, g in zip(names, groups) for t in g}}
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
            written.append(INDEX_FILE)
        hf_config = {**config_to_hf(cfg, _base_config(source_dir)), "torch_dtype": dtype}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2)
        written.append(CONFIG_FILE)
        if source_dir:
            written += copy_sidecar_files(source_dir, tmp, remote_code=True)
    return sorted(written)
