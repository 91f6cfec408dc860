"""Inference: sampling, chunked prefill + compiled-once decoding, batched generation, streaming
session, CLI (tiny models on the CPU)."""

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx
from PIL import Image

from infinitevl_jax.cli import main
from infinitevl_jax.config import load_config
from infinitevl_jax.data import ImageProcessor
from infinitevl_jax.data.tokenizer import ByteTokenizer
from infinitevl_jax.infer import (DecoderEngine, Request, SamplingConfig, StreamingSession, cache_bytes, chunk_plan,
                                  generate, generate_tokens)
from infinitevl_jax.infer.commands import parse_ask, stream_times
from infinitevl_jax.infer.engine import full_attention_capacity
from infinitevl_jax.infer.sampling import filter_logits, sample_tokens
from infinitevl_jax.infer.session import chat_turn_parts
from infinitevl_jax.models import Decoder, DecoderConfig
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel


def softmax(z):
    z = z - z[np.isfinite(z)].max()
    e = np.where(np.isfinite(z), np.exp(z), 0.0)
    return e / e.sum()


def filtered_probs_ref(logits, temperature, top_k, top_p):
    """Float64: temperature, then top-k, then top-p over the renormalised rest (HF's order)."""
    z = np.asarray(logits, np.float64) / temperature
    if top_k:
        z = np.where(z >= np.sort(z)[::-1][top_k - 1], z, -np.inf)
    if top_p < 1:
        order = np.argsort(-z)
        p = softmax(z)[order]
        keep = np.zeros(z.shape, bool)
        keep[order] = (np.cumsum(p) - p) < top_p
        z = np.where(keep, z, -np.inf)
    return softmax(z)


# ------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.9, 4, 0.8)])
def test_filter_matches_float64_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 11)) * 2
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = np.asarray(jax.nn.softmax(filter_logits(jnp.asarray(logits, jnp.float32), cfg), axis=-1))
    for row in range(3):
        np.testing.assert_allclose(probs[row], filtered_probs_ref(logits[row], temperature, top_k, top_p), atol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = jnp.asarray([[1.0, 0.2, -0.5, 2.0, 0.0, -3.0]])
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, cfg))(keys))[:, 0]
    freq = np.bincount(draws, minlength=6) / draws.size
    ref = filtered_probs_ref(np.asarray(logits[0]), 0.8, 5, 0.9)
    assert ref[5] == 0 and freq[5] == 0  # cut by top-k
    np.testing.assert_allclose(freq, ref, atol=0.015)  # 4 standard deviations at n = 20000
    again = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, cfg))(keys))[:, 0]
    np.testing.assert_array_equal(draws, again)  # explicit keys: reproducible


def test_greedy_top_k_one_and_vocab_limit():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 50)), jnp.float32)
    greedy = np.asarray(sample_tokens(logits, None, SamplingConfig()))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    top1 = sample_tokens(logits, jax.random.key(3), SamplingConfig(temperature=1.0, top_k=1))
    np.testing.assert_array_equal(top1, greedy)
    limited = np.asarray(sample_tokens(logits, None, SamplingConfig(), vocab_limit=10))
    np.testing.assert_array_equal(limited, np.argmax(np.asarray(logits)[:, :10], -1))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="vocab_limit"):
        sample_tokens(logits, None, SamplingConfig(), vocab_limit=51)


def test_chunk_plan_uses_a_fixed_set_of_shapes():
    assert chunk_plan(37, 16) == [(0, 16, 16), (16, 16, 16), (32, 5, 16)]
    assert chunk_plan(100, 64) == [(0, 64, 64), (64, 36, 64)]
    assert chunk_plan(3, 4096) == [(0, 3, 16)]
    assert chunk_plan(300, 4096) == [(0, 300, 512)]
    shapes = {padded for n in range(1, 5000) for _, _, padded in chunk_plan(n, 1024)}
    assert shapes == {16, 32, 64, 128, 256, 512, 1024}


# ------------------------------------------------------------------------------------------------
# Decoder engine


def tiny_decoder(**changes):
    cfg = dataclasses.replace(DecoderConfig.from_dict(load_config("tiny").model), **changes)
    return Decoder(cfg, rngs=nnx.Rngs(1))


