"""LinMU's M-MATE mixer: vision runs and orders, the layer against a float64 reference, cache mode,
packing, the student built from a teacher, the training stages and inference through the engine."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.config import load_config
from infinitevl_jax.convert.student import student_config, student_from_teacher
from infinitevl_jax.convert.torch_params import load_torch_tensors, torch_tensors
from infinitevl_jax.data.tokenizer import ByteTokenizer
from infinitevl_jax.data.positions import rope_index
from infinitevl_jax.infer import DecoderEngine, Request, StreamingSession, chunk_plan, generate
from infinitevl_jax.infer.engine import cache_bytes, run_continuations
from infinitevl_jax.models.config import MMateConfig, VisionLanguageConfig, mmate_layer_types
from infinitevl_jax.models.decoder import Decoder
from infinitevl_jax.models.mmate import MMate
from infinitevl_jax.models.vision_runs import (inverse, permute, scan_order, vision_runs, window_groups,
                                               window_order)
from infinitevl_jax.models.vlm import VisionLanguageModel
from infinitevl_jax.ops.rope import rope_cos_sin
from infinitevl_jax.train.layerwise import residual_stream
from infinitevl_jax.train.step import Trainer, adapt_for_stage, packed_inputs
from infinitevl_jax.train.trainable import param_path
from tests.reference.mmate import mmate as reference_mmate
from tests.train_utils import text_batch, train_config

TINY = VisionLanguageConfig.from_config(load_config("tiny"))
IMAGE, VIDEO = TINY.tokens.image_token_id, TINY.tokens.video_token_id
MMATE = MMateConfig(conv_size=3, window=(2, 2, 2), text_window=5)


def linmu_decoder_config(layers: int = 4):
    return dataclasses.replace(TINY.decoder, layer_types=mmate_layer_types(layers), mmate=MMATE)


def layout(prefix: int = 4):
    """Ids and mRoPE ids of: text, a 3x4 image, text, a 2-frame 2x3 video, text (38 + prefix tokens)."""
    ids = ([7] * prefix + [IMAGE] * 12 + [8, 9, 10] + [VIDEO] * 12 + [11] * 7)
    ids = np.asarray([ids], np.int32)
    positions, _ = rope_index(ids, image_grid_thw=np.array([[1, 6, 8]]), video_grid_thw=np.array([[2, 4, 6]]),
                              image_token_id=IMAGE, video_token_id=VIDEO)
    return ids, positions, (ids == IMAGE) | (ids == VIDEO)


def randomize(module, seed: int, scale: float = 0.3):
    """Every parameter of ``module`` redrawn ~ N(0, scale^2) (gates, dt, mixes all non-trivial)."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                                                    for k, x in zip(keys, leaves)]))


# ---- runs and orders ----

def test_vision_runs_read_grid_coordinates_from_mrope_ids():
    ids, positions, vision = layout()
    runs = vision_runs(jnp.asarray(vision), jnp.asarray(positions))
    image, video = slice(4, 16), slice(19, 31)
    assert np.all(np.asarray(runs.run)[0, image] == 4) and np.all(np.asarray(runs.run)[0, video] == 19)
    assert np.all(np.asarray(runs.run)[0, :4] == -1) and np.all(np.asarray(runs.run)[0, 16:19] == -1)
    np.testing.assert_array_equal(np.asarray(runs.row)[0, image], np.repeat(np.arange(3), 4))
    np.testing.assert_array_equal(np.asarray(runs.col)[0, image], np.tile(np.arange(4), 3))
    np.testing.assert_array_equal(np.asarray(runs.frame)[0, video], np.repeat([0, 1], 6))
    np.testing.assert_array_equal(np.asarray(runs.row)[0, video], np.tile(np.repeat(np.arange(2), 3), 2))
    # a segment boundary inside a vision stretch starts a new run; 1-D positions read one row
    segments = jnp.asarray(np.where(np.arange(ids.shape[1]) < 10, 1, 2)[None])
    split = vision_runs(jnp.asarray(vision), jnp.asarray(positions), segments)
    assert np.all(np.asarray(split.run)[0, 10:16] == 10) and np.asarray(split.row)[0, 12] == 1
    flat = vision_runs(jnp.asarray(vision), jnp.asarray(np.arange(ids.shape[1])[None]))
    np.testing.assert_array_equal(np.asarray(flat.col)[0, image], np.arange(12))


