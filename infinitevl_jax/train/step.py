"""One training step for every stage: loss, gradients of the trainable parameters, AdamW update,
placed on a device mesh by ``jax.jit`` shardings (parameters, optimiser state, batch).

Stages (spec section 7; ``stage_defaults`` gives each one's ``train`` config section):

    distill_layerwise  layerwise_mse: student layer l on the teacher's input to layer l vs. the
                       teacher's output, x mse_factor, mean over layers; trains the GDN mixers
    distill_e2e        logit_kl: KL(teacher || student) at temperature T, x T^2, / B; all
                       positions (kl_mask="all", the original) or label positions ("labels")
    sft                cross_entropy on loss_mask (assistant) tokens; GDN mixers + attention q/k/v/o
    long_sft           cross_entropy; LoRA adapters only (``adapt_for_stage`` adds them)
    linmu_flex_ma      hidden_kl (LinMU, docs/linmu.md): logit_kl + layerwise_mse of the student's
                       own residual stream against the teacher's (both end to end); Flex-MA +
                       the branch mix train
    linmu_local_swin   hidden_kl; Flex-MA, the mix and Local-Swin
    linmu_lora         hidden_kl; both branches, the mix and LoRA adapters on the MLPs

A batch is a dict of batch-leading arrays, the fields of ``data.packing.PackedBatch``:
input_ids, segment_ids, targets int32 ``[B, T]``, position_ids int32 ``[B, 3, T]``, loss_mask
float32 ``[B, T]``, and optionally pixel_values ``[B, P, patch_dim]`` + vision_layout.
``inputs_fn(model, batch)`` turns it into decoder inputs (default: ``prepare_packed``).

Gradient accumulation: with ``microbatches = k`` the global batch of B rows is split into k
micro-batches (micro-batch j = rows j, j + k, j + 2k, ..., so each stays spread over the batch
shards); their loss numerators, denominators and numerator gradients are summed by a
``lax.scan`` and divided once, which is exactly the gradient of the whole batch. The step is a
pure function of (state, batch): no randomness is used, so a run is reproducible step by step.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.train import losses
from infinitevl_jax.train.layerwise import layers_on_inputs, residual_stream
from infinitevl_jax.train.lora import apply_lora
from infinitevl_jax.train.optim import (
    learning_rate_schedule,
    make_optimizer,
    warmup_steps,
)
from infinitevl_jax.train.sharding import LOGICAL_RULES, param_shardings, partition_spec
from infinitevl_jax.train.trainable import (
    STAGE_TRAINABLE,
    describe_trainable,
    param_path,
    trainable_mask,
)

log = logging.getLogger(__name__)
STAGE_LOSS = {"distill_layerwise": "layerwise_mse", "distill_e2e": "logit_kl", "sft": "cross_entropy",
              "long_sft": "cross_entropy", "linmu_flex_ma": "hidden_kl", "linmu_local_swin": "hidden_kl",
              "linmu_lora": "hidden_kl"}
LOSSES = ("layerwise_mse", "logit_kl", "hidden_kl", "cross_entropy")
ATTENTION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
STAGE_LORA = {
    "long_sft": dict(rank=64, alpha=128.0, targets=ATTENTION_LORA_TARGETS, seed=0),
    "linmu_lora": dict(rank=16, alpha=32.0, targets=("gate_proj", "up_proj", "down_proj"), seed=0),
}


def stage_defaults(stage: str) -> ml_collections.ConfigDict:
    """The ``train`` config section of a stage, with the original's hyper-parameters (spec 7.4)."""
    if stage not in STAGE_LOSS:
        raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGE_LOSS)}")
    return ml_collections.ConfigDict(dict(
        stage=stage,
        loss=STAGE_LOSS[stage],
        trainable=STAGE_TRAINABLE[stage],
        mse_factor=100.0 if stage.startswith("linmu_") else 1000.0,
        temperature=2.0,
        kl_mask="all",
        microbatches=1,
        optim=dict(learning_rate=2e-4, total_steps=1000, warmup_steps=None, warmup_ratio=0.01,
                   end_learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, max_grad_norm=1.0),
        dtype="bfloat16",
        param_dtype="float32",
        remat="nothing_saveable" if stage == "long_sft" else "none",
        lora=STAGE_LORA.get(stage, dict(rank=0, alpha=128.0, targets=ATTENTION_LORA_TARGETS, seed=0)),
    ))