@nnx.jit
def full_logits(model, ids):
    return model(ids)[0]


@pytest.mark.parametrize("unroll_layers", [False, True], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("layer_types", [None, ("full_attention",) * 2], ids=["hybrid", "teacher"])
def test_incremental_decoding_equals_full_forward(layer_types, unroll_layers):
    """Prefill 37 tokens in chunks of 16, decode 20 greedily (the 16-token window wraps): every
    generated token is the argmax of the full (scanned) forward over prompt + generated tokens,
    whether the engine scans the stacked blocks or runs them unstacked and unrolled (GPU's way)."""
    decoder = tiny_decoder() if layer_types is None else tiny_decoder(layer_types=layer_types)
    prompt = np.random.default_rng(2).integers(0, 512, (1, 37)).astype(np.int32)
    engine = DecoderEngine(decoder, chunk_size=16, unroll_layers=unroll_layers)
    assert isinstance(engine.decoder.blocks, nnx.List) == unroll_layers
    assert not isinstance(decoder.blocks, nnx.List)  # the caller's decoder stays stacked
    positions = np.broadcast_to(np.arange(37, dtype=np.int32), (3, 1, 37))
    logits, cache = engine.prefill(decoder.init_cache(1, 60), positions, input_ids=prompt)
    result = generate_tokens(engine, cache, logits, [37], [0], max_new_tokens=20, key=jax.random.key(0))
    tokens = result.tokens[0]
    full = np.asarray(full_logits(decoder, jnp.asarray(np.concatenate([prompt[0], tokens[:-1]])[None])))[0]
    np.testing.assert_allclose(logits[0], full[36], atol=2e-5 * np.abs(full).max())
    np.testing.assert_array_equal(tokens, np.argmax(full[36:], -1))
    top2 = np.sort(full[36:], -1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 1e-4  # no near-tie: the equality above is meaningful
    assert int(result.cache.index) == 37 + 19 and result.finish_reasons == ["length"]


@pytest.mark.parametrize("unroll_layers", [False, True], ids=["scanned", "unrolled"])
def test_reload_weights_takes_the_source_decoders_current_weights(unroll_layers):
    decoder = tiny_decoder()
    engine = DecoderEngine(decoder, chunk_size=16, unroll_layers=unroll_layers)
    prompt = np.random.default_rng(5).integers(0, 512, (1, 9)).astype(np.int32)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), (3, 1, 9))
    prefill = lambda: np.asarray(engine.prefill(decoder.init_cache(1), positions, input_ids=prompt)[0])
    before = prefill()
    layer = decoder.blocks.layers[1].mlp.down_proj.kernel
    layer[...] = layer[...] * 3.0
    if unroll_layers:  # its own copy of the old weights (a scanned engine shares the decoder's arrays)
        np.testing.assert_array_equal(prefill(), before)
    engine.reload_weights()
    expected = np.asarray(full_logits(decoder, jnp.asarray(prompt)))[0, -1]
    np.testing.assert_allclose(prefill()[0], expected, atol=2e-5 * np.abs(expected).max())
    assert np.abs(expected - before[0]).max() > 1e-3  # the change is visible
    assert engine.compile_counts()["prefill"] == 1


def test_unrolled_engine_does_not_keep_the_stacked_weights_alive():
    """Once the caller drops the stacked decoder its weights are freed (the engine's unrolled copy
    is the only one left), the engine still runs, and reload_weights says why it cannot."""
    decoder = tiny_decoder()
    engine = DecoderEngine(decoder, chunk_size=16, unroll_layers=True)
    prompt = np.random.default_rng(6).integers(0, 512, (1, 9)).astype(np.int32)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), (3, 1, 9))
    prefill = lambda: np.asarray(engine.prefill(engine.decoder.init_cache(1), positions, input_ids=prompt)[0])
    before = prefill()
    stacked_kernel = weakref.ref(decoder.blocks.layers[1].mlp.down_proj.kernel[...])
    del decoder
    gc.collect()
    assert stacked_kernel() is None
    np.testing.assert_array_equal(prefill(), before)
    with pytest.raises(RuntimeError, match="no longer exists"):
        engine.reload_weights()


