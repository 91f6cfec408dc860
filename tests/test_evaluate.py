"""Evaluation: VQA normalisation / exact match / soft score / ANLS against closed forms, data
loaders (easy-VQA, synthetic OCR, JSONL, VLMEvalKit TSV), batched ``evaluate`` against
one-at-a-time ``generate`` (tiny model on the CPU), the ``eval`` command, and the lmms-eval
plugin driven through a fake ``lmms_eval`` module."""

import abc
import base64
import dataclasses
import functools
import io
import json
import os
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infinitevl_jax.cli import main
from infinitevl_jax.config import load_config
from infinitevl_jax.data.pipeline import make_tokenizer
from infinitevl_jax.evaluate import datasets
from infinitevl_jax.evaluate.datasets import EvalSample
from infinitevl_jax.evaluate.metrics import (anls_score, exact_match, levenshtein, normalize_answer,
                                             vqa_soft_score)
from infinitevl_jax.evaluate.vqa import EvalReport, choice_of, engine_for, evaluate
from infinitevl_jax.infer.generate import Request, generate
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel

MAX_NEW = 3

# ------------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("text, expected", [
    ("The Two dogs.", "2 dogs"),
    ("  Yes\n", "yes"),
    ("black/white", "black white"),  # no space next to '/': it becomes a space
    ("black / white", "black white"),  # next to a space: deleted (the spaces collapse)
    ("1,000 people!", "1000 people"),  # a digit-comma-digit group: every mark is deleted
    ("3.5 ft.", "3.5 ft"),  # periods survive only between digits
    ("Dont know", "don't know"),
    ("youdve been there", "you'd've been there"),
    ("it's an apple", "it's apple"),
    ("none", "0"),
    ("well, ill", "well ill"),  # words that are also contractions stay
    ("A", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_any_reference():
    assert exact_match("Two", ["three", "2"])
    assert exact_match("the red circle.", "Red Circle")
    assert not exact_match("red", ["blue", "reddish"])
    with pytest.raises(ValueError, match="at least one"):
        exact_match("x", [])


@pytest.mark.parametrize("n", [3, 5, 10])
def test_vqa_soft_score_closed_forms(n):
    for m in range(n + 1):
        answers = ["cat"] * m + [f"dog{i}" for i in range(n - m)]
        assert vqa_soft_score("Cat", answers, leave_one_out=False) == min(m / 3, 1)
        loo = (m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n if m else 0.0
        assert vqa_soft_score("cat", answers) == pytest.approx(loo, abs=1e-12)
    ten = [vqa_soft_score("cat", ["cat"] * m + ["dog"] * (10 - m)) for m in range(6)]
    np.testing.assert_allclose(ten, [0, 0.3, 0.6, 0.9, 1, 1], atol=1e-12)
    with pytest.raises(ValueError, match=">= 3"):
        vqa_soft_score("cat", ["cat", "cat"])


@functools.lru_cache(maxsize=None)
def _lev_recursive(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(_lev_recursive(a[1:], b) + 1, _lev_recursive(a, b[1:]) + 1,
               _lev_recursive(a[1:], b[1:]) + (a[0] != b[0]))


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("abcd", "wxyz") == 4
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = ("".join(rng.choice(list("abc"), size=rng.integers(0, 7))) for _ in range(2))
        assert levenshtein(a, b) == levenshtein(b, a) == _lev_recursive(a, b)


def test_anls_closed_forms():
    assert anls_score("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # NL = 3/7 < 0.5
    assert anls_score("ab", "ax") == 0.0  # NL = 0.5 is not below the threshold
    assert anls_score("abc", "xyz") == 0.0
    assert anls_score("  Hello   World ", "hello world") == 1.0  # case and whitespace do not count
    assert anls_score("", "") == 1.0
    assert anls_score("invoice 12", ["total", "invoice 13", "invoice 12"]) == 1.0  # max over references
    assert anls_score("invoice 1", ["invoice 12"]) == pytest.approx(1 - 1 / 10)
    assert anls_score("ab", "ax", threshold=0.6) == pytest.approx(0.5)


def test_choice_of():
    choices = {"A": "cat", "B": "dog", "C": "the bird"}
    picks = {"B": "B", "B. dog": "B", "(C) bird": "C", "Answer: A": "A", "A dog": "B", "I think C.": "C",
             "Bird": "C", "zebra": None, "A dog is shown": None}
    assert {p: choice_of(p, choices) for p in picks} == picks


# ------------------------------------------------------------------------------------------------
# Data sets


def _png(path, color=(255, 0, 0), size=(20, 20)):
    Image.new("RGB", size, color).save(path)
    return path


def test_subsets_are_deterministic():
    first = datasets.easy_vqa("test", limit=6, seed=3)
    assert [s.id for s in first] == [s.id for s in datasets.easy_vqa("test", limit=6, seed=3)]
    assert [s.id for s in datasets.easy_vqa("test", limit=4, seed=None)] == [f"easy_vqa/test/{i}" for i in range(4)]
    assert len({s.id for s in first}) == 6 and first[0].answers[0] in {"circle", "rectangle", "triangle", "yes", "no",
                                                                      "red", "green", "blue", "yellow", "black",
                                                                      "gray", "teal", "brown"}
    assert os.path.isfile(first[0].images[0])


def test_synthetic_ocr():
    a, b = datasets.synthetic_ocr(5, seed=1, size=(96, 48)), datasets.synthetic_ocr(5, seed=1, size=(96, 48))
    assert [s.answers for s in a] == [s.answers for s in b]
    assert all(np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0])) for x, y in zip(a, b))
    assert a[0].images[0].size == (96, 48) and a[0].question == datasets.OCR_QUESTION
    pixels = np.asarray(a[0].images[0])
    assert pixels.min() < 100 < 200 <= pixels.max()  # dark ink on a light background
    assert [s.answers for s in datasets.synthetic_ocr(5, seed=2)] != [s.answers for s in a]


def test_jsonl_loader(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png")
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"image": "imgs/a.png", "question": "color?", "answer": "red"}) + "\n\n"
                    + json.dumps({"images": [], "question": "2+2?", "answers": ["4", "four"], "id": "q2"}) + "\n")
    samples = datasets.jsonl(str(path))
    assert samples[0] == EvalSample((str(tmp_path / "imgs" / "a.png"),), "color?", ("red",), "qa.jsonl:1")
    assert samples[1] == EvalSample((), "2+2?", ("4", "four"), "q2")

    bad = {"not json": "{oops", "no question": json.dumps({"answer": "x"}),
           "both answer fields": json.dumps({"question": "q", "answer": "x", "answers": ["x"]}),
           "bad answers": json.dumps({"question": "q", "answers": []})}
    for what, line in bad.items():
        path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=r"qa\.jsonl:2: "):
            datasets.jsonl(str(path))
    path.write_text(json.dumps({"image": "missing.png", "question": "q", "answer": "a"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"qa\.jsonl:1: image 'missing.png' not found"):
        datasets.jsonl(str(path))


def _b64_png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_vlmevalkit_tsv_loader(tmp_path):
    path = tmp_path / "bench.tsv"
    rows = ["index\timage\tquestion\thint\tA\tB\tC\tD\tanswer",
            f"10\t{_b64_png((0, 0, 255))}\tWhat colour?\tLook closely\tred\tblue\tgreen\t\tB",
            "11\t10\tSame picture: colour?\t\tred\tblue\t\t\tA",  # shares row 10's image
            f"12\t{_b64_png((0, 255, 0))}\tName the colour.\t\t\t\t\t\tgreen"]
    path.write_text("\n".join(rows) + "\n")
    mc, shared, open_ended = datasets.vlmevalkit_tsv(str(path))
    assert mc.question == ("Hint: Look closely\nQuestion: What colour?\nOptions:\nA. red\nB. blue\nC. green\n"
                           "Please select the correct answer from the options above.")
    assert mc.answers == ("B",) and mc.choices == {"A": "red", "B": "blue", "C": "green"} and mc.id == "10"
    assert np.asarray(mc.images[0])[0, 0].tolist() == [0, 0, 255]
    assert np.array_equal(np.asarray(shared.images[0]), np.asarray(mc.images[0])) and shared.choices == {"A": "red",
                                                                                                          "B": "blue"}
    assert open_ended.question == "Name the colour." and open_ended.answers == ("green",) and not open_ended.choices

    path.write_text("\n".join(rows[:2] + ["13\tnot-base64!\tq\t\t\t\t\t\tx"]) + "\n")
    with pytest.raises(ValueError, match=r"bench\.tsv:3: the 'image' field is not a base64"):
        datasets.vlmevalkit_tsv(str(path))
    path.write_text("\n".join(rows[:2] + [rows[1].replace("\tB", "\tE")]) + "\n")
    with pytest.raises(ValueError, match=r"bench\.tsv:3: the answer 'E' is not one of"):
        datasets.vlmevalkit_tsv(str(path))
    path.write_text("index\tquestion\tanswer\n1\tq\ta\n")
    with pytest.raises(ValueError, match=r"bench\.tsv:1: the header needs an 'image'"):
        datasets.vlmevalkit_tsv(str(path))


# ------------------------------------------------------------------------------------------------
# evaluate: batched and padded == one sample at a time


@pytest.fixture(scope="module")
def vlm():
    model = VisionLanguageModel(VisionLanguageConfig.from_config(load_config("tiny")), rngs=nnx.Rngs(0))
    return model, make_tokenizer("byte")


@pytest.fixture(scope="module")
def questions():
    return datasets.easy_vqa("test", limit=3, seed=0)


@pytest.fixture(scope="module")
def alone(vlm, questions):
    """Each question's answer from its own ``generate`` call (batch of one)."""
    model, tokenizer = vlm
    return [generate(model, tokenizer, [Request(s.question, s.images)], max_new_tokens=MAX_NEW,
                     engine=engine_for(model))[0].text.strip() for s in questions]


def test_evaluate_matches_one_at_a_time_generation(vlm, questions, alone):
    """Even samples get their own one-at-a-time answer as reference, odd ones an impossible answer:
    evaluate (batches of 2, the last padded) must report exactly those predictions and 2/3."""
    model, tokenizer = vlm
    samples = [dataclasses.replace(s, answers=(alone[i],) if i % 2 == 0 else ("<never said>",))
               for i, s in enumerate(questions)]
    expected = [exact_match(p, s.answers) for p, s in zip(alone, samples)]
    assert expected == [True, False, True]
    report = evaluate(model, tokenizer, samples, batch_size=2, max_new_tokens=MAX_NEW, progress=False)
    assert [r["prediction"] for r in report.predictions] == alone
    assert [r["correct"] for r in report.predictions] == expected
    assert report.accuracy == 2 / 3 and report.count == 3
    assert report.anls == pytest.approx(np.mean([anls_score(p, s.answers) for p, s in zip(alone, samples)]))
    assert [r["id"] for r in report.predictions] == [s.id for s in samples] and report.vqa_score is None

    engine = engine_for(model)
    compiled = engine.compile_counts()
    embedding = model.language_model.embed_tokens
    original = embedding[...]
    try:  # new weights, same engine: no recompilation, and the engine sees them
        embedding[...] = original * 2.0
        again = evaluate(model, tokenizer, samples, batch_size=2, max_new_tokens=MAX_NEW, progress=False)
        assert engine.compile_counts() == compiled
        np.testing.assert_array_equal(engine.params["embed_tokens"][...], original * 2.0)
    finally:
        embedding[...] = original
    assert again.count == 3
    restored = json.loads(report.to_json())
    assert EvalReport(**restored) == report


def test_evaluate_rejects_bad_input(vlm, questions):
    model, tokenizer = vlm
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, tokenizer, [], progress=False)
    from infinitevl_jax.infer.engine import DecoderEngine

    other = VisionLanguageModel(VisionLanguageConfig.from_config(load_config("tiny")), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="another model"):
        evaluate(model, tokenizer, questions, engine=DecoderEngine(other.language_model), progress=False)


def test_eval_command(tmp_path, capsys, monkeypatch, vlm):
    """``infinitevl eval --config tiny`` end to end. The preset's model is built by the command's own
    loader and checked to equal the fixture's (same preset and seed), whose already compiled
    programs are then used, keeping the test fast on the CPU."""
    from infinitevl_jax.infer import commands as infer_commands

    real_load_model = infer_commands.load_model

    def load_model(args, overrides):
        built, tokenizer = real_load_model(args, overrides)
        assert built.cfg == vlm[0].cfg and type(tokenizer) is type(vlm[1])
        for a, b in zip(jax.tree.leaves(nnx.state(built)), jax.tree.leaves(nnx.state(vlm[0]))):
            np.testing.assert_array_equal(a, b)
        return vlm

    monkeypatch.setattr(infer_commands, "load_model", load_model)
    out = tmp_path / "reports" / "report.json"
    assert main(["eval", "--config", "tiny", "--data", "easy_vqa", "--limit", "4", "--batch-size", "2",
                 "--max-new-tokens", str(MAX_NEW), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "ANLS" in printed and "report written" in printed
    report = json.loads(out.read_text())
    assert report["count"] == 4 and len(report["predictions"]) == 4
    assert report["meta"]["data"] == "easy_vqa" and report["meta"]["limit"] == 4
    assert [p["id"] for p in report["predictions"]] == [s.id for s in datasets.easy_vqa("test", limit=4, seed=0)]
    assert os.listdir(out.parent) == ["report.json"]  # the temporary file was renamed, nothing left over

    assert main(["eval", "--data", "nope", "--out", str(out)]) == 2
    assert "--data must be" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# lmms-eval plugin (with a fake lmms_eval package)


@dataclasses.dataclass
class FakeInstance:
    args: tuple


@dataclasses.dataclass(frozen=True)
class FakeManifest:
    model_id: str
    simple_class_path: str | None = None
    chat_class_path: str | None = None
    aliases: tuple = ()


@pytest.fixture
def fake_lmms_eval(monkeypatch):
    class lmms(abc.ABC):  # the shape of lmms_eval.api.model.lmms
        is_simple = True

        def __init__(self):
            self._rank, self._world_size, self.task_dict = 0, 1, {}

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    modules = {name: types.ModuleType(name) for name in
               ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.instance", "lmms_eval.models",
                "lmms_eval.models.registry_v2")}
    modules["lmms_eval.api.model"].lmms = lmms
    modules["lmms_eval.api.instance"].Instance = FakeInstance
    modules["lmms_eval.models.registry_v2"].ModelManifest = FakeManifest
    modules["lmms_eval.models"].AVAILABLE_MODELS = {}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    from infinitevl_jax.evaluate import lmms_plugin

    monkeypatch.setattr(lmms_plugin, "_CLASSES", {})  # classes built on the fake base, forgotten afterwards
    return lmms_plugin, lmms, modules


def test_lmms_plugin_generate_until(fake_lmms_eval, vlm, questions, alone):
    plugin, base, modules = fake_lmms_eval
    model, tokenizer = vlm
    (manifest,) = plugin.manifests()
    assert manifest.model_id == "infinitevl_jax"
    chat_path, simple_path = manifest.chat_class_path, manifest.simple_class_path
    module_name, name = chat_path.rsplit(".", 1)  # lmms-eval imports the class by path
    chat_cls = getattr(__import__(module_name, fromlist=[name]), name)
    simple_cls = getattr(sys.modules[simple_path.rsplit(".", 1)[0]], simple_path.rsplit(".", 1)[1])
    assert issubclass(chat_cls, base) and not chat_cls.is_simple
    assert issubclass(simple_cls, base) and simple_cls.is_simple

    docs = {i: {"image": Image.open(s.images[0]), "question": s.question} for i, s in enumerate(questions)}

    def doc_to_messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                             {"type": "text", "text": doc["question"]}]}]

    gen = [{"max_new_tokens": MAX_NEW, "temperature": 0, "until": []},
           {"max_new_tokens": MAX_NEW, "do_sample": False, "until": ["\x00never"]}]  # two groups, same shapes
    chat = chat_cls(model=model, tokenizer=tokenizer, batch_size=2)
    chat.task_dict = {"easy": {"test": docs}}
    requests = [FakeInstance(("ctx", doc_to_messages, gen[i % 2], i, "easy", "test")) for i in docs]
    assert chat.generate_until(requests) == alone

    simple = simple_cls(model=model, tokenizer=tokenizer, batch_size="2")
    simple.task_dict = chat.task_dict
    requests = [FakeInstance((f"<image>\n{docs[i]['question']}", gen[0], lambda doc: [doc["image"]], i, "easy", "test"))
                for i in docs]
    assert simple.generate_until(requests) == alone

    with pytest.raises(NotImplementedError, match="generate_until only"):
        chat.loglikelihood(requests)
    with pytest.raises(NotImplementedError, match="multi-round"):
        chat.generate_until_multi_round(requests)
    video = [{"role": "user", "content": [{"type": "video", "url": "clip.mp4"}, {"type": "text", "text": "q"}]}]
    with pytest.raises(NotImplementedError, match="easy/test/0: video inputs"):
        chat.generate_until([FakeInstance(("ctx", lambda doc: video, gen[0], 0, "easy", "test"))])
    with pytest.raises(TypeError, match="unknown model_args"):
        chat_cls(model=model, tokenizer=tokenizer, temperature=0.5)

    plugin.register(modules["lmms_eval.models"])  # lmms-eval without the entry-point registry
    assert modules["lmms_eval.models"].AVAILABLE_MODELS["infinitevl_jax"] == simple_path


def test_lmms_plugin_helpers():
    from infinitevl_jax.evaluate.lmms_plugin import cut_at_stops, sampling_of

    assert cut_at_stops("red. And more\nlines", ["\n", "."]) == "red"
    assert cut_at_stops("red", []) == "red"
    sampling, max_new, until = sampling_of({"temperature": 0.7, "do_sample": True, "top_p": 0.9, "until": "\n"}, "t")
    assert (sampling.temperature, sampling.top_p, max_new, until) == (0.7, 0.9, None, ["\n"])
    assert sampling_of({"temperature": 0.7, "do_sample": False}, "t")[0].temperature == 0.0
    with pytest.raises(NotImplementedError, match="beam search"):
        sampling_of({"num_beams": 4}, "t")
