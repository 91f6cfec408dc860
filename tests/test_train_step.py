"""The train step: each stage updates exactly its trainable parameters; a sharded step (8 devices,
fsdp=4 x tensor=2) equals the single-device step; k micro-batches equal one full-batch step."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from infinitevl_jax.train.sharding import make_mesh
from infinitevl_jax.train.step import Trainer, adapt_for_stage
from infinitevl_jax.train.trainable import param_path
from tests.train_utils import student_model, teacher_model, text_batch, train_config

GDN_TENSORS = {"q_proj", "k_proj", "v_proj", "q_conv", "k_conv", "v_conv", "g_proj", "a_proj", "b_proj",
               "A_log", "dt_bias", "o_norm", "o_proj"}  # spec 7.3 distill_weights, in this model's names


def _flat(params):
    return {param_path(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _expected_trainable(path, stage):
    """Spec 7.3, written out by name: tiny student layers 0 and 4 are SWA (slot 0), the rest GDN."""
    if stage == "long_sft":
        return path[-1] in ("lora_a", "lora_b")
    if path[:3] != ("language_model", "blocks", "layers") or path[4] != "mixer":
        return False
    if path[3] in (1, 2, 3):
        return path[5] in GDN_TENSORS
    return stage == "sft" and path[5] in ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("stage", ["distill_layerwise", "distill_e2e", "sft", "long_sft"])
def test_each_stage_updates_exactly_its_trainable_parameters(stage):
    model = nnx.clone(student_model())
    cfg = train_config(stage, **({"lora.rank": 4, "lora.alpha": 8.0} if stage == "long_sft" else {}))
    adapted = adapt_for_stage(model, cfg)
    assert adapted == (4 * 4 if stage == "long_sft" else 0)  # q/k/v/o of the 4 pattern slots (stacked x 2 blocks)
    trainer = Trainer(model, cfg, teacher=teacher_model() if stage.startswith("distill") else None)
    state = trainer.init(model)
    before = _flat(state.params)
    listing = trainer.describe(state.params)
    expected = {p for p in before if _expected_trainable(p, stage)}
    assert expected and {p for p, on in _flat(trainer.mask).items() if on} == expected
    assert f"{sum(before[p].size for p in expected):,} of {sum(v.size for v in before.values()):,}" in listing
    for seed in (0, 1):  # two steps: LoRA's A only moves once B is non-zero
        state, metrics = trainer.step(state, text_batch(seed=seed))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    after = _flat(state.params)
    assert int(state.step) == 2
    for path, value in before.items():
        if path in expected:
            assert not np.array_equal(after[path], value), f"{path} did not change"
        else:  # bit-identical
            np.testing.assert_array_equal(after[path].view(np.uint32), value.view(np.uint32), err_msg=str(path))
    opt_elements = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    # Adam mu and nu of the trainable parameters, Adam's and the schedule's step counts; frozen ones: nothing
    assert opt_elements == 2 * sum(before[p].size for p in expected) + 2


def _one_step(trainer, model, batch):
    state, metrics = trainer.step(trainer.init(model), batch)
    return _flat(state.params), {k: float(v) for k, v in metrics.items()}


def test_sharded_step_equals_single_device_step():
    model, teacher = student_model(), teacher_model()
    cfg = train_config("distill_e2e", **{"optim.eps": 1e-3})  # eps keeps Adam's first step smooth in g
    batch = text_batch(rows=8, seed=4)
    mesh = make_mesh(fsdp=4, tensor=2)
    sharded = Trainer(model, cfg, teacher=teacher, mesh=mesh)
    state = sharded.init(model)
    kernel = state.params["language_model"]["blocks"]["layers"][1]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor") and len(kernel.sharding.device_set) == 8
    specs = {param_path(p): x.sharding.spec for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    moments = [(param_path(p), x) for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
               if "language_model" in param_path(p)]
    assert len(moments) == 2 * sum(jax.tree.leaves(sharded.mask))  # Adam mu and nu, sharded like their params
    for path, x in moments:
        assert x.sharding.spec == specs[path[path.index("language_model"):]], path
    state, metrics_sharded = sharded.step(state, batch)
    assert state.params["language_model"]["embed_tokens"].sharding.spec == PartitionSpec("tensor", "fsdp")
    params_sharded = _flat(state.params)
    params_single, metrics_single = _one_step(Trainer(model, cfg, teacher=teacher), model, batch)
    for key in ("loss", "grad_norm", "normalizer"):  # float32 sums in another order: ~1e-5 apart
        np.testing.assert_allclose(float(metrics_sharded[key]), metrics_single[key], rtol=5e-5)
    for path, value in params_single.items():
        np.testing.assert_allclose(params_sharded[path], value, rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_gradient_accumulation_equals_one_full_batch_step():
    model = student_model()
    batch = text_batch(rows=8, seed=5)  # label counts differ per row: token-normalised CE is not a mean of means
    full_params, full = _one_step(Trainer(model, train_config("sft", **{"optim.eps": 1e-3})), model, batch)
    acc_params, acc = _one_step(Trainer(model, train_config("sft", microbatches=4, **{"optim.eps": 1e-3})),
                                model, batch)
    for key in ("loss", "grad_norm", "normalizer"):
        np.testing.assert_allclose(acc[key], full[key], rtol=1e-5)
    for path, value in full_params.items():
        np.testing.assert_allclose(acc_params[path], value, rtol=1e-5, atol=1e-6, err_msg=str(path))
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        Trainer(model, train_config("sft", microbatches=3)).step(Trainer(model, train_config("sft")).init(model),
                                                                 batch)