def test_decode_compiles_once_and_cache_size_is_constant():
    """200 decode steps (fill levels 40..239, the ring wraps 13 times) and a second prompt reuse one
    compiled step; the cache has the same bytes after 100 and after 10,000 tokens."""
    decoder = tiny_decoder()
    engine = DecoderEngine(decoder, chunk_size=2048)
    rng = np.random.default_rng(3)
    for length in (40, 75):
        prompt = rng.integers(0, 512, (1, length)).astype(np.int32)
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (3, 1, length))
        logits, cache = engine.prefill(decoder.init_cache(1), positions, input_ids=prompt)
        result = generate_tokens(engine, cache, logits, [length], [0], max_new_tokens=200, key=jax.random.key(1),
                                 sampling=SamplingConfig(temperature=1.0))
        assert len(result.tokens[0]) == 200
    assert engine.compile_counts() == {"prefill": 2, "decode": 1}  # buckets 64 and 128; one step

    ids = rng.integers(0, 512, (1, 10_000)).astype(np.int32)
    positions = np.broadcast_to(np.arange(10_000, dtype=np.int32), (3, 1, 10_000))
    _, after_100 = engine.prefill(decoder.init_cache(1), positions[..., :100], input_ids=ids[:, :100])
    _, after_10k = engine.prefill(after_100, positions[..., 100:], input_ids=ids[:, 100:])
    assert int(after_100.index) == 100 and int(after_10k.index) == 10_000
    assert cache_bytes(after_100) == cache_bytes(after_10k) == cache_bytes(decoder.init_cache(1))
    shapes = lambda c: jax.tree.map(lambda a: (a.shape, a.dtype), c)
    assert shapes(after_100) == shapes(after_10k)


def test_decode_step_updates_the_cache_in_place():
    """The scanned decode step carries the cache through the layer scan and updates it where it
    lies: XLA's scratch for a bf16 step stays below the (donated) cache's own size (4 MiB here;
    with the cache as the scan's xs -> ys it was three times the cache)."""
    decoder = tiny_decoder(layer_types=("full_attention",) * 8, dtype="bfloat16", param_dtype="bfloat16")
    engine = DecoderEngine(decoder, chunk_size=16, unroll_layers=False)
    cache = decoder.init_cache(1, 4096)
    memory = engine.compiled_decode(cache).memory_analysis()
    assert memory.alias_size_in_bytes == cache_bytes(cache)
    assert memory.temp_size_in_bytes < cache_bytes(cache)


def test_compiled_prefill_is_the_program_prefill_runs():
    """``compiled_prefill`` gives the chunk program ``prefill`` runs: called on a chunk it returns
    the same logits, and with donation its output cache aliases the input's buffers."""
    decoder = tiny_decoder()
    engine = DecoderEngine(decoder, chunk_size=16)
    ids = np.random.default_rng(5).integers(0, 512, (1, 16)).astype(np.int32)
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), (3, 1, 16))
    expected, _ = engine.prefill(decoder.init_cache(1), positions, input_ids=ids)
    compiled = engine.compiled_prefill(decoder.init_cache(1), 16, donate=False)
    logits, _ = compiled(engine._leaves, decoder.init_cache(1), ids, positions, np.zeros((1, 16), bool), np.int32(16))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(expected))
    donating = engine.compiled_prefill(decoder.init_cache(1), 16).memory_analysis()
    assert donating.alias_size_in_bytes == cache_bytes(decoder.init_cache(1))


def test_stop_tokens_end_each_row():
    decoder = tiny_decoder()
    engine = DecoderEngine(decoder, chunk_size=16)
    prompt = np.random.default_rng(4).integers(0, 512, (2, 12)).astype(np.int32)
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), (3, 2, 12))

    def run(stop_ids):
        logits, cache = engine.prefill(decoder.init_cache(2), positions, input_ids=prompt)
        return generate_tokens(engine, cache, logits, [12, 12], [0, 0], max_new_tokens=12, key=jax.random.key(0),
                               stop_ids=stop_ids)

    free = run(())
    stop = free.tokens[0][4]
    first = free.tokens[0].index(stop)
    stopped = run([stop])
    assert stopped.tokens[0] == free.tokens[0][:first] and stopped.finish_reasons[0] == "stop"
    row1 = free.tokens[1][:free.tokens[1].index(stop)] if stop in free.tokens[1] else free.tokens[1]
    assert stopped.tokens[1] == row1


