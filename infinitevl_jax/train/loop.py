"""The training loop shared by every stage: models -> mesh -> data -> jitted steps -> checkpoints.

    result = train(config, run_dir)        # config: ``run_config.run_config(stage)`` + changes

1. Devices: a ``(data, fsdp, tensor, sequence)`` mesh from ``config.mesh`` over all devices of all
   hosts (call ``jax.distributed.initialize`` first on a pod; ``infinitevl train --distributed``).
2. Models: the student from ``config.init`` (random from the preset, a checkpoint, or a
   mimic-initialised student of a teacher checkpoint) in the stage's precision and remat, with
   LoRA adapters for ``train.lora.rank > 0``; the frozen teacher from ``config.teacher`` for the
   distillation losses. Each parameter is created in its sharding on the mesh.
3. The run directory gets ``run_config.json``: the config with the model sections of the model
   actually trained. A directory that already holds checkpoints is resumed: the model, optimiser
   state, step and every host's data-iterator position come from the latest checkpoint (onto
   whatever mesh this run has), and the run continues with the same loss sequence it would
   have had uninterrupted. The stage and model must match the saved config.
4. Steps: ``Trainer.step`` on each global batch (every host packs its own rows); a checkpoint
   every ``run.save_every`` steps (asynchronous), keeping ``run.keep``; SIGTERM (preemption,
   ``scancel``, Ctrl-C's SIGINT too) finishes the current step, saves, and returns.
5. The last step is always saved, so the run directory loads with ``load_pretrained``.

The step is a pure function of (state, batch) and the data order a function of the config, so
there is no per-step randomness to carry: nothing in a stage's loss samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from infinitevl_jax.convert.pretrained import abstract_model, load_pretrained, model_config_of, random_model
from infinitevl_jax.convert.student import student_config, student_from_teacher
from infinitevl_jax.data.pipeline import build_dataset
from infinitevl_jax.models.config import MMateConfig, VisionLanguageConfig
from infinitevl_jax.train import checkpoint as ckpt
from infinitevl_jax.train.flops import peak_flops_per_device, train_flops_per_token
from infinitevl_jax.train.observe import RunReporter
from infinitevl_jax.train.run_config import MODEL_SECTIONS, num_steps
from infinitevl_jax.train.sharding import make_mesh
from infinitevl_jax.train.step import Trainer, TrainState, adapt_for_stage, training_model_config
from infinitevl_jax.train.trainable import count_trainable


# Sections that must agree between a run directory and the config resuming it (the mesh, the
# run section and the data-loading performance knobs may change).
RESUME_SECTIONS = MODEL_SECTIONS + ("train",)
DATA_PERF_FIELDS = ("read_threads", "read_buffer", "prefetch_batches")


@dataclasses.dataclass
class TrainResult:
    """run_dir; step: optimiser steps done in total; preempted: stopped by a signal before the end;
    metrics: the last step's reported metrics (None if no step ran)."""

    run_dir: str
    step: int
    preempted: bool
    metrics: dict | None


class StopSignals:
    """Within ``with``: SIGTERM / SIGINT set ``requested`` instead of killing the process (a second
    SIGINT raises KeyboardInterrupt, for a user who really wants out)."""

    def __init__(self):
        self.requested = threading.Event()
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _model_config(config: ml_collections.ConfigDict, cfg: VisionLanguageConfig) -> VisionLanguageConfig:
    return training_model_config(cfg, config.train)


def load_teacher(config: ml_collections.ConfigDict, mesh) -> nnx.Module | None:
    """The frozen teacher of a distillation stage (None for cross-entropy stages)."""
    if config.train.loss == "cross_entropy":
        return None
    path = config.teacher.checkpoint or (config.init.checkpoint if config.init.student.enabled else "")
    if not path:
        raise ValueError(f"stage {config.train.stage!r} distils from a teacher: set teacher.checkpoint (or build the "
                         "student from one with init.checkpoint + init.student.enabled)")
    return load_pretrained(path, dtype=config.train.dtype, mesh=mesh, step=config.teacher.step)