def training_model_config(cfg: VisionLanguageConfig, train: Mapping[str, Any]) -> VisionLanguageConfig:
    """The model config under the stage's precision (``dtype`` compute, ``param_dtype`` master
    weights) and remat policy (decoder and vision tower)."""
    cfg = cfg.with_dtypes(train["dtype"], train["param_dtype"])
    return dataclasses.replace(
        cfg, decoder=dataclasses.replace(cfg.decoder, remat=train["remat"]),
        vision=None if cfg.vision is None else dataclasses.replace(cfg.vision, remat=train["remat"]))


def adapt_for_stage(model: nnx.Module, train: Mapping[str, Any]) -> int:
    """Adds the stage's LoRA adapters to ``model`` in place when ``train.lora.rank > 0``;
    returns the number of adapted maps."""
    lora = train["lora"]
    if not lora["rank"]:
        return 0
    return apply_lora(model, rank=lora["rank"], alpha=lora["alpha"], targets=lora["targets"], seed=lora["seed"])


def packed_inputs(model, batch: Mapping[str, Any]):
    """Decoder inputs (embeds, position_ids ``[3, B, T]``, segment_ids) of a batch dict, through
    ``VisionLanguageModel.prepare_packed`` (vision fields optional)."""
    return model.prepare_packed(types.SimpleNamespace(**{"pixel_values": None, "vision_layout": None, **batch}))


def _stream_args(x):
    """``residual_stream``'s arguments from decoder inputs: embeds, position_ids, segment_ids, vision_mask."""
    return x.embeds, x.position_ids, x.segment_ids, x.vision_mask


class TrainState(NamedTuple):
    """step: int32 scalar (updates done); params: the model's ``nnx.Param`` state; opt_state."""

    step: jax.Array
    params: nnx.State
    opt_state: Any


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _select(mask, a, b):
    """Per parameter: ``a``'s variable where ``mask`` is True, else ``b``'s."""
    return jax.tree.map(lambda m, x, y: x if m.get_value() else y, mask, a, b, is_leaf=_is_var)


def _split(mask, params):
    """(trainable, frozen): two trees like ``params``, each holding None where the other has values."""
    empty = jax.tree.map(lambda v: v.replace(None), params, is_leaf=_is_var)
    return _select(mask, params, empty), _select(mask, empty, params)