def test_prefill_inputs_are_checked():
    decoder = tiny_decoder(layer_types=("full_attention",) * 2)
    engine = DecoderEngine(decoder, chunk_size=16)
    assert full_attention_capacity(decoder, decoder.init_cache(1, 33)) == 33
    assert full_attention_capacity(tiny_decoder(), tiny_decoder().init_cache(1)) is None
    with pytest.raises(ValueError, match="position_ids"):
        engine.prefill(decoder.init_cache(1, 33), np.zeros((3, 1, 5), np.int32), input_ids=np.zeros((1, 6), np.int32))
    with pytest.raises(ValueError, match="exactly one"):
        engine.prefill(decoder.init_cache(1, 33), np.zeros((3, 1, 5), np.int32))
    with pytest.raises(ValueError, match="rows"):
        engine.prefill(decoder.init_cache(2, 33), np.zeros((3, 1, 5), np.int32), input_ids=np.zeros((1, 5), np.int32))


def test_teacher_cache_overrun_is_an_error():
    """A full-attention cache holds max_len tokens; generation and sessions refuse to wrap it."""
    cfg = load_config("tiny", ["--config.model.layer_types=('full_attention', 'full_attention')"])
    teacher = VisionLanguageModel(VisionLanguageConfig.from_config(cfg), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="full-attention cache holds 20 tokens"):
        generate(teacher, ByteTokenizer(), [Request("Hi")], max_new_tokens=4, max_len=20)
    with pytest.raises(ValueError, match="full-attention cache holds 20 tokens"):
        StreamingSession(teacher, ByteTokenizer(), max_len=20)


# ------------------------------------------------------------------------------------------------
# Multimodal generation and the streaming session


@pytest.fixture(scope="module")
def vlm():
    cfg = VisionLanguageConfig.from_config(load_config("tiny"))
    model = VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
    return model, DecoderEngine(model.language_model, chunk_size=32)


def test_padded_batch_rows_generate_what_they_generate_alone(vlm):
    model, engine = vlm
    image = (np.random.default_rng(5).random((56, 84, 3)) * 255).astype(np.uint8)
    requests = [Request("What is it?", (image,)), Request("Hello there, how are you doing today?"), Request("Hi")]
    batch = generate(model, ByteTokenizer(), requests, max_new_tokens=8, engine=engine)
    alone = [generate(model, ByteTokenizer(), [r], max_new_tokens=8, engine=engine)[0] for r in requests]
    assert [a.prompt_tokens for a in batch] == [76, 94, 59]
    for together, single in zip(batch, alone):
        assert together.token_ids == single.token_ids and len(single.token_ids) == 8


