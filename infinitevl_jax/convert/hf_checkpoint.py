"""Hugging Face checkpoint directories: ``config.json`` plus safetensors weights, one file or
shards listed by ``model.safetensors.index.json``, read lazily (memory-mapped) and checked.

Also the files that travel with weights (tokenizer, processor, chat template, generation
config, remote code) so that import and export can carry them along.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Iterator, Mapping

import numpy as np

from infinitevl_jax.convert.safetensors_io import CorruptCheckpointError, SafetensorsFile

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a checkpoint ships besides config and weights; copied by import and export when present.
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json", "generation_config.json")
REMOTE_CODE_GLOB = "*infinitevl*.py"


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({e})") from None


class CheckpointTensors(Mapping[str, np.ndarray]):
    """``{key: memory-mapped array}`` over every safetensors file of a checkpoint directory."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path, "shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptCheckpointError(f"{index_path} has no weight_map")
            shard_names = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, shard_names = None, [SINGLE_FILE]
        else:
            found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory} (files: {found[:20]}); "
                                    "PyTorch .bin checkpoints are not read: re-save them with safetensors")
        missing = [n for n in shard_names if not os.path.isfile(os.path.join(directory, n))]
        if missing:
            raise FileNotFoundError(f"{directory}: shard files {missing} listed in {INDEX_FILE} are missing")
        self._where: dict[str, SafetensorsFile] = {}
        for name in shard_names:
            shard = SafetensorsFile(os.path.join(directory, name))
            for key in shard.keys():
                if key in self._where:
                    raise CorruptCheckpointError(f"{directory}: tensor {key!r} appears in both "
                                                 f"{os.path.basename(self._where[key].path)} and {name}")
                self._where[key] = shard
        if weight_map is not None:
            misplaced = sorted(k for k, f in weight_map.items()
                               if k not in self._where or os.path.basename(self._where[k].path) != f)
            unlisted = sorted(set(self._where) - set(weight_map))
            if misplaced or unlisted:
                raise CorruptCheckpointError(f"{index_path} disagrees with the shard files: keys not in their "
                                             f"listed shard {misplaced[:10]}, keys not listed {unlisted[:10]}")

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key].array(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def is_hf_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and any(
        os.path.isfile(os.path.join(directory, f)) for f in (SINGLE_FILE, INDEX_FILE))


def copy_sidecar_files(source: str, target: str, *, remote_code: bool = False) -> list[str]:
    """Copies the tokenizer/processor files (and the InfiniteVL remote code) present in ``source``."""
    names = [n for n in SIDECAR_FILES if os.path.isfile(os.path.join(source, n))]
    if remote_code:
        names += sorted(os.path.basename(p) for p in glob.glob(os.path.join(source, REMOTE_CODE_GLOB)))
    for name in names:
        shutil.copy2(os.path.join(source, name), os.path.join(target, name))
    return names
