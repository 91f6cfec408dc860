"""``load_pretrained``: a Hugging Face checkpoint or one of our run directories -> a model.

The model is first built abstractly (``nnx.eval_shape``: shapes only, nothing allocated), then
every parameter is created directly in its final place: on the default device, or with a mesh
in the sharding the logical-axis rules give it, each device reading only its own shard
(memory-mapped safetensors, or Orbax's sharded restore).

A run directory of the LoRA stage (``train.lora.rank > 0`` in its ``run_config.json``) holds the
adapters next to the frozen weights; loading it restores both and merges the adapters
(``W + (alpha / r) A B``), so every caller gets the plain model.
"""

from __future__ import annotations

import os
import shutil
from typing import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from infinitevl_jax.convert.atomic import atomic_directory
from infinitevl_jax.convert.hf_checkpoint import (CONFIG_FILE, CheckpointTensors, copy_sidecar_files, is_hf_checkpoint,
                                                 read_json)
from infinitevl_jax.convert.hf_config import config_from_hf
from infinitevl_jax.convert.torch_params import load_params
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel
from infinitevl_jax.train.checkpoint import (SOURCE_CONFIG, is_run_dir, read_run_config, restore_params, save_params,
                                            write_run_config)
from infinitevl_jax.train.lora import apply_lora, merge_lora
from infinitevl_jax.train.sharding import LOGICAL_RULES, param_shardings


def abstract_model(cfg: VisionLanguageConfig, lora: Mapping | None = None) -> VisionLanguageModel:
    """The model with ``jax.ShapeDtypeStruct`` parameters (no memory, no initialisation run);
    ``lora`` (a ``train.lora`` section with rank > 0) adds the adapters."""
    def build():
        model = VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
        if lora and lora["rank"]:
            apply_lora(model, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"], seed=lora["seed"])
        return model
    return nnx.eval_shape(build)


def _shardings(params: nnx.State, mesh: Mesh | None, rules) -> nnx.State:
    if mesh is not None:
        return param_shardings(params, mesh, rules)
    device = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: device, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def assemble_model(cfg: VisionLanguageConfig, fill, lora: Mapping | None = None) -> VisionLanguageModel:
    """The model of ``cfg`` (with ``lora`` adapters) with parameters ``fill(abstract nnx.Param
    state)`` (nothing else allocated)."""
    graphdef, params, rest = nnx.split(abstract_model(cfg, lora), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise NotImplementedError(f"the model holds non-parameter state that loading does not restore: {rest}")
    return nnx.merge(graphdef, fill(params), rest)


def random_model(cfg: VisionLanguageConfig, *, seed: int = 0, mesh: Mesh | None = None,
                 rules: Mapping[str, object] = LOGICAL_RULES) -> VisionLanguageModel:
    """A randomly initialised model whose parameters are created in place (one jitted init with
    the rules' output shardings on ``mesh``, so no device ever holds an unsharded copy)."""
    graphdef, params, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise NotImplementedError(f"the model holds non-parameter state that random_model does not create: {rest}")
    init = jax.jit(lambda: nnx.state(VisionLanguageModel(cfg, rngs=nnx.Rngs(seed)), nnx.Param),
                   out_shardings=_shardings(params, mesh, rules))
    return nnx.merge(graphdef, init(), rest)


def run_lora(path: str) -> Mapping | None:
    """The ``train.lora`` section of a run directory whose checkpoints hold LoRA adapters, else None."""
    if not is_run_dir(path):
        return None
    lora = read_run_config(path).get("train", {}).get("lora")
    return lora if lora and lora.get("rank") else None


def model_config_of(path: str, *, dtype: str | None = None, param_dtype: str | None = None) -> VisionLanguageConfig:
    """The ``VisionLanguageConfig`` of a checkpoint or run directory, with optional dtype overrides."""
    if is_run_dir(path):
        cfg = VisionLanguageConfig.from_config(read_run_config(path))
    elif is_hf_checkpoint(path):
        cfg = config_from_hf(read_json(os.path.join(path, CONFIG_FILE), CONFIG_FILE))
    else:
        raise FileNotFoundError(f"{path} is neither a run directory (run_config.json + checkpoints/) nor a "
                                "Hugging Face checkpoint (config.json + model.safetensors[.index.json])")
    return cfg.with_dtypes(dtype, param_dtype)


def load_pretrained(path: str, *, dtype: str | None = None, param_dtype: str | None = None,
                    mesh: Mesh | None = None, rules: Mapping[str, object] = LOGICAL_RULES,
                    step: int | None = None) -> VisionLanguageModel:
    """A ``VisionLanguageModel`` with the weights of ``path``.

    Args:
      path: a Hugging Face Qwen2.5-VL or InfiniteVL checkpoint directory (``config.json`` and
        ``model.safetensors`` or shards + ``model.safetensors.index.json``; legacy ``visual.*`` /
        ``model.*`` or newer ``model.visual.*`` / ``model.language_model.*`` keys; tied or untied
        head; any float dtype), or a run directory of ours (``run_config.json`` + Orbax
        ``checkpoints/``). The config decides the layer pattern.
      dtype: compute dtype (default: the config's; ``bfloat16`` for Hugging Face checkpoints).
      param_dtype: parameter dtype (default: the config's; ``float32`` for Hugging Face
        checkpoints, the master-weight precision for training; ``bfloat16`` halves inference memory).
      mesh: place every parameter in the sharding ``rules`` give it on this mesh, reading each
        shard directly (no host holds a whole parameter it does not need); default: one device.
      step: the checkpoint step of a run directory (default: the latest).

    Raises ``FileNotFoundError`` for a missing directory, file or shard; ``KeyError`` naming
    missing / unexpected tensors; ``ValueError`` naming a tensor whose shape disagrees with
    the config, or a corrupt file.
    """
    cfg = model_config_of(path, dtype=dtype, param_dtype=param_dtype)
    if is_run_dir(path):
        lora = run_lora(path)
        model = assemble_model(cfg, lambda params: restore_params(path, params, _shardings(params, mesh, rules), step),
                               lora)
        if lora:
            merge_lora(model)
        return model
    if step is not None:
        raise ValueError(f"step={step} applies to run directories only; {path} is a Hugging Face checkpoint")
    tensors = CheckpointTensors(path)  # shard headers are read once, here
    try:
        return assemble_model(cfg, lambda params: load_params(
            cfg, tensors, params, None if mesh is None else param_shardings(params, mesh, rules)))
    except KeyError as e:
        raise KeyError(f"{path}: {e.args[0]}") from None


def save_run(model: VisionLanguageModel, run_dir: str, *, source_dir: str | None = None,
             meta: Mapping | None = None, overwrite: bool = False) -> None:
    """Writes a run directory holding ``model`` as step 0 (what ``infinitevl convert`` produces).

    ``source_dir``: the Hugging Face checkpoint the weights came from; its ``config.json`` is kept
    as ``source_config.json`` and its tokenizer / processor files and remote code are copied.
    The folder appears complete or not at all.
    """
    with atomic_directory(run_dir, overwrite=overwrite) as tmp:
        write_run_config(tmp, model.cfg.to_config())
        if source_dir is not None:
            shutil.copy2(os.path.join(source_dir, CONFIG_FILE), os.path.join(tmp, SOURCE_CONFIG))
            copy_sidecar_files(source_dir, tmp, remote_code=True)
        save_params(tmp, 0, nnx.state(model, nnx.Param), dict(meta or {}))