def frame(seed, size=(60, 70)):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def test_session_answer_equals_a_fresh_prefill_of_the_same_content(vlm):
    """Six frames pushed at 0.5 s steps, then a question: the positions fed are rope_index's for
    the same content written as one video (grid (6, 4, 4), 0.5 s per grid), and the answer equals
    the one from one fresh prefill of that content (24 frame tokens + text: well past the
    16-token window). The stream itself is untouched by asking."""
    model, engine = vlm
    tokenizer = ByteTokenizer()
    fed, prefill = [], engine.prefill

    def recording_prefill(cache, positions, **inputs):
        fed.append(np.asarray(positions))
        return prefill(cache, positions, **inputs)

    engine.prefill = recording_prefill
    try:
        session = StreamingSession(model, tokenizer, engine=engine, frame_size=56)
        for i in range(6):
            session.push_frame(frame(i), 0.5 * i)
        before = jax.tree.leaves(session.cache)
        answer = session.ask("What moved?", max_new_tokens=6)
        first_ask = list(fed)  # the stream's pushes and the question (the second ask is left out)
        assert all(a is b for a, b in zip(before, jax.tree.leaves(session.cache)))  # nothing replaced
        assert session.ask("What moved?", max_new_tokens=6).token_ids == answer.token_ids
    finally:
        engine.prefill = prefill

    prefix, suffix = chat_turn_parts("You are a helpful assistant.")
    text = prefix + "<|vision_start|>" + "<|video_pad|>" * 24 + "<|vision_end|>" + "What moved?" + suffix
    ids = np.asarray([tokenizer.encode(text)], np.int32)
    processor = ImageProcessor()
    rows = [processor([Image.fromarray(frame(i)).resize((56, 56), Image.Resampling.BICUBIC)])["pixel_values"]
            for i in range(6)]
    reference = model.prepare(ids, pixel_values_videos=np.concatenate(rows), video_grid_thw=[[6, 4, 4]],
                              second_per_grid_ts=[0.5])
    np.testing.assert_array_equal(np.concatenate(first_ask, axis=-1), reference.position_ids)
    assert session.tokens_seen + answer.prompt_tokens == ids.shape[1]  # ask() added its turn to a copy only

    fresh = DecoderEngine(model.language_model, chunk_size=256)
    logits, cache = fresh.prefill(model.language_model.init_cache(1), reference.position_ids,
                                  inputs_embeds=reference.embeds)
    full = np.asarray(model.language_model(inputs_embeds=reference.embeds, position_ids=reference.position_ids)[0])
    np.testing.assert_allclose(logits[0], full[0, -1], atol=2e-5 * np.abs(full).max())
    expected = generate_tokens(fresh, cache, logits, [ids.shape[1]], reference.rope_deltas.reshape(-1),
                               max_new_tokens=6, key=jax.random.key(0), stop_ids=[tokenizer.eos_id],
                               vocab_limit=tokenizer.vocab_size)
    assert answer.token_ids == expected.tokens[0]

    session.push_frame(frame(9), 3.0)  # the stream goes on after asking: 4 more frame tokens
    assert session.tokens_seen + answer.prompt_tokens == ids.shape[1] + 4
    assert all(leaf.is_deleted() for leaf in before)  # pushes donate the stream's cache: no second copy


def test_session_rejects_frames_out_of_order(vlm):
    model, engine = vlm
    session = StreamingSession(model, ByteTokenizer(), engine=engine, frame_size=56)
    session.push_frame(frame(0), 2.0)
    with pytest.raises(ValueError, match="time order"):
        session.push_frame(frame(1), 1.0)


# ------------------------------------------------------------------------------------------------
# CLI


def test_parse_ask_and_stream_schedule():
    assert parse_ask("t=30s:what is on the table?") == (30.0, "what is on the table?")
    assert parse_ask("t=1m30s: and now?") == (90.0, "and now?")
    assert parse_ask("t=2.5:x") == (2.5, "x")
    with pytest.raises(ValueError, match="t=30s"):
        parse_ask("30s:question")
    assert stream_times(12, 4.0, 2.0) == [(0.0, 0), (0.5, 2), (1.0, 4), (1.5, 6), (2.0, 8), (2.5, 10)]
    assert [i for _, i in stream_times(5, 2.0, 10.0)] == [0, 1, 2, 3, 4]


def test_generate_and_stream_commands(tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(frame(0)).save(image)
    assert main(["generate", "--config", "tiny", "--image", str(image), "--prompt", "what shape?",
                 "--max-new-tokens", "3", "--chunk-size", "64", "--temperature", "0.8", "--top-p", "0.9"]) == 0
    captured = capsys.readouterr()
    assert "prompt tokens" in captured.err and "new tokens" in captured.err

    video = tmp_path / "clip.gif"
    frames = [Image.fromarray(frame(i)) for i in range(4)]
    frames[0].save(video, save_all=True, append_images=frames[1:], duration=250, loop=0)
    assert main(["stream", "--config", "tiny", "--video", str(video), "--frame-size", "56", "--fps", "4",
                 "--ask", "t=0.5s:what moved?", "--max-new-tokens", "3", "--chunk-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "Q: what moved?" in out and "FPS" in out and "4 frames" in out