@pytest.mark.parametrize("shifted", [False, True])
def test_orders_move_vision_tokens_only_inside_their_run(shifted):
    _, positions, vision = layout()
    runs = vision_runs(jnp.asarray(vision), jnp.asarray(positions))
    t = np.arange(vision.shape[1])
    for order in (scan_order(runs, column_major=shifted), window_order(runs, (2, 2, 2), shifted)):
        order = np.asarray(order)[0]
        assert sorted(order) == list(t)
        text = ~vision[0]
        np.testing.assert_array_equal(order[text], t[text])
        assert np.all(np.asarray(runs.run)[0, order] == np.asarray(runs.run)[0])  # same run at each place
        x = jnp.asarray(np.random.default_rng(0).normal(size=(1, len(t), 3)))
        back = permute(permute(x, jnp.asarray(order[None])), inverse(jnp.asarray(order[None])))
        np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
    # column-major scan of the 3x4 image, and contiguous 2x2 windows with a fresh name each
    scan = np.asarray(scan_order(runs, column_major=True))[0, 4:16] - 4
    if shifted:
        np.testing.assert_array_equal(scan, np.arange(12).reshape(3, 4).T.ravel())
    order = window_order(runs, (2, 2, 2), shifted)
    groups = np.asarray(window_groups(runs, order, (2, 2, 2), shifted))[0]
    image_groups = groups[4:16]
    assert np.all(np.diff(image_groups) >= 0) and len(set(image_groups)) == (6 if shifted else 4)
    assert np.all(groups[~vision[0]] == -1)


# ---- the layer ----

@pytest.mark.parametrize("shifted", [False, True])
def test_mmate_layer_matches_float64_reference(shifted):
    cfg = linmu_decoder_config()
    layer = MMate(cfg, shifted, rngs=nnx.Rngs(0))
    randomize(layer, seed=1 + shifted)
    ids, positions, vision = layout()
    x = jax.random.normal(jax.random.key(3), (1, ids.shape[1], cfg.hidden_size), jnp.float32)
    cos, sin = rope_cos_sin(jnp.asarray(positions), cfg.head_dim, cfg.rope_theta, mrope_section=cfg.mrope_section,
                            dtype=jnp.float32)
    out, _ = layer(x, cos, sin, vision_runs(jnp.asarray(vision), jnp.asarray(positions)))
    params = {".".join(map(str, k)): np.asarray(v.get_value(), np.float64)
              for k, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    want = reference_mmate(np.asarray(x[0], np.float64), np.asarray(cos[0], np.float64),
                           np.asarray(sin[0], np.float64), vision[0], positions[:, 0], params,
                           heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                           window=MMATE.window, text_window=MMATE.text_window, shifted=shifted, eps=cfg.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(out[0]), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def _random_decoder(layers: int = 4, seed: int = 0) -> Decoder:
    decoder = Decoder(linmu_decoder_config(layers), rngs=nnx.Rngs(seed))
    randomize(decoder, seed + 10, scale=0.2)
    return decoder


def test_cache_mode_and_engine_chunks_equal_the_full_forward():
    decoder = _random_decoder()
    ids, positions, vision = layout(prefix=6)
    full, _ = decoder(jnp.asarray(ids), position_ids=jnp.asarray(positions), vision_mask=jnp.asarray(vision))
    # chunks of 16 must bend around the 12-token runs; the rest continues one token at a time
    engine = DecoderEngine(decoder, chunk_size=16, min_bucket=4)
    prompt = 33  # ends after the video run (a run must arrive whole)
    plan = chunk_plan(prompt, 16, 4, run_continuations(vision[:, :prompt]))
    assert [(s, n) for s, n, _ in plan] == [(0, 6), (6, 15), (21, 12)]
    logits, cache = engine.prefill(decoder.init_cache(1), positions[..., :prompt], input_ids=ids[:, :prompt],
                                   vision_mask=vision[:, :prompt])
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full[0, prompt - 1]), rtol=1e-4, atol=1e-4)
    size = cache_bytes(cache)
    for t in range(prompt, ids.shape[1]):
        step, cache = decoder(jnp.asarray(ids[:, t:t + 1]), position_ids=jnp.asarray(positions[..., t:t + 1]),
                              vision_mask=jnp.asarray(vision[:, t:t + 1]), cache=cache)
        np.testing.assert_allclose(np.asarray(step[0, 0]), np.asarray(full[0, t]), rtol=1e-4, atol=1e-4)
    assert cache_bytes(cache) == size  # the cache never grows
    with pytest.raises(ValueError, match="longer than the prefill chunk_size"):
        chunk_plan(prompt, 8, 4, run_continuations(vision[:, :prompt]))


