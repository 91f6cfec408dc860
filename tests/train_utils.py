"""Shared by the tests/test_train_*.py files: the tiny teacher/student pair and packed text batches."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from flax import nnx

from infinitevl_jax.config import load_config
from infinitevl_jax.convert.student import student_config, student_from_teacher
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel
from infinitevl_jax.train.step import stage_defaults


def tiny_teacher_config() -> VisionLanguageConfig:
    """The tiny preset with every layer full attention (a teacher)."""
    cfg = VisionLanguageConfig.from_config(load_config("tiny"))
    return dataclasses.replace(cfg, decoder=dataclasses.replace(
        cfg.decoder, layer_types=("full_attention",) * cfg.decoder.num_layers))


@functools.cache
def teacher_model(seed: int = 0) -> VisionLanguageModel:
    return VisionLanguageModel(tiny_teacher_config(), rngs=nnx.Rngs(seed))


@functools.cache
def student_model(seed: int = 0) -> VisionLanguageModel:
    """The mimic-init student over ``teacher_model()`` (window 16); cached: clone it before changing it."""
    teacher = teacher_model()
    return student_from_teacher(teacher, student_config(teacher.cfg, sliding_window=16), seed=seed)


def train_config(stage: str, **changes):
    """``stage_defaults(stage)`` in float32 with a short schedule, plus ``changes``."""
    cfg = stage_defaults(stage)
    cfg.dtype = "float32"
    cfg.optim.total_steps = 10
    cfg.optim.warmup_steps = 0
    cfg.optim.learning_rate = 1e-2
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def text_batch(rows: int = 4, seq_len: int = 16, vocab: int = 300, seed: int = 0) -> dict:
    """A packed text batch (PackedBatch fields): each row two segments + tail padding, per-segment
    positions, in-segment next-token targets, random label masks."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (rows, seq_len)).astype(np.int32)
    seg = np.zeros((rows, seq_len), np.int32)
    pos = np.zeros((rows, seq_len), np.int32)
    for b in range(rows):
        first = int(rng.integers(3, seq_len - 5))
        second = int(rng.integers(first + 2, seq_len))
        seg[b, :first], seg[b, first:second] = 1, 2
        pos[b, :first], pos[b, first:second] = np.arange(first), np.arange(second - first)
    ids[seg == 0] = 0
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    targets = np.zeros_like(ids)
    targets[:, :-1] = np.where(same, ids[:, 1:], 0)
    mask = np.zeros((rows, seq_len), np.float32)
    mask[:, :-1] = same * (rng.random((rows, seq_len - 1)) < 0.6)
    return dict(input_ids=ids, segment_ids=seg, position_ids=np.repeat(pos[:, None], 3, axis=1),
                targets=targets, loss_mask=mask)
