"""The config of one training run (one stage): every section the loop reads, with defaults.

    config.model / .vision / .tokens  the model preset (used when ``init.checkpoint`` is empty:
                                       random initialisation; otherwise the checkpoint's config
                                       replaces them in the run's resolved ``run_config.json``)
    config.init     where the weights start:
                      checkpoint  "" (random, from the preset), a run directory or a Hugging Face
                                  folder; step: its checkpoint step (run directories; None: latest)
                      student     build a student of that (full-attention) checkpoint: enabled,
                                  arch ("infinitevl": mimic-initialised GDN, with period (SWA
                                  every ``period`` layers) and sliding_window; "linmu": M-MATE
                                  layers from the attention weights, with the ``mmate`` section),
                                  seed (new tensors' draws)
                      seed        random-initialisation seed
    config.teacher  checkpoint: the frozen teacher of the distillation stages ("" = the
                    ``init.checkpoint`` a student is built from); step
    config.train    the stage: ``step.stage_defaults(stage)`` (loss, trainable groups, optimiser,
                    precision, remat, LoRA)
    config.data     ``data.pipeline.default_data_config()``
    config.mesh     data, fsdp, tensor, sequence axis sizes (one may be -1: the rest of the devices)
    config.run      save_every (steps between checkpoints), keep (checkpoints kept; None: all),
                    async_save, log_every (steps between progress / TensorBoard updates),
                    tensorboard, peak_flops_per_device (None: looked up by device kind), and
                    num_steps (None: ``train.optim.total_steps``; fewer stops early, e.g. tests)

Stage files in ``configs/`` start from ``run_config(stage, preset)`` and change fields, so a
config file holds data only; the command line overrides any field (``--config.a.b=value``).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from infinitevl_jax.config import load_config
from infinitevl_jax.data.pipeline import default_data_config
from infinitevl_jax.models.config import MMateConfig
from infinitevl_jax.train.step import stage_defaults

MODEL_SECTIONS = ("model", "vision", "tokens")


def run_config(stage: str, preset: str = "tiny") -> ml_collections.ConfigDict:
    """The defaults of a ``stage`` run over the model ``preset`` (module docstring)."""
    config = load_config(preset)
    config.init = ml_collections.ConfigDict(dict(
        checkpoint="", step=ml_collections.FieldReference(None, field_type=int),
        student=dict(enabled=False, arch="infinitevl", period=4, sliding_window=8192, seed=0,
                     mmate=dataclasses.asdict(MMateConfig())), seed=0))
    config.teacher = ml_collections.ConfigDict(dict(checkpoint="", step=ml_collections.FieldReference(None,
                                                                                                      field_type=int)))
    config.train = stage_defaults(stage)
    config.data = default_data_config()
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    config.run = ml_collections.ConfigDict(dict(
        save_every=500, keep=ml_collections.FieldReference(3, field_type=int), async_save=True, log_every=10,
        tensorboard=True, peak_flops_per_device=ml_collections.FieldReference(None, field_type=float),
        num_steps=ml_collections.FieldReference(None, field_type=int)))
    return config


def num_steps(config: ml_collections.ConfigDict) -> int:
    """Optimiser steps this run makes: ``run.num_steps`` or the schedule's ``total_steps``."""
    total = int(config.train.optim.total_steps)
    steps = total if config.run.num_steps is None else int(config.run.num_steps)
    if not 0 < steps <= total:
        raise ValueError(f"run.num_steps must be in 1..train.optim.total_steps ({total}); got {steps}")
    return steps


def _recipe(stage: str, preset: str, seq_len: int) -> ml_collections.ConfigDict:
    """The shared schedule of the published-model recipes (``infinitevl_recipe``)."""
    config = run_config(stage, preset)
    config.data.source = "llava"
    config.data.tokenizer = ""  # a checkpoint folder with tokenizer.json (the teacher's)
    config.data.seq_len = seq_len
    config.data.batch_size = 8
    config.data.image_min_pixels = 56 * 56
    config.data.image_max_pixels = 1344 * 1344
    config.data.max_patches = config.data.seq_len * 2  # 4 patches per merged image token, half the row
    config.data.max_slice_patches = (1344 // 14) ** 2
    config.train.remat = "nothing_saveable"
    config.train.optim.total_steps = 5000
    config.run.save_every = 500
    return config


def linmu_recipe(stage: str) -> ml_collections.ConfigDict:
    """A LinMU stage (``linmu_flex_ma``, ``linmu_local_swin``, ``linmu_lora``) over the ``linmu``
    preset, on the InfiniteVL schedule (LinMU's is not public; docs/linmu.md): 8K rows, AdamW
    2e-4, cosine, full remat. The student is built with ``init.student.arch = "linmu"`` and the
    preset's M-MATE section. Checkpoints and data paths are left empty."""
    config = _recipe(stage, "linmu", 8192)
    config.init.student.arch = "linmu"
    config.init.student.mmate = config.model.mmate
    return config


def infinitevl_recipe(stage: str) -> ml_collections.ConfigDict:
    """A stage of the original InfiniteVL-4B curriculum (spec 7.4) over the ``infinitevl_4b``
    preset: AdamW 2e-4, cosine, warmup 1%, clipping 1.0, bf16 compute over float32 master
    weights, LLaVA-style conversations, images up to 1344 x 1344 px, 8192-token rows (32768 for
    ``long_sft``, with LoRA rank 64), full remat (what fits 8K rows of the 4B model: 38 GiB per
    H200 at fsdp 2, ``benchmarks/RESULTS.md``). Checkpoints and data paths are left empty
    for the stage files in ``configs/`` (and the command line) to fill."""
    config = _recipe(stage, "infinitevl_4b", 32768 if stage == "long_sft" else 8192)
    return config