def test_left_padded_batch_rows_equal_unpadded_rows():
    decoder = _random_decoder(layers=2)
    ids, positions, vision = layout()
    short_ids, short_pos, short_vision = layout(prefix=1)
    pad = ids.shape[1] - short_ids.shape[1]
    batch_ids = np.concatenate([ids, np.pad(short_ids, ((0, 0), (pad, 0)))])
    batch_pos = np.concatenate([positions, np.pad(short_pos, ((0, 0), (0, 0), (pad, 0)))], axis=1)
    batch_vision = np.concatenate([vision, np.pad(short_vision, ((0, 0), (pad, 0)))])
    engine = DecoderEngine(decoder, chunk_size=32, min_bucket=4)
    logits, _ = engine.prefill(decoder.init_cache(2, left_padding=[0, pad]), batch_pos, input_ids=batch_ids,
                               vision_mask=batch_vision)
    for row, (i, p, v) in enumerate(((ids, positions, vision), (short_ids, short_pos, short_vision))):
        alone, _ = decoder(jnp.asarray(i), position_ids=jnp.asarray(p), vision_mask=jnp.asarray(v))
        np.testing.assert_allclose(np.asarray(logits[row]), np.asarray(alone[0, -1]), rtol=1e-4, atol=1e-4)


def test_packed_sequences_do_not_see_each_other():
    decoder = _random_decoder(layers=2)
    first, second = layout(prefix=2), layout(prefix=5)
    packed = [np.concatenate([a, b], axis=-1) for a, b in zip(first, second)]
    segments = np.concatenate([np.ones(first[0].shape[1]), 2 * np.ones(second[0].shape[1])]).astype(np.int32)[None]
    out, _ = decoder(jnp.asarray(packed[0]), position_ids=jnp.asarray(packed[1]), vision_mask=jnp.asarray(packed[2]),
                     segment_ids=jnp.asarray(segments))
    n = first[0].shape[1]
    for part, (i, p, v) in ((slice(0, n), first), (slice(n, None), second)):
        alone, _ = decoder(jnp.asarray(i), position_ids=jnp.asarray(p), vision_mask=jnp.asarray(v))
        np.testing.assert_allclose(np.asarray(out[0, part]), np.asarray(alone[0]), rtol=1e-4, atol=1e-4)


# ---- the student of a teacher ----

def _teacher(seed: int = 0) -> VisionLanguageModel:
    cfg = dataclasses.replace(TINY, decoder=dataclasses.replace(TINY.decoder, layer_types=("full_attention",) * 4))
    teacher = VisionLanguageModel(cfg, rngs=nnx.Rngs(seed))
    randomize(teacher.language_model, seed + 1, scale=0.2)
    return teacher


def test_student_starts_from_the_teachers_attention():
    teacher = _teacher()
    cfg = student_config(teacher.cfg, arch="linmu", mmate=MMateConfig(conv_size=4, window=(1, 2, 2), text_window=64))
    student = student_from_teacher(teacher, cfg, seed=0)
    assert student.cfg.decoder.layer_types == mmate_layer_types(4)
    t_layers, s_layers = teacher.language_model.blocks.layers, student.language_model.blocks.layers
    for layer in range(4):
        attention = t_layers[0].mixer
        mixer = s_layers[layer % 2].mixer
        block = layer // 2
        for new, old in (("x_proj", "v_proj"), ("B_proj", "k_proj"), ("C_proj", "q_proj")):
            np.testing.assert_array_equal(getattr(mixer.flex_ma, new).kernel[...][block],
                                          getattr(attention, old).kernel[...][layer])
            np.testing.assert_array_equal(getattr(mixer.flex_ma, new).bias[...][block],
                                          getattr(attention, old).bias[...][layer])
        np.testing.assert_array_equal(mixer.flex_ma.out_proj.kernel[...][block], attention.o_proj.kernel[...][layer])
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            np.testing.assert_array_equal(getattr(mixer.local_swin, name).kernel[...][block],
                                          getattr(attention, name).kernel[...][layer])
    # with the mix all on Local-Swin and a text window longer than the text, the student is the teacher
    for layer in s_layers:
        layer.mixer.mix_proj.bias[...] = jnp.full_like(layer.mixer.mix_proj.bias[...], -1e4)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, (2, 40)))
    want, _ = teacher.language_model(ids)
    got, _ = student.language_model(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_export_names_round_trip():
    source = _teacher_student(seed=0)
    target = _teacher_student(seed=1)
    tensors = torch_tensors(source)
    assert "model.layers.1.self_attn.flex_ma.B_conv1d.weight" in tensors
    assert "model.layers.0.self_attn.local_swin.q_proj.bias" in tensors
    load_torch_tensors(target, tensors)
    flat = lambda m: jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, flat(target), flat(source))


