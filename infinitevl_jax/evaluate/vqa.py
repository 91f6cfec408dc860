"""Batched greedy evaluation: samples -> ``generate`` -> scores -> ``EvalReport``.

Compilation happens once per model and shape. The samples are cut into batches of
``B = min(batch_size, len(samples))``; the last batch is filled up to ``B`` by repeating its last
sample (those extra answers are dropped), so the decode step always sees ``B`` rows and compiles
once. Prefill compiles once per power-of-two prompt-length bucket (``DecoderEngine``), which for a
data set of similar prompts is one or two programs. The ``DecoderEngine`` is reused across batches
and across calls: pass ``engine=`` or let ``engine_for`` keep one per model (its parameters are
refreshed from the model at every call, so the same engine serves a model trained between calls).

Scores per sample (``metrics``): ``correct`` = VQA-normalised exact match against any reference
(for multiple choice: the letter the prediction picks, ``choice_of``), ``anls`` = ANLS with
threshold 0.5, and, for samples with >= 3 references, the official VQAv2 leave-one-out soft score.
The report's ``accuracy`` and ``anls`` are means over all samples, ``vqa_score`` the mean soft
score over the samples that have one (None if none has).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
import weakref
from typing import Iterator, Sequence

from tqdm import tqdm

from infinitevl_jax.evaluate.datasets import EvalSample
from infinitevl_jax.evaluate.metrics import anls_score, exact_match, mean, normalize_answer, vqa_soft_score
from infinitevl_jax.infer.engine import DecoderEngine
from infinitevl_jax.infer.generate import Answer, Request, generate
from infinitevl_jax.infer.sampling import SamplingConfig

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class EvalReport:
    """accuracy, anls: means over ``count`` samples in [0, 1]; vqa_score: mean VQAv2 soft score of
    the samples with >= 3 references (None: none has); predictions: one dict per sample with id,
    question, answers, prediction, correct, anls; seconds: wall time of the evaluation (prompt
    encoding, vision tower, compilation, prefill and decoding); meta: free-form (model, data, ...)."""

    accuracy: float
    anls: float
    count: int
    predictions: list[dict]
    seconds: float
    vqa_score: float | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (strict: no NaN or infinity)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    def summary(self) -> str:
        """A small table: samples, accuracy, ANLS, VQA score, time."""
        rows = [("samples", str(self.count)), ("accuracy", f"{100 * self.accuracy:.2f} %"),
                ("ANLS", f"{self.anls:.4f}")]
        if self.vqa_score is not None:
            rows.append(("VQA score", f"{100 * self.vqa_score:.2f} %"))
        rows.append(("time", f"{self.seconds:.1f} s ({self.count / max(self.seconds, 1e-9):.1f} samples/s)"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def engine_for(model, chunk_size: int = 4096) -> DecoderEngine:
    """The ``DecoderEngine`` kept for ``model``'s decoder (built on first use; forgotten with the
    model). A different ``chunk_size`` builds a new one."""
    decoder = model.language_model
    engine = _ENGINES.get(decoder)
    if engine is None or engine.chunk_size != chunk_size:
        # scanned: evaluation runs between training steps, where a second copy of the weights
        # (an unrolled engine's) would cost memory and a copy at every evaluation
        engine = _ENGINES[decoder] = DecoderEngine(decoder, chunk_size=chunk_size, unroll_layers=False)
    return engine


_LEADING_LETTER = re.compile(r"^\s*(?:(?i:answer|option)\s*:?\s*)?(?:\(([A-Z])\)|([A-Z])(?=$|[.:),]))")
_LONE_CAPITAL = re.compile(r"\b([A-Z])\b(?! [a-z])")  # "A dog": an article, not a choice


def choice_of(prediction: str, choices: dict[str, str]) -> str | None:
    """The option letter a free-form ``prediction`` picks, or None.

    In order: a leading capital letter alone or before ``. : ) ,`` (``"B"``, ``"B. dog"``,
    ``"(B) dog"``, ``"Answer: B"``; not ``"A dog"``); else the only option whose text equals the
    prediction after VQA normalisation (``"the dog"`` for ``B. dog``); else the only option letter
    standing alone as a capital, not followed by a lowercase word (``"I think C."``).
    """
    match = _LEADING_LETTER.match(prediction)
    letter = match and (match.group(1) or match.group(2))
    if letter in choices:
        return letter
    target = normalize_answer(prediction)
    hits = [letter for letter, text in choices.items() if normalize_answer(text) == target]
    if len(hits) == 1:
        return hits[0]
    lone = {c for c in _LONE_CAPITAL.findall(prediction) if c in choices}
    return lone.pop() if len(lone) == 1 else None


def score_sample(sample: EvalSample, prediction: str) -> dict:
    """``{id, question, answers, prediction, correct, anls}`` (+ ``choice`` for multiple choice,
    + ``vqa_score`` with >= 3 references) of one answered sample."""
    record = {"id": sample.id, "question": sample.question, "answers": list(sample.answers), "prediction": prediction}
    if sample.choices:
        choice = choice_of(prediction, sample.choices)
        record["choice"] = choice
        record["correct"] = choice is not None and choice in sample.answers
        record["anls"] = 1.0 if record["correct"] else 0.0
    else:
        record["correct"] = exact_match(prediction, sample.answers)
        record["anls"] = anls_score(prediction, sample.answers)
        if len(sample.answers) >= 3:
            record["vqa_score"] = vqa_soft_score(prediction, sample.answers)
    return record


def _ready_engine(model, engine: DecoderEngine | None, chunk_size: int) -> DecoderEngine:
    """``engine`` (checked to belong to ``model``) or ``engine_for(model)``, with the model's current weights."""
    if engine is None:
        engine = engine_for(model, chunk_size)
    elif engine.source is not model.language_model:
        raise ValueError("engine was built for another model's decoder; build one with "
                         "DecoderEngine(model.language_model) or pass engine=None")
    engine.reload_weights()  # the weights as they are now (same tree: no recompilation)
    return engine


