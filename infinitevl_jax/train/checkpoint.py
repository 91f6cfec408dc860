"""Run directories and their Orbax checkpoints.

    RUN_DIR/
      run_config.json      the resolved config as JSON: ``model`` / ``vision`` / ``tokens``
                           sections (``VisionLanguageConfig.to_config``) plus the trainer's own
      checkpoints/<step>/  one Orbax checkpoint per saved step, items:
                             params     the ``nnx.Param`` state as a nested dict
                             meta       JSON (step, where the weights came from, ...)
                           and, from the trainer (``save_train_state``):
                             opt_state  the optax state (Adam moments of the trainable params)
                             data       the grain iterator state, one JSON file per host
      source_config.json   the Hugging Face ``config.json`` the weights were imported from
                           (kept so export can restore the fields we do not model)
      tokenizer.json ...   the model's tokenizer / processor files, when it has them

Orbax writes each step to a temporary folder and renames it when complete, so an interrupted
save never leaves a step that looks finished.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

RUN_CONFIG = "run_config.json"
SOURCE_CONFIG = "source_config.json"
CHECKPOINTS = "checkpoints"
PARAMS, META, OPT_STATE, DATA = "params", "meta", "opt_state", "data"


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_CONFIG))


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder (created if
    missing), synced, then renamed over ``path``: readers see the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: str, data: Any) -> None:
    """``data`` as indented JSON with sorted keys, written by ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def write_run_config(run_dir: str, config: Mapping[str, Any]) -> None:
    os.makedirs(run_dir, exist_ok=True)
    data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    write_json_atomic(os.path.join(run_dir, RUN_CONFIG), data)


def read_run_config(run_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a run directory: {RUN_CONFIG} is missing")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def checkpoint_manager(run_dir: str, *, max_to_keep: int | None = None, save_interval_steps: int = 1,
                       async_save: bool = False) -> ocp.CheckpointManager:
    """The run's ``CheckpointManager`` (creates ``checkpoints/`` when missing)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, CHECKPOINTS)), options=options)


def save_params(run_dir: str, step: int, params: nnx.State, meta: Mapping[str, Any] | None = None) -> None:
    """Saves a parameters-only checkpoint (what ``infinitevl convert`` writes) and waits for it."""
    manager = checkpoint_manager(run_dir)
    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(params)),
        META: ocp.args.JsonSave({"step": step, **(meta or {})})}), force=True)
    manager.wait_until_finished()
    manager.close()


def resolve_step(run_dir: str, step: int | None) -> int:
    """``step``, checked to exist, or the latest saved step."""
    manager = checkpoint_manager(run_dir)
    steps = manager.all_steps()
    manager.close()
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no saved checkpoints under {CHECKPOINTS}/")
    if step is None:
        return max(steps)
    if step not in steps:
        raise ValueError(f"{run_dir} has no checkpoint for step {step}; saved steps: {sorted(steps)}")
    return step


def restore_params(run_dir: str, params: nnx.State, shardings: nnx.State, step: int | None = None) -> nnx.State:
    """``params`` (an abstract ``nnx.Param`` state) restored from ``step`` (default: latest) straight
    into ``shardings`` (a matching state of ``jax.sharding.Sharding``)."""
    step = resolve_step(run_dir, step)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(params), nnx.to_pure_dict(shardings))
    manager = checkpoint_manager(run_dir)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(target)}))
    except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints
        raise ValueError(f"cannot restore the parameters of step {step} from {run_dir} "
                         f"(corrupt checkpoint, or a run_config.json that does not match it): {e}") from e
    finally:
        manager.close()
    nnx.replace_by_pure_dict(params, restored[PARAMS])
    return params


def _with_shardings(tree, shardings):
    """Abstract arrays (``ShapeDtypeStruct`` with ``sharding``) for an Orbax restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def save_train_state(manager: ocp.CheckpointManager, step: int, params: nnx.State, opt_state, iterator,
                     meta: Mapping[str, Any]) -> None:
    """Saves params, optimiser state, the data iterator's state and ``meta`` as ``step``.
    Asynchronous when the manager is: device arrays are copied to the host before this returns,
    the files are written in the background (``manager.wait_until_finished()`` waits)."""
    import grain  # the training data's library; loading weights for inference does not need it

    manager.save(step, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(nnx.to_pure_dict(params)),
        OPT_STATE: ocp.args.StandardSave(opt_state),
        DATA: grain.checkpoint.CheckpointSave(iterator),
        META: ocp.args.JsonSave({"step": step, **meta})}), force=True)


def restore_train_state(manager: ocp.CheckpointManager, step: int, params: nnx.State, opt_state, shardings,
                        iterator) -> tuple[nnx.State, Any, dict]:
    """The params and optimiser state of ``step`` placed in ``shardings`` (a ``TrainState`` of
    shardings: restoring onto another mesh reshards), the iterator moved to its saved position,
    and the saved meta. ``params`` / ``opt_state``: abstract or concrete trees of the run's layout."""
    target_params = _with_shardings(nnx.to_pure_dict(params), nnx.to_pure_dict(shardings.params))
    target_opt = _with_shardings(opt_state, shardings.opt_state)
    import grain  # see save_train_state
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(target_params), OPT_STATE: ocp.args.StandardRestore(target_opt),
            DATA: grain.checkpoint.CheckpointRestore(iterator), META: ocp.args.JsonRestore()}))
    except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints
        raise ValueError(f"cannot resume from step {step} of {manager.directory} (a corrupt checkpoint, or a "
                         f"config whose model or stage does not match it): {e}") from e
    params = jax.tree.map(lambda v: v, params)  # a copy: the caller's tree is left as it was
    nnx.replace_by_pure_dict(params, restored[PARAMS])
    return params, restored[OPT_STATE], dict(restored[META])