@functools.cache
def _teacher_student(seed: int = 0) -> VisionLanguageModel:
    teacher = _teacher()
    return student_from_teacher(teacher, student_config(teacher.cfg, arch="linmu", mmate=MMATE), seed=seed)


# ---- training stages ----

def _layer_branch(path):
    """'flex_ma', 'local_swin', 'mix_proj' or None for a parameter path of the student."""
    if path[:3] == ("language_model", "blocks", "layers") and path[4] == "mixer":
        return path[5]
    return None


@pytest.mark.parametrize("stage", ["linmu_flex_ma", "linmu_local_swin", "linmu_lora"])
def test_linmu_stages_train_their_branches(stage):
    model = nnx.clone(_teacher_student())
    cfg = train_config(stage, **({"lora.rank": 2, "lora.alpha": 4.0} if stage == "linmu_lora" else {}))
    assert adapt_for_stage(model, cfg) == (3 * 2 if stage == "linmu_lora" else 0)  # gate/up/down x 2 slots
    trainer = Trainer(model, cfg, teacher=_teacher())
    flags = {param_path(p): bool(on.get_value() if hasattr(on, "get_value") else on)
             for p, on in jax.tree_util.tree_flatten_with_path(trainer.mask)[0]}
    branches = {"linmu_flex_ma": {"flex_ma", "mix_proj"}}.get(stage, {"flex_ma", "mix_proj", "local_swin"})
    for path, on in flags.items():
        lora = path[-1] in ("lora_a", "lora_b")
        assert on == (_layer_branch(path) in branches and not lora or (stage == "linmu_lora" and lora)), path
    state = trainer.init(model)
    batch = text_batch(seed=3)
    state, metrics = trainer.step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_hidden_kl_is_logit_kl_plus_hidden_state_mse():
    model, teacher = _teacher_student(), _teacher()
    cfg = train_config("linmu_flex_ma", mse_factor=10.0)
    batch = text_batch(rows=4, seed=6)
    trainer = Trainer(model, cfg, teacher=teacher)
    _, metrics = trainer.step(trainer.init(model), batch)

    def run(m):
        x = packed_inputs(m, batch)
        stream = residual_stream(m.language_model, x.embeds, x.position_ids, x.segment_ids, x.vision_mask)
        return np.asarray(stream, np.float64), np.asarray(m.language_model(**x.decoder_kwargs())[0], np.float64)

    (s_stream, s_logits), (t_stream, t_logits) = run(model), run(teacher)
    log_softmax = lambda z: z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True)) - z.max(
        -1, keepdims=True)
    log_pt, log_ps = log_softmax(t_logits / 2.0), log_softmax(s_logits / 2.0)
    kl = 4.0 * np.sum(np.exp(log_pt) * (log_pt - log_ps)) / 4
    mse = 10.0 * np.mean((s_stream[1:] - t_stream[1:]) ** 2)
    np.testing.assert_allclose(float(metrics["loss"]), kl + mse, rtol=1e-4)
    # micro-batches add numerators and denominators exactly
    _, accumulated = Trainer(model, train_config("linmu_flex_ma", mse_factor=10.0, microbatches=2),
                             teacher=teacher).step(trainer.init(model), batch)
    np.testing.assert_allclose(float(accumulated["loss"]), float(metrics["loss"]), rtol=1e-5)


# ---- inference ----

def test_generation_and_streaming_with_mmate_layers():
    cfg = dataclasses.replace(TINY, decoder=linmu_decoder_config())
    model = VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
    randomize(model.language_model, 4, scale=0.2)
    engine = DecoderEngine(model.language_model, chunk_size=32)
    rng = np.random.default_rng(0)
    image = (rng.random((56, 84, 3)) * 255).astype(np.uint8)
    requests = [Request("What is it?", (image,)), Request("Hello there, how are you?")]
    batch = generate(model, ByteTokenizer(), requests, max_new_tokens=5, engine=engine)
    alone = [generate(model, ByteTokenizer(), [r], max_new_tokens=5, engine=engine)[0] for r in requests]
    assert [a.token_ids for a in batch] == [a.token_ids for a in alone]

    session = StreamingSession(model, ByteTokenizer(), engine=engine, frame_size=56)
    session.push_frame((rng.random((60, 70, 3)) * 255).astype(np.uint8), 0.0)
    size = cache_bytes(session.cache)
    for i in range(1, 4):
        session.push_frame((rng.random((60, 70, 3)) * 255).astype(np.uint8), 0.5 * i)
    assert cache_bytes(session.cache) == size
    answer = session.ask("What moved?", max_new_tokens=4)
    assert answer.token_ids == session.ask("What moved?", max_new_tokens=4).token_ids  # the stream is untouched