def _microbatches(batch, k: int):
    """``[k*b, ...]`` leaves -> ``[k, b, ...]``; micro-batch j holds rows j, j + k, ..."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def batch_shardings(batch, mesh: Mesh, rules: Mapping[str, object] = LOGICAL_RULES):
    """``NamedSharding`` per batch leaf: the leading axis on the ``batch`` rule, the rest replicated."""
    return jax.tree.map(lambda x: NamedSharding(mesh, partition_spec(("batch",) + (None,) * (x.ndim - 1),
                                                                     x.shape, mesh, rules)), batch)


def shard_batch(batch, mesh: Mesh, rules: Mapping[str, object] = LOGICAL_RULES):
    """Places a host batch on the mesh. Multi-host: each process passes its own rows (its share
    of the global batch, in process order) and gets the global array."""
    def place(x, sharding):
        return jax.make_array_from_process_local_data(sharding, x)
    local = jax.tree.map(lambda x: jnp.asarray(x) if not hasattr(x, "shape") else x, batch)
    global_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(), *x.shape[1:]),
                                                               x.dtype), local)
    return jax.tree.map(place, local, batch_shardings(global_shape, mesh, rules))


def _opt_state_shardings(opt_state, params, param_sh, mesh: Mesh):
    """Optimiser-state leaves that mirror a parameter (Adam's mu and nu) take its sharding; the
    rest (counts) are replicated. Matched by the parameter path at the end of the leaf's path."""
    table = {param_path(p): (s, v.shape) for (p, v), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding_of(key_path, leaf):
        path = param_path(key_path)
        for i in range(len(path)):
            hit = table.get(path[i:])
            if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
                return hit[0]
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis in Auto mode: the compiler propagates shardings from the
    parameters', optimiser state's and batch's (``jax.make_mesh`` makes Explicit axes, under which
    ops such as the embedding gather would need an output sharding spelled out in model code)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


class Trainer:
    """The jitted train step of one stage for a model (and a teacher for the distillation stages).

    Build once per run: ``trainer = Trainer(model, train_cfg, teacher=..., mesh=...)``, then
    ``state = trainer.init(model)`` and ``state, metrics = trainer.step(state, batch)``. The
    model's graph is fixed at construction (apply ``adapt_for_stage`` first for LoRA).
    """

    def __init__(self, model: nnx.Module, train: Mapping[str, Any], *, teacher: nnx.Module | None = None,
                 mesh: Mesh | None = None, rules: Mapping[str, object] = LOGICAL_RULES,
                 inputs_fn: Callable = packed_inputs):
        if train["loss"] not in LOSSES:
            raise ValueError(f"unknown loss {train['loss']!r}")
        if train["loss"] != "cross_entropy" and teacher is None:
            raise ValueError(f"loss {train['loss']!r} needs a teacher model")
        if train["kl_mask"] not in ("all", "labels"):
            raise ValueError(f"kl_mask must be 'all' or 'labels'; got {train['kl_mask']!r}")
        mesh = None if mesh is None else auto_mesh(mesh)
        self.train, self.mesh, self.rules, self.inputs_fn = train, mesh, rules, inputs_fn
        self.microbatches = int(train["microbatches"])
        if self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1; got {self.microbatches}")
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.mask = trainable_mask(params, model.cfg.decoder.block_pattern, train["trainable"])
        log.info(self.describe(params))
        self.optimizer = make_optimizer(train["optim"], self.mask)
        optim = train["optim"]
        total = int(optim["total_steps"])
        self.schedule = learning_rate_schedule(
            optim["learning_rate"], total, warmup_steps(total, warmup_steps=optim.get("warmup_steps"),
                                                        warmup_ratio=optim.get("warmup_ratio", 0.0)),
            optim.get("end_learning_rate", 0.0))
        self.teacher_graphdef, self.teacher_params = (None, None) if teacher is None else nnx.split(teacher, nnx.Param)
        self.state_shardings = self.teacher_shardings = None
        if mesh is not None:
            abstract = self.abstract_state(params)
            param_sh = param_shardings(params, mesh, rules)
            self.state_shardings = TrainState(NamedSharding(mesh, PartitionSpec()), param_sh,
                                              _opt_state_shardings(abstract.opt_state, params, param_sh, mesh))
            if teacher is not None:
                self.teacher_shardings = param_shardings(self.teacher_params, mesh, rules)
                self.teacher_params = jax.device_put(self.teacher_params, self.teacher_shardings)
        out = (self.state_shardings, None) if mesh is not None else None
        inp = (self.state_shardings, None, self.teacher_shardings) if mesh is not None else None
        self._step = jax.jit(self._update, in_shardings=inp, out_shardings=out, donate_argnums=(0,))

    def describe(self, params: nnx.State) -> str:
        """The trainable-parameter listing for the log."""
        return f"stage {self.train['stage']}: " + describe_trainable(params, self.mask)

    def _fresh_state(self, params) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params))

    def abstract_state(self, params: nnx.State) -> TrainState:
        """The step-0 state's shapes and dtypes for ``params`` (an Orbax restore target)."""
        return jax.eval_shape(self._fresh_state, params)

    def init(self, model: nnx.Module) -> TrainState:
        """Step-0 state of ``model``'s parameters (placed in their shardings on the mesh)."""
        params = nnx.state(model, nnx.Param)
        if self.mesh is not None:
            params = jax.device_put(params, self.state_shardings.params)
        # through jit, so the state owns new buffers: the step donates them, the model keeps its own
        return jax.jit(self._fresh_state, out_shardings=self.state_shardings)(params)

    def step(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        """One optimiser update on a global batch; on a mesh, host arrays are placed with
        ``shard_batch`` (multi-host: pass this process's rows). ``state`` is donated. Metrics:
        loss, grad_norm (before clipping), learning_rate (of this update), normalizer (the loss
        denominator: label tokens, rows, or B*T*D)."""
        if self.mesh is not None:
            batch = shard_batch(batch, self.mesh, self.rules) if not isinstance(
                jax.tree.leaves(batch)[0], jax.Array) else batch
        return self._step(state, dict(batch), self.teacher_params)

    # ---- inside jit ----

    def _loss_terms(self, params, batch, teacher_params) -> losses.LossTerms:
        model = nnx.merge(self.graphdef, params, self.rest)
        kind = self.train["loss"]
        if kind == "cross_entropy":
            logits, _ = model.language_model(**self.inputs_fn(model, batch).decoder_kwargs())
            return losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
        teacher = nnx.merge(self.teacher_graphdef, teacher_params)
        t = self.inputs_fn(teacher, batch)
        if kind == "layerwise_mse":
            stream = jax.lax.stop_gradient(residual_stream(teacher.language_model, *_stream_args(t)))
            outs = layers_on_inputs(model.language_model, stream[:-1], *_stream_args(t)[1:])
            return losses.layerwise_mse(outs, stream[1:], factor=self.train["mse_factor"])
        mask = batch["loss_mask"] if self.train["kl_mask"] == "labels" else None
        x = self.inputs_fn(model, batch)
        if kind == "hidden_kl":
            teacher_stream = jax.lax.stop_gradient(residual_stream(teacher.language_model, *_stream_args(t)))
            stream = residual_stream(model.language_model, *_stream_args(x))
            kl = losses.logit_kl(model.language_model.logits(model.language_model.norm(stream[-1])),
                                 teacher.language_model.logits(teacher.language_model.norm(teacher_stream[-1])),
                                 temperature=self.train["temperature"], mask=mask)
            mse = losses.layerwise_mse(stream[1:], teacher_stream[1:], factor=self.train["mse_factor"])
            return losses.combine(kl, mse)
        teacher_logits, _ = teacher.language_model(**t.decoder_kwargs())
        logits, _ = model.language_model(**x.decoder_kwargs())
        return losses.logit_kl(logits, jax.lax.stop_gradient(teacher_logits),
                               temperature=self.train["temperature"], mask=mask)

    def _gradients(self, params, batch, teacher_params):
        """(numerator gradients of the trainable params, summed numerator, summed denominator)."""
        trainable, frozen = _split(self.mask, params)

        def numerator(t, micro):
            terms = self._loss_terms(_select(self.mask, t, frozen), micro, teacher_params)
            return terms.numerator, terms.denominator

        def accumulate(carry, micro):
            grads, num, den = carry
            (n, d), g = jax.value_and_grad(numerator, has_aux=True)(trainable, micro)
            return (jax.tree.map(jnp.add, grads, g), num + n, den + d), None

        zero = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, num, den), _ = jax.lax.scan(accumulate, zero, _microbatches(batch, self.microbatches))
        return grads, num, den

    def _update(self, state: TrainState, batch, teacher_params):
        grads, num, den = self._gradients(state.params, batch, teacher_params)
        scale = 1.0 / jnp.maximum(den, 1e-12)
        grads = jax.tree.map(lambda g: g * scale, grads)
        _, frozen = _split(self.mask, state.params)
        full = _select(self.mask, grads, jax.tree.map(jnp.zeros_like, frozen))
        updates, opt_state = self.optimizer.update(full, state.opt_state, state.params)
        params = _select(self.mask, optax.apply_updates(state.params, updates), state.params)
        metrics = dict(loss=num * scale, grad_norm=optax.tree.norm(grads), normalizer=den,
                       learning_rate=self.schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), metrics