def generate_in_batches(model, tokenizer, requests: Sequence[Request], *, batch_size: int, max_new_tokens: int,
                        engine: DecoderEngine | None = None, sampling: SamplingConfig = SamplingConfig(),
                        seed: int = 0, chunk_size: int = 4096) -> Iterator[list[Answer]]:
    """Yields the ``Answer``s of ``requests`` batch by batch, in order.

    Batches hold ``B = min(batch_size, len(requests))`` rows; the last one is filled up to ``B`` by
    repeating its last request and the extra answers are dropped, so every ``generate`` call has
    the same batch size (the decode step compiles once). Batch ``k`` samples with ``seed + k``.
    ``engine`` as in ``evaluate``.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1; got {batch_size}, {max_new_tokens}")
    requests = list(requests)
    if not requests:
        return
    engine = _ready_engine(model, engine, chunk_size)
    rows = min(batch_size, len(requests))
    for k, first in enumerate(range(0, len(requests), rows)):
        batch = requests[first:first + rows]
        padded = batch + [batch[-1]] * (rows - len(batch))
        answers = generate(model, tokenizer, padded, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed + k,
                           engine=engine)
        yield answers[:len(batch)]


def evaluate(model, tokenizer, samples: Sequence[EvalSample], *, batch_size: int = 32, max_new_tokens: int = 8,
             engine: DecoderEngine | None = None, progress: bool = True, desc: str = "eval",
             chunk_size: int = 4096) -> EvalReport:
    """Greedy answers to ``samples`` in batches through ``infer.generate.generate``, scored.

    Args:
      model: a ``VisionLanguageModel``; tokenizer: its tokenizer (``make_tokenizer("byte")`` for
        random-weight presets).
      samples: ``EvalSample``s (``evaluate.datasets``); at least one.
      batch_size: rows per ``generate`` call (capped at ``len(samples)``; the last batch is padded
        by repeating a sample, ``generate_in_batches``).
      max_new_tokens: the longest answer, in tokens (answers stop earlier at ``<|im_end|>``).
      engine: a ``DecoderEngine`` of ``model.language_model`` to reuse (default ``engine_for(model,
        chunk_size)``); its parameters are refreshed from the model first, so one engine serves a
        model whose weights change between calls without recompiling.
      progress: a tqdm bar with the running accuracy; desc: its label.

    Predictions are the generated text with surrounding whitespace stripped.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("nothing to evaluate: no samples")
    start = time.perf_counter()
    requests = [Request(s.question, tuple(s.images)) for s in samples]
    records, correct = [], 0
    with tqdm(total=len(samples), desc=desc, unit="q", file=sys.stdout, disable=not progress) as bar:
        for answers in generate_in_batches(model, tokenizer, requests, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens, engine=engine, chunk_size=chunk_size):
            for answer in answers:
                records.append(score_sample(samples[len(records)], answer.text.strip()))
                correct += records[-1]["correct"]
            bar.update(len(answers))
            bar.set_postfix(acc=f"{correct / len(records):.3f}")
    seconds = time.perf_counter() - start
    soft = [r["vqa_score"] for r in records if "vqa_score" in r]
    return EvalReport(accuracy=correct / len(records), anls=mean(r["anls"] for r in records), count=len(records),
                      predictions=records, seconds=seconds, vqa_score=mean(soft) if soft else None)