def planned_model_config(config: ml_collections.ConfigDict, saved: Mapping | None) -> VisionLanguageConfig:
    """The config of the model this run trains, without loading weights: the run directory's
    (``saved``) when resuming a run that started from a checkpoint, else the checkpoint's (or its
    student's), else the preset sections of ``config``; in the stage's precision and remat."""
    init = config.init
    if init.student.enabled and not init.checkpoint:
        raise ValueError("init.student.enabled builds a student of init.checkpoint, which is empty")
    if not init.checkpoint:
        cfg = VisionLanguageConfig.from_config(config)
    elif saved is not None:
        cfg = VisionLanguageConfig.from_config(saved)
    else:
        cfg = model_config_of(init.checkpoint)
        if init.student.enabled:
            cfg = student_config(cfg, arch=init.student.arch, period=init.student.period,
                                 sliding_window=init.student.sliding_window,
                                 mmate=MMateConfig.from_dict(init.student.mmate))
    return _model_config(config, cfg)


def teacher_is_init(config: ml_collections.ConfigDict, teacher: nnx.Module | None) -> bool:
    """Whether ``teacher`` holds exactly the weights a fresh run loads from ``init.checkpoint``
    (a student built from its own teacher, as precise as the stage's master weights), so the
    checkpoint need not be read twice."""
    init = config.init
    return (teacher is not None and bool(init.checkpoint) and init.student.enabled
            and config.teacher.checkpoint in ("", init.checkpoint) and config.teacher.step == init.step
            and teacher.cfg.decoder.param_dtype == config.train.param_dtype)


def initial_model(config: ml_collections.ConfigDict, cfg: VisionLanguageConfig, mesh,
                  teacher: nnx.Module | None = None) -> nnx.Module:
    """The model a fresh run starts from (``config.init``; ``cfg`` from ``planned_model_config``),
    LoRA adapters added, on ``mesh``. ``teacher``: the stage's loaded teacher, reused as the
    source when it is ``init.checkpoint`` itself (``teacher_is_init``)."""
    init = config.init
    if not init.checkpoint:
        model = random_model(cfg, seed=init.seed, mesh=mesh)
    else:
        source = teacher if teacher_is_init(config, teacher) else load_pretrained(
            init.checkpoint, dtype=config.train.dtype, param_dtype=config.train.param_dtype, mesh=mesh, step=init.step)
        if init.student.enabled:
            source = student_from_teacher(source, cfg, seed=init.student.seed, mesh=mesh)
        # the stage's remat policy: the same parameters in another graph
        graphdef, _, rest = nnx.split(abstract_model(cfg), nnx.Param, ...)
        model = nnx.merge(graphdef, nnx.state(source, nnx.Param), rest)
    adapt_for_stage(model, config.train)
    return model


def _resolved(config: ml_collections.ConfigDict, cfg: VisionLanguageConfig) -> dict:
    """The config as JSON with the trained model's sections."""
    data = config.to_dict()
    data.update(json.loads(json.dumps(cfg.to_config())))
    return data


def _check_resumable(saved: Mapping, resolved: Mapping, run_dir: str) -> None:
    def strip(section, name):
        section = dict(section or {})
        if name == "data":
            for key in DATA_PERF_FIELDS:
                section.pop(key, None)
        return json.loads(json.dumps(section))
    different = [name for name in RESUME_SECTIONS + ("data",)
                 if strip(saved.get(name), name) != strip(resolved.get(name), name)]
    if different:
        raise ValueError(f"{run_dir} holds a run whose {', '.join(different)} config differs from this one; resume "
                         "it with its own config (run_config.json) or start a new run directory")


def _batch_arrays(batch) -> dict:
    """A ``PackedBatch`` as the trainer's dict (vision fields only when present)."""
    return {k: v for k, v in batch._asdict().items() if v is not None}


def _flops_per_token(config, model_cfg: VisionLanguageConfig, teacher, trainable: int) -> float:
    return train_flops_per_token(model_cfg, config.data.seq_len, trainable_params=trainable,
                                 teacher=None if teacher is None else teacher.cfg,
                                 layerwise=config.train.loss == "layerwise_mse")


def _close_iterator(iterator) -> None:
    with contextlib.suppress(AttributeError):  # grain iterators with prefetch threads have close()
        iterator.close()


