"""Training losses against float64 NumPy, and the teacher-forced layer-wise runs against an
explicit layer-by-layer loop over the tiny teacher and student."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.ops.rope import rope_cos_sin
from infinitevl_jax.train import losses
from infinitevl_jax.train.layerwise import layers_on_inputs, residual_stream
from infinitevl_jax.train.step import Trainer
from tests.train_utils import student_model, teacher_model, text_batch, train_config


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 6)).astype(np.int32)
    mask = (rng.random((3, 6)) < 0.5).astype(np.float32)
    mask[0, 0] = 1
    terms = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    nll = -np.take_along_axis(_log_softmax64(logits), targets[..., None], -1)[..., 0]
    expected = (nll * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(terms.value), expected, rtol=1e-6)
    assert float(terms.denominator) == mask.sum()
    empty = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((3, 6)))
    assert float(empty.value) == 0.0
    with pytest.raises(ValueError, match="must be logits' \\[B, T\\]"):
        losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets[:, :5]), jnp.asarray(mask))


def test_logit_kl_matches_numpy_with_temperature_squared_and_batchmean():
    rng = np.random.default_rng(1)
    student = rng.normal(size=(3, 5, 13)).astype(np.float32) * 2
    teacher = rng.normal(size=(3, 5, 13)).astype(np.float32) * 2
    mask = (rng.random((3, 5)) < 0.5).astype(np.float32)
    temperature = 2.0
    log_pt, log_ps = _log_softmax64(teacher / temperature), _log_softmax64(student / temperature)
    per_position = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    expected_all = temperature ** 2 * per_position.sum() / 3  # summed over every position, / B only
    expected_masked = temperature ** 2 * (per_position * mask).sum() / 3
    full = losses.logit_kl(jnp.asarray(student), jnp.asarray(teacher), temperature=temperature)
    masked = losses.logit_kl(jnp.asarray(student), jnp.asarray(teacher), temperature=temperature,
                             mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(full.value), expected_all, rtol=1e-5)
    np.testing.assert_allclose(float(masked.value), expected_masked, rtol=1e-5)
    assert float(full.denominator) == 3
    same = losses.logit_kl(jnp.asarray(teacher), jnp.asarray(teacher))
    assert abs(float(same.value)) < 1e-6


def test_layerwise_mse_matches_numpy():
    rng = np.random.default_rng(2)
    student = rng.normal(size=(4, 2, 3, 5)).astype(np.float32)
    teacher = rng.normal(size=(4, 2, 3, 5)).astype(np.float32)
    per_layer = ((student.astype(np.float64) - teacher) ** 2).mean(axis=(1, 2, 3))
    terms = losses.layerwise_mse(jnp.asarray(student), jnp.asarray(teacher), factor=1000.0)
    np.testing.assert_allclose(float(terms.value), 1000 * per_layer.mean(), rtol=1e-6)


def _layer(decoder, index):
    """Layer ``index`` of a stacked decoder as a standalone module (block index // P, slot index % P)."""
    period = len(decoder.cfg.block_pattern)
    graphdef, state = nnx.split(decoder.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[index // period], state))
    return block.layers[index % period]


def test_layerwise_distillation_matches_an_explicit_layer_loop():
    teacher, student = teacher_model(), student_model()
    batch = text_batch(rows=2, seq_len=12, seed=3)
    ids, seg = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["segment_ids"])
    positions = jnp.transpose(jnp.asarray(batch["position_ids"]), (1, 0, 2))
    dec_t, dec_s = teacher.language_model, student.language_model
    cfg = dec_t.cfg
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, mrope_section=cfg.mrope_section,
                            dtype=cfg.compute_dtype)
    hidden = [dec_t.embed(ids)]
    for layer in range(cfg.num_layers):  # the teacher, one layer at a time
        hidden.append(_layer(dec_t, layer)(hidden[-1], cos, sin, segment_ids=seg)[0])
    student_out = [_layer(dec_s, layer)(hidden[layer], cos, sin, segment_ids=seg)[0]
                   for layer in range(cfg.num_layers)]

    stream = residual_stream(dec_t, hidden[0], positions, seg)
    np.testing.assert_allclose(np.asarray(stream), np.stack(hidden), atol=2e-5, rtol=2e-5)
    final, _ = dec_t.hidden_states(ids, position_ids=positions, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(dec_t.norm(stream[-1])), np.asarray(final), atol=2e-5, rtol=2e-5)
    outs = layers_on_inputs(dec_s, stream[:-1], positions, seg)
    np.testing.assert_allclose(np.asarray(outs), np.stack(student_out), atol=2e-5, rtol=2e-5)

    # the stage's loss (through the trainer) = 1000 * mean over all 8 layers (softmax ones included)
    per_layer = [np.mean((np.asarray(s, np.float64) - np.asarray(t, np.float64)) ** 2)
                 for s, t in zip(student_out, hidden[1:])]
    trainer = Trainer(student, train_config("distill_layerwise"), teacher=teacher)
    terms = trainer._loss_terms(nnx.state(student, nnx.Param), {k: jnp.asarray(v) for k, v in batch.items()},
                                trainer.teacher_params)
    np.testing.assert_allclose(float(terms.value), 1000 * np.mean(per_layer), rtol=1e-5)
    # softmax layers are the teacher's own (window 16 >= 12 tokens): zero error; GDN layers are not
    kinds = student.cfg.decoder.layer_types
    assert len(per_layer) == 8
    assert all((err < 1e-10) == (kind == "sliding_attention") for err, kind in zip(per_layer, kinds)), per_layer
