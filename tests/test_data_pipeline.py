"""The training data pipeline: chat template and label mask, sources, quickstart tokenizer, vision
budget, sequence packing (a packed batch through the tiny model equals each example run alone),
and the grain pipeline (deterministic order, per-host shards, checkpoint / resume)."""

import json
import os
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infinitevl_jax.config import apply_overrides, load_config
from infinitevl_jax.data import ImageProcessor, VideoProcessor
from infinitevl_jax.data.chat_template import (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Conversation, Message,
                                               render_pieces, render_text)
from infinitevl_jax.data.examples import ExampleEncoder
from infinitevl_jax.data import packing
from infinitevl_jax.data.packing import BatchPlanner, PackingSpec, assemble_batch
from infinitevl_jax.data.pipeline import build_dataset, default_data_config, make_tokenizer
from infinitevl_jax.data.sources import EasyVqaSource, LlavaSource, TfdsSource
from infinitevl_jax.data.tokenizer import ByteTokenizer, HFTokenizer, chat_prompt
from infinitevl_jax.data.train_tokenizer import QUICKSTART_TOKENIZER, quickstart_tokenizer, write_quickstart_tokenizer
from infinitevl_jax.data.vision_budget import VisionBudget, footprint, padded_layout
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vision import vision_layout
from infinitevl_jax.models.vlm import VisionLanguageModel

CFG = VisionLanguageConfig.from_config(load_config("tiny"))
TOK = quickstart_tokenizer()
ENCODER = ExampleEncoder(TOK, CFG.tokens, CFG.vision, ImageProcessor(min_pixels=28 * 28, max_pixels=84 * 112),
                         VideoProcessor(min_pixels=28 * 28, max_pixels=56 * 84))


