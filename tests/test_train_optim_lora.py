"""Learning-rate schedule against its closed form, the masked AdamW + clipping against a NumPy
AdamW, and LoRA: a zero B changes nothing, merged weights equal the adapter forward."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.models.layers import Dense
from infinitevl_jax.train.lora import LoRADense, apply_lora, merge_lora
from infinitevl_jax.train.optim import (
    learning_rate_schedule,
    make_optimizer,
    warmup_steps,
)
from infinitevl_jax.train.step import stage_defaults, training_model_config
from infinitevl_jax.train.trainable import param_path
from tests.train_utils import student_model, text_batch


def test_warmup_cosine_schedule_matches_closed_form():
    peak, total, warm, end = 3e-4, 100, 10, 1e-5
    schedule = learning_rate_schedule(peak, total, warm, end)
    for s in range(total + 5):
        if s < warm:
            expected = peak * s / warm
        else:
            expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * min(s - warm, total - warm) / (total - warm)))
        np.testing.assert_allclose(float(schedule(s)), expected, rtol=1e-5, atol=1e-12, err_msg=f"step {s}")
    assert warmup_steps(1000, warmup_ratio=0.01) == 10 and warmup_steps(150, warmup_ratio=0.01) == 2
    assert warmup_steps(150, warmup_steps=7, warmup_ratio=0.5) == 7
    with pytest.raises(ValueError, match="warmup"):
        learning_rate_schedule(peak, 10, 10)


def test_masked_adamw_with_clipping_matches_numpy():
    cfg = dict(learning_rate=0.1, total_steps=4, warmup_steps=1, end_learning_rate=0.0, b1=0.9, b2=0.99,
               eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "frozen": jnp.array([5.0, 6.0])}
    tx = make_optimizer(cfg, {"w": True, "frozen": False})
    state = tx.init(params)
    # state: Adam's mu and nu for "w" only, plus Adam's and the schedule's step counts
    assert sum(np.size(x) for x in jax.tree.leaves(state)) == 2 * 3 + 2
    grads = [np.array([3.0, 4.0, 0.0]), np.array([0.1, -0.2, 0.05]), np.array([-6.0, 0.0, 8.0])]
    p, m, v = np.array([1.0, -2.0, 3.0]), np.zeros(3), np.zeros(3)
    schedule = learning_rate_schedule(0.1, 4, 1, 0.0)
    for step, g in enumerate(grads):
        updates, state = tx.update({"w": jnp.asarray(g), "frozen": jnp.ones(2)}, state, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)
        g = g * min(1.0, 1.0 / np.linalg.norm(g))  # global-norm clipping
        m, v = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** (step + 1)), v / (1 - 0.99 ** (step + 1))
        p = p - float(schedule(step)) * (m_hat / (np.sqrt(v_hat) + 1e-6) + 0.01 * p)
        np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-5, atol=1e-7, err_msg=f"step {step}")
        np.testing.assert_array_equal(np.asarray(params["frozen"]), [5.0, 6.0])


def test_lora_dense_math():
    base = Dense(5, 3, axes=("embed", "heads"), use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs=nnx.Rngs(0))
    base.bias[...] = jnp.arange(3.0)
    lora = LoRADense(base, rank=2, alpha=6.0, key=jax.random.key(1))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(lora(x)), np.asarray(base(x)))  # B = 0: exactly the base map
    lora.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 3))
    w, b, a, bb = (np.asarray(t[...], np.float64) for t in (lora.kernel, lora.bias, lora.lora_a, lora.lora_b))
    np.testing.assert_allclose(np.asarray(lora(x)), x @ w + b + 3.0 * (x @ a) @ bb, rtol=1e-5, atol=1e-6)
    assert np.abs(a).max() <= 1 / np.sqrt(5) and lora.lora_a.get_metadata()["logical_axes"] == ("embed", None)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRADense(base, rank=0, alpha=1.0, key=jax.random.key(0))


def _logits(model, batch):
    positions = jnp.transpose(jnp.asarray(batch["position_ids"]), (1, 0, 2))
    return np.asarray(model.language_model(jnp.asarray(batch["input_ids"]), position_ids=positions,
                                           segment_ids=jnp.asarray(batch["segment_ids"]))[0])


def test_lora_on_the_model_zero_init_and_merge():
    base = student_model()
    batch = text_batch(rows=2, seq_len=12, seed=6)
    reference = _logits(base, batch)
    base_paths = {param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(base, nnx.Param))[0]}

    model = nnx.clone(base)
    assert apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "gate_proj")) == 12
    # B = 0: outputs unchanged (bit-exact per map, see above; the scanned graph may fuse differently)
    np.testing.assert_allclose(_logits(model, batch), reference, rtol=1e-5, atol=1e-6)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRADense):
            module.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(3), module.lora_b.shape)
    adapted = _logits(model, batch)
    assert np.abs(adapted - reference).max() > 1e-3
    assert merge_lora(model) == 12
    paths = {param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]}
    assert paths == base_paths  # the merged model has the base model's parameter tree
    np.testing.assert_allclose(_logits(model, batch), adapted, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="nothing to adapt"):
        apply_lora(nnx.clone(base), rank=2, alpha=2.0, targets=("no_such_proj",))


def test_precision_and_remat_policy_come_from_the_stage_config():
    cfg = training_model_config(student_model().cfg, stage_defaults("long_sft"))
    assert (cfg.decoder.dtype, cfg.decoder.param_dtype, cfg.decoder.remat) == ("bfloat16", "float32", "nothing_saveable")
    assert (cfg.vision.dtype, cfg.vision.remat) == ("bfloat16", "nothing_saveable")
    assert stage_defaults("sft").trainable == ("gdn_mixers", "attention_mixers")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_defaults("pretrain")