def train(config: ml_collections.ConfigDict, run_dir: str, *, progress: bool = True) -> TrainResult:
    """Runs (or resumes) one stage in ``run_dir`` (module docstring)."""
    steps = num_steps(config)
    if config.run.save_every < 1:
        raise ValueError(f"run.save_every must be >= 1; got {config.run.save_every}")
    if "://" in run_dir:
        raise ValueError(f"run directory {run_dir!r}: the trainer writes run directories on a file system; "
                         "for a bucket, mount it on every host (e.g. gcsfuse) and pass the mounted path")
    mesh = make_mesh(**config.mesh)
    os.makedirs(run_dir, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        manager = ckpt.checkpoint_manager(run_dir, max_to_keep=config.run.keep, async_save=config.run.async_save)
        cleanup.callback(manager.close)
        latest = manager.latest_step()
        saved = None if latest is None else ckpt.read_run_config(run_dir).to_dict()
        model_cfg = planned_model_config(config, saved)
        resolved = _resolved(config, model_cfg)
        if saved is not None:
            _check_resumable(saved, resolved, run_dir)
        iterator = iter(build_dataset(config.data, model_cfg))  # data errors surface before any weights load
        cleanup.callback(_close_iterator, iterator)
        teacher = load_teacher(config, mesh)
        if latest is None:
            model = initial_model(config, model_cfg, mesh, teacher)
            if jax.process_index() == 0:
                ckpt.write_run_config(run_dir, resolved)
        else:
            model = abstract_model(model_cfg, config.train.lora)
        trainer = Trainer(model, config.train, teacher=teacher, mesh=mesh)
        params = nnx.state(model, nnx.Param)
        if latest is None:
            state, start = trainer.init(model), 0
        else:
            abstract = trainer.abstract_state(params)
            restored, opt_state, meta = ckpt.restore_train_state(manager, latest, params, abstract.opt_state,
                                                                 trainer.state_shardings, iterator)
            state = TrainState(jax.device_put(np.int32(latest), trainer.state_shardings.step), restored, opt_state)
            start = int(meta["step"])
        del model, params  # the state owns the weights from here on

        trainable, _ = count_trainable(state.params, trainer.mask)
        reporter = RunReporter(run_dir, first_step=start, last_step=steps, log_every=config.run.log_every,
                               flops_per_token=_flops_per_token(config, model_cfg, teacher, trainable),
                               peak_flops=config.run.peak_flops_per_device or peak_flops_per_device(jax.devices()[0]),
                               num_devices=jax.device_count(), tensorboard=config.run.tensorboard, progress=progress,
                               desc=config.train.stage)
        cleanup.callback(reporter.close)
        reporter.message(trainer.describe(state.params))
        step, preempted = _run_steps(config, trainer, state, iterator, manager, reporter, start, steps)
        return TrainResult(run_dir, step, preempted, reporter.last)


def _run_steps(config, trainer: Trainer, state: TrainState, iterator, manager, reporter: RunReporter, start: int,
               steps: int) -> tuple[int, bool]:
    """Steps ``start + 1 .. steps`` with periodic checkpoints; a stop signal ends early with a
    save. Returns (last step, stopped by a signal)."""
    meta = {"stage": config.train.stage}
    step = last_saved = start
    preempted = False
    if start:
        reporter.message(f"resumed from step {start}")
    with StopSignals() as stop:
        while step < steps:
            batch = next(iterator)
            state, metrics = trainer.step(state, _batch_arrays(batch))
            step += 1
            if step == start + 1:
                reporter.restart_clock()  # the first call compiled: that is not throughput
            reporter.add(step, metrics, int(np.count_nonzero(batch.segment_ids)), batch.segment_ids.size)
            if stop.requested.is_set() or (jax.process_count() > 1 and manager.reached_preemption(step)):
                preempted = step < steps
                break
            if step % config.run.save_every == 0 and step < steps:
                ckpt.save_train_state(manager, step, state.params, state.opt_state, iterator, meta)
                last_saved = step
                reporter.message(f"checkpoint: step {step}")
        if step > last_saved:
            ckpt.save_train_state(manager, step, state.params, state.opt_state, iterator, meta)
            reporter.message(f"checkpoint: step {step}" + (" (stopped by a signal)" if preempted else ""))
        manager.wait_until_finished()
    return step, preempted