def _image(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _spec(rows, seq_len, patches):
    budget = VisionBudget.for_config(CFG.vision, patches)
    return PackingSpec(rows=rows, seq_len=seq_len, tokens=CFG.tokens, vision=CFG.vision, budget=budget)


# ---------------------------------------------------------------------------------------------
# Chat template and tokenisation


def test_one_turn_template_is_chat_prompt():
    for system in ("You are a helpful assistant.", "Answer in one word."):
        text = render_text([Message("user", "What shape?")], system=system, add_generation_prompt=True)
        assert text == chat_prompt("What shape?", system=system)


def test_label_mask_covers_assistant_text_and_im_end():
    conversation = Conversation((Message("system", "Be brief."), Message("user", "is there a circle?"),
                                 Message("assistant", "yes"), Message("user", "what color is it?"),
                                 Message("assistant", "The circle is  red.\n")))
    example = ENCODER(conversation)
    ids, labels = example.input_ids, example.label_mask
    assert TOK.decode(ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nis there a circle?"
                               "<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n<|im_start|>user\nwhat color is "
                               "it?<|im_end|>\n<|im_start|>assistant\nThe circle is  red.\n<|im_end|>\n")
    # the label runs, decoded: exactly each assistant message plus its closing <|im_end|>
    edges = np.flatnonzero(np.diff(np.concatenate([[0], labels.astype(int), [0]])))
    runs = [TOK.decode(ids[lo:hi]) for lo, hi in zip(edges[::2], edges[1::2])]
    assert runs == ["yes<|im_end|>", "The circle is  red.\n<|im_end|>"]
    assert [t for t, is_label in render_pieces(conversation.messages) if is_label] == runs
    np.testing.assert_array_equal(example.position_ids, np.broadcast_to(np.arange(len(ids)), (3, len(ids))))


def test_image_placeholders_expand_and_positions_follow_the_grid():
    conversation = Conversation((Message("user", IMAGE_PLACEHOLDER + "what is the shape?"),
                                 Message("assistant", "circle")), images=(_image(0, (56, 84)),))
    example = ENCODER(conversation)
    pad = CFG.tokens.image_token_id
    start = int(np.flatnonzero(example.input_ids == pad)[0])
    assert example.vision["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert int((example.input_ids == pad).sum()) == 6  # 4 x 6 patches -> 2 x 3 merged tokens
    # merged token (y, x) sits at (start, start + y, start + x); the text resumes at start + 3
    expected = np.array([[start] * 6, [start + y for y in (0, 0, 0, 1, 1, 1)], [start + x for x in (0, 1, 2) * 2]])
    np.testing.assert_array_equal(example.position_ids[:, start:start + 6], expected)
    assert example.position_ids[:, start + 6].tolist() == [start + 3] * 3


def test_conversation_errors_name_the_record():
    with pytest.raises(ValueError, match="rec7: the messages hold 1 image placeholders but the record has 0"):
        Conversation((Message("user", IMAGE_PLACEHOLDER),), name="rec7")
    with pytest.raises(ValueError, match="rec8: message 1 .assistant. holds an image"):
        Conversation((Message("user", "hi"), Message("assistant", IMAGE_PLACEHOLDER)), images=("a.png",), name="rec8")
    missing = Conversation((Message("user", IMAGE_PLACEHOLDER), Message("assistant", "x")), images=("/no/a.png",),
                           name="rec9")
    with pytest.raises(FileNotFoundError, match="rec9: image file not found: '/no/a.png'"):
        ENCODER(missing)


def test_tokenizer_and_model_ids_must_agree():
    other = VisionLanguageConfig.from_config(load_config("tiny", ["--config.tokens.image_token_id=300"]))
    with pytest.raises(ValueError, match=r"<\|image_pad\|>: tokenizer id 262, config image_token_id = 300"):
        ExampleEncoder(TOK, other.tokens, other.vision, ImageProcessor(), VideoProcessor())


# ---------------------------------------------------------------------------------------------
# Quickstart tokenizer


def test_quickstart_tokenizer_regenerates_bit_identically(tmp_path):
    path = write_quickstart_tokenizer(str(tmp_path / "tokenizer.json"))
    with open(path, "rb") as fresh, open(QUICKSTART_TOKENIZER, "rb") as shipped:
        assert fresh.read() == shipped.read()


def test_quickstart_tokenizer_layout_and_round_trip():
    tok = make_tokenizer("quickstart")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 386 <= CFG.decoder.vocab_size
    assert tok.special_ids == ByteTokenizer().special_ids  # ids 256..263, the tiny preset's
    assert [tok.encode(bytes([b]).decode("latin-1"))[-1] for b in (65, 97, 32)] == [65, 97, 32]
    for text in ("what is the blue shape?", "Ünïcödé ✓ 🚀\t\r\n  x", "<|im_start|>user\nhi<|im_end|>\n", "  ",
                 "a<|image_pad|><|image_pad|>b"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(" rectangle")) == 1 and len(tok.encode("<|im_start|>assistant\n")) == 3


# ---------------------------------------------------------------------------------------------
# Sources


def test_easy_vqa_source():
    train, test = EasyVqaSource("train"), EasyVqaSource("test")
    assert (len(train), len(test)) == (38575, 9673)
    conversation = train[0]
    assert [(m.role, m.text) for m in conversation.messages] == [
        ("user", IMAGE_PLACEHOLDER + "what is the blue shape?"), ("assistant", "rectangle")]
    assert conversation.images[0].endswith("easy_vqa/data/train/images/0.png")


def _write_gif(path, frames=4):
    images = [_image(20 + i, (56, 84)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=500)


def test_llava_json_and_jsonl(tmp_path):
    _image(1, (56, 56)).save(tmp_path / "a.png")
    (tmp_path / "imgs").mkdir()
    _image(2, (56, 84)).save(tmp_path / "imgs" / "b.png")
    _write_gif(tmp_path / "clip.gif")
    records = [
        {"id": "r0", "image": "a.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}]},
        {"image": ["a.png", "imgs/b.png"], "video": "clip.gif",
         "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Compare."},
                           {"from": "gpt", "value": "same"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    lines = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Look: "},
                                                        {"type": "image", "image": "imgs/b.png"},
                                                        {"type": "text", "text": " and "},
                                                        {"type": "video", "video": "clip.gif"}]},
                           {"role": "assistant", "content": "ok"}]},
             {"messages": [{"role": "user", "content": "<image>A<video>"}, {"role": "assistant", "content": "B"}],
              "images": ["a.png"], "videos": ["clip.gif"]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")

    json_source, jsonl_source = LlavaSource(str(tmp_path / "data.json")), LlavaSource(str(tmp_path / "data.jsonl"))
    first, second = json_source[0], json_source[1]
    assert [m.text for m in first.messages] == [IMAGE_PLACEHOLDER + "\nWhat is it?", "noise"]
    assert first.images == (str(tmp_path / "a.png"),) and "(id r0)" in first.name
    # untagged media open the first user turn: images, then videos
    assert [(m.role, m.text) for m in second.messages] == [
        ("system", "S"), ("user", 2 * IMAGE_PLACEHOLDER + VIDEO_PLACEHOLDER + "Compare."), ("assistant", "same")]
    parts, tagged = jsonl_source[0], jsonl_source[1]
    assert parts.messages[0].text == f"Look: {IMAGE_PLACEHOLDER} and {VIDEO_PLACEHOLDER}"
    assert parts.images == (str(tmp_path / "imgs" / "b.png"),) and parts.videos == (str(tmp_path / "clip.gif"),)
    assert tagged.messages[0].text == f"{IMAGE_PLACEHOLDER}A{VIDEO_PLACEHOLDER}"

    example = ENCODER(second)  # reads both images and the GIF's 4 frames
    assert example.vision["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert example.vision["video_grid_thw"].tolist() == [[2, 4, 6]]
    np.testing.assert_allclose(example.vision["second_per_grid_ts"], [1.0])  # 2 frames at 2 fps


def test_llava_errors_name_the_record(tmp_path):
    records = [{"image": "gone.png", "conversations": [{"from": "human", "value": "<image>"},
                                                       {"from": "gpt", "value": "x"}]},
               {"conversations": [{"from": "robot", "value": "hi"}]},
               {"image": ["a.png"], "conversations": [{"from": "human", "value": "<image><image>"}]},
               {"text": "no turns"}]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    source = LlavaSource(str(path))
    with pytest.raises(FileNotFoundError, match=r"bad.json\[0\]: image file not found: '.*gone.png'"):
        ENCODER(source[0])
    with pytest.raises(ValueError, match=r"bad.json\[1\]: turn 0 has speaker 'robot'"):
        source[1]
    with pytest.raises(ValueError, match=r"bad.json\[2\]: 2 <image> tags but 1 images"):
        source[2]
    with pytest.raises(ValueError, match=r"bad.json\[3\]: a record needs 'conversations'"):
        source[3]
    (tmp_path / "broken.jsonl").write_text('{"messages": []}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        LlavaSource(str(tmp_path / "broken.jsonl"))


def test_tfds_source_with_a_fake_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="needs tensorflow-datasets"):
        TfdsSource("vqa_fake", "train")

    image = np.asarray(_image(3, (56, 56)))
    records = [{"image": image, "question": np.bytes_(b"what shape?"), "answer": b"circle"},
               {"image": image, "question": "and color?"}]
    calls = []

    def data_source(name, *, split, data_dir=None):
        calls.append((name, split, data_dir))
        return records

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", types.SimpleNamespace(data_source=data_source))
    source = TfdsSource("vqa_fake", "train[:2]", data_dir="/d")
    assert calls == [("vqa_fake", "train[:2]", "/d")] and len(source) == 2
    conversation = source[0]
    assert [m.text for m in conversation.messages] == [IMAGE_PLACEHOLDER + "what shape?", "circle"]
    assert conversation.images[0] is image and conversation.name == "tfds vqa_fake/train[:2][0]"
    assert ENCODER(conversation).vision["image_grid_thw"].tolist() == [[1, 4, 4]]
    with pytest.raises(ValueError, match=r"\[1\]: record has no field\(s\) \['answer'\]"):
        source[1]


# ---------------------------------------------------------------------------------------------
# Vision budget


GRIDS = [[1, 4, 4], [2, 4, 6], [1, 6, 8], [1, 2, 10]]


def test_footprint_counts_match_the_vision_layout():
    for n in range(1, len(GRIDS) + 1):
        layout = vision_layout(CFG.vision, GRIDS[:n])
        used = footprint(GRIDS[:n], CFG.vision)
        assert used.patches == layout.rows.size
        assert used.windows == layout.window.index.shape[0] and used.slices == layout.full.index.shape[0]
        assert used.widest_slice == layout.full.index.shape[1]


def test_padded_layout_keeps_every_group_and_slot():
    grid = np.array(GRIDS)
    n = int(grid.prod(-1).sum())
    budget = VisionBudget(patches=n + 24, windows=30, window_patches=16, slices=7, slice_patches=60)
    real, padded = vision_layout(CFG.vision, grid), padded_layout(CFG.vision, grid, budget)
    np.testing.assert_array_equal(padded.rows[:n], real.rows)
    assert not padded.rows[n:].any() and not padded.cols[n:].any()
    for got, ref, (count, width) in ((padded.window, real.window, (30, 16)), (padded.full, real.full, (7, 60))):
        g, w = ref.index.shape
        assert got.index.shape == (count, width) and got.position.shape == (n + 24,)
        np.testing.assert_array_equal(got.index[:g, :w], ref.index)
        np.testing.assert_array_equal(got.lengths, np.concatenate([ref.lengths, np.ones(count - g)]))
        # every real patch reads its output from the slot that holds it
        np.testing.assert_array_equal(got.index.ravel()[got.position[:n]], np.arange(n))
    with pytest.raises(ValueError, match="beyond the row budget"):
        padded_layout(CFG.vision, grid, VisionBudget(patches=n, windows=30, window_patches=16, slices=4,
                                                     slice_patches=60))


# ---------------------------------------------------------------------------------------------
# Packing


def _examples():
    """Examples with one image, two images, a video, and none."""
    vqa = EasyVqaSource("test")
    video = np.stack([np.asarray(_image(10 + i, (56, 84))) for i in range(4)])
    return [
        ENCODER(vqa[0]), ENCODER(vqa[1]),
        ENCODER(Conversation((Message("user", f"{IMAGE_PLACEHOLDER}then{VIDEO_PLACEHOLDER}: same?"),
                              Message("assistant", "no")), images=(_image(4, (56, 56)),), videos=(video,))),
        ENCODER(Conversation((Message("user", "Say hi."), Message("assistant", "hi"), Message("user", "Again."),
                              Message("assistant", "hi hi")))),
        ENCODER(Conversation((Message("user", f"{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}which is larger?"),
                              Message("assistant", "the second")), images=(_image(5, (56, 56)), _image(6, (84, 112))))),
    ]


@pytest.fixture(scope="module")
def examples():
    return _examples()


def test_packed_fields_shift_targets_inside_segments(examples):
    spec = _spec(rows=3, seq_len=224, patches=96)
    rows = [[examples[0], examples[2]], [examples[3], examples[1], examples[4]]]
    batch = assemble_batch(rows, spec)
    for b, row in enumerate(rows + [[]]):
        ids, seg, tgt, mask = (list(a[b]) for a in (batch.input_ids, batch.segment_ids, batch.targets,
                                                    batch.loss_mask))
        t = 0
        for s, example in enumerate(row, 1):
            for i in range(len(example)):
                last = i == len(example) - 1
                assert (ids[t], seg[t]) == (example.input_ids[i], s)
                assert tgt[t] == (0 if last else example.input_ids[i + 1])
                assert mask[t] == (0.0 if last else float(example.label_mask[i + 1]))
                assert list(batch.position_ids[b, :, t]) == list(example.position_ids[:, i])
                t += 1
        assert set(seg[t:]) <= {0} and set(tgt[t:]) <= {0} and set(mask[t:]) <= {0.0}
    # pixel rows: the row's images and videos in token order, then zeros
    second_row = [examples[1].vision["pixel_values"], examples[4].vision["pixel_values"]]
    n = sum(p.shape[0] for p in second_row)
    np.testing.assert_array_equal(batch.pixel_values[1, :n], np.concatenate(second_row))
    assert not batch.pixel_values[1, n:].any() and not batch.pixel_values[2].any()
    first_row = examples[0].vision["pixel_values"], examples[2].vision["pixel_values"], \
        examples[2].vision["pixel_values_videos"]
    np.testing.assert_array_equal(batch.pixel_values[0, :sum(p.shape[0] for p in first_row)],
                                  np.concatenate(first_row))


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _alone_logits(model, examples):
    """float64 logits of each example run unpacked (no segments, no positions given: the model's
    own ``rope_index``). One call: example b in row b, followed by filler text tokens it cannot see
    (the model is causal), so row b's first len(example) logits are the example's alone."""
    length = max(map(len, examples))
    ids = np.full((len(examples), length), TOK.eos_id, np.int32)
    for b, example in enumerate(examples):
        ids[b, :len(example)] = example.input_ids
    vision = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [e.vision[key] for e in examples if key in e.vision]
        if parts:
            vision[key] = np.concatenate(parts)
    logits = np.asarray(model(ids, **vision).logits, np.float64)
    return [logits[b, :len(example)] for b, example in enumerate(examples)]


def test_packed_batch_equals_each_example_alone(examples):
    """The key test: per-token logits and losses of packed batches (images, a video, a text-only
    example, tail padding, an empty row) equal each example run unpacked through the tiny model;
    a second packing of the same examples reuses the compiled step."""
    model = VisionLanguageModel(CFG, rngs=nnx.Rngs(0))
    alone = dict(zip(map(id, examples), _alone_logits(model, examples)))
    traces = []

    @nnx.jit
    def packed_logits(model, batch):
        traces.append(1)
        prepared = model.prepare_packed(batch)
        return model.language_model(inputs_embeds=prepared.embeds, position_ids=prepared.position_ids,
                                    segment_ids=prepared.segment_ids)[0]

    spec = _spec(rows=3, seq_len=224, patches=96)
    for rows in ([[examples[0], examples[2]], [examples[3], examples[1], examples[4]]],
                 [[examples[4], examples[3], examples[0]], [], [examples[2], examples[1]]]):
        batch = assemble_batch(rows, spec)
        logits = np.asarray(packed_logits(model, batch), np.float64)
        assert np.isfinite(logits).all()
        packed_nll = -np.take_along_axis(_log_softmax(logits), batch.targets[..., None], -1)[..., 0] * batch.loss_mask
        for b, row in enumerate(rows):
            offset = 0
            for example in row:
                n, ref = len(example), alone[id(example)]
                assert np.abs(logits[b, offset:offset + n] - ref).max() <= 1e-4 * np.abs(ref).max(), example.name
                ref_nll = -_log_softmax(ref)[np.arange(n - 1), example.input_ids[1:]] * example.label_mask[1:]
                np.testing.assert_allclose(packed_nll[b, offset:offset + n - 1], ref_nll, rtol=1e-4, atol=1e-5)
                assert packed_nll[b, offset + n - 1] == 0
                offset += n
    assert len(traces) == 1


def test_planner_first_fit_and_budget(examples):
    spec = _spec(rows=2, seq_len=150, patches=64)
    planner = BatchPlanner(spec)
    # lengths ~ 40-90 tokens; images 16 patches each, the video example 16 + 48 patches
    placed = [planner.add(e) for e in (examples[0], examples[2], examples[1], examples[4])]
    tokens = [sum(len(e) for e in row) for row in planner.rows]
    patches = [sum(e.vision.get("pixel_values", np.zeros((0,))).shape[0] +
                   e.vision.get("pixel_values_videos", np.zeros((0,))).shape[0] for e in row) for row in planner.rows]
    assert all(t <= 150 for t in tokens) and all(p <= 64 for p in patches)
    assert planner.rows[0][0] is examples[0] and examples[2] in planner.rows[1]  # the video did not fit row 0
    assert placed.count(True) == sum(len(r) for r in planner.rows)
    too_long = ENCODER(Conversation((Message("user", "x" * spec.seq_len), Message("assistant", "y"))))
    assert len(too_long) > spec.seq_len and not spec.fits_alone(too_long)


# ---------------------------------------------------------------------------------------------
# grain pipeline


def _data(**overrides):
    data = default_data_config()
    data.update(dict(seq_len=160, batch_size=4, max_patches=64, read_threads=2, prefetch_batches=2))
    data.update(overrides)
    return data


def _text_source(n):
    return [Conversation((Message("user", f"record {i}"), Message("assistant", "ok")), name=f"r{i}")
            for i in range(n)]


def _record_ids(batches):
    """The record numbers of every segment, in row order (decoded from the packed ids)."""
    found = []
    for batch in batches:
        for ids, seg in zip(batch.input_ids, batch.segment_ids):
            for s in range(1, seg.max() + 1):
                text = TOK.decode(ids[seg == s])
                found.append(int(text.split("record ")[1].split("<|im_end|>")[0]))
    return found


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


def _assert_batches_equal(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_pipeline_order_is_deterministic_and_hosts_are_disjoint():
    """One example per row (seq_len 40), so the packed order is the example order."""
    source = _text_source(40)
    data = _data(num_epochs=1, shuffle=True, seed=3, seq_len=40)
    everything = _record_ids(build_dataset(data, CFG, process_index=0, process_count=1, source=source))
    assert sorted(everything) == list(range(40)) and everything != list(range(40))
    again = _record_ids(build_dataset(data, CFG, process_index=0, process_count=1, source=source))
    assert again == everything
    hosts = [_record_ids(build_dataset(data, CFG, process_index=i, process_count=2, source=source)) for i in (0, 1)]
    assert sorted(hosts[0] + hosts[1]) == list(range(40)) and not set(hosts[0]) & set(hosts[1])
    # host i reads records i, i + 2, ... of the global shuffled stream
    assert hosts[0] == everything[0::2] and hosts[1] == everything[1::2]
    unshuffled = _record_ids(build_dataset(_data(num_epochs=1, shuffle=False, seq_len=40), CFG, process_index=1,
                                           process_count=2, source=source))
    assert unshuffled == list(range(1, 40, 2))
    with pytest.raises(ValueError, match="batch_size .5. must be a positive multiple of the host count .2."):
        build_dataset(_data(batch_size=5), CFG, process_index=0, process_count=2, source=source)


def test_pipeline_resumes_from_a_saved_iterator_state(tmp_path):
    from etils import epath
    from grain.checkpoint import CheckpointHandler

    data = _data(split="test", seed=7)
    reference = iter(build_dataset(data, CFG, process_index=0, process_count=1))
    run = _take(reference, 5)
    resumed_from = iter(build_dataset(data, CFG, process_index=0, process_count=1))
    _take(resumed_from, 2)
    CheckpointHandler().save(epath.Path(tmp_path), item=resumed_from)  # grain's orbax handler: JSON state
    state = json.loads(next(tmp_path.glob("process_0-of-1.json")).read_text())
    assert state["dropped"] == 0 and state["parent"]["next_index"] > 0
    restored = CheckpointHandler().restore(epath.Path(tmp_path),
                                           item=iter(build_dataset(data, CFG, process_index=0, process_count=1)))
    _assert_batches_equal(_take(restored, 3), run[2:])
    batch = run[0]  # fixed shapes: every batch looks like this
    assert batch.input_ids.shape == (4, 160) and batch.position_ids.shape == (4, 3, 160)
    assert batch.pixel_values.shape == (4, 64, CFG.vision.patch_dim)


def test_pipeline_drops_examples_that_do_not_fit_and_counts_them(monkeypatch):
    source = _text_source(6)
    source[2] = Conversation((Message("user", "record 2 " + "long " * 200), Message("assistant", "ok")), name="big")
    iterator = iter(build_dataset(_data(num_epochs=1, shuffle=False, prefetch_batches=0), CFG, process_index=0,
                                  process_count=1, source=source))
    batches = list(iterator)
    assert _record_ids(batches) == [0, 1, 3, 4, 5] and iterator.get_state()["dropped"] == 1
    monkeypatch.setattr(packing, "MAX_CONSECUTIVE_DROPS", 5)
    with pytest.raises(ValueError, match="5 consecutive examples do not fit an empty row"):
        next(iter(build_dataset(_data(prefetch_batches=0), CFG, process_index=0, process_count=1,
                                source=[source[2]])))


def test_every_batch_has_the_same_shapes_and_dtypes():
    """What lets a jitted train step compile once: full batches and the last, partial one alike."""
    source = _text_source(30) + [Conversation((Message("user", IMAGE_PLACEHOLDER + "record 30"),
                                               Message("assistant", "ok")), images=(_image(8, (56, 84)),))]
    batches = list(build_dataset(_data(num_epochs=1), CFG, process_index=0, process_count=1, source=source))
    assert sorted(_record_ids(batches)) == list(range(31)) and len(batches) >= 2
    shapes = [jax.tree.map(lambda a: (a.shape, a.dtype), batch) for batch in batches]
    assert all(s == shapes[0] for s in shapes)
    assert shapes[0].pixel_values == ((4, 64, CFG.vision.patch_dim), np.float32)


def test_default_section_embeds_in_a_stage_config():
    config = load_config("tiny")
    config.data = default_data_config()
    apply_overrides(config, ["--config.data.seq_len=512", "--config.data.max_slices=4",
                             "--config.data.source=llava"])
    assert (config.data.seq_len, config.data.max_slices, config.data.source) == (512, 4, "llava")
    with pytest.raises(ValueError, match="data.source='llava' needs data.path"):
        build_dataset(config.data, CFG, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="data.tokenizer must be"):
        make_tokenizer(os.path.join("no", "such", "tokenizer"))
