"""Evaluation samples: easy-VQA, synthetic OCR, JSONL files and VLMEvalKit-style TSV files.

Every loader returns a list of ``EvalSample``. Subsets (``limit``) are deterministic: with
``limit=N`` a loader keeps the first ``N`` samples of the file order permuted by
``numpy.random.default_rng(seed).permutation`` (``seed=None``: the first ``N`` in file order);
without ``limit`` every sample is kept in file order. The same ``(limit, seed)`` always gives the
same samples in the same order, so repeated evaluations (e.g. after each training stage) see the
same questions.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import io
import os
import string
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infinitevl_jax.data.sources import json_lines

OCR_QUESTION = "What text is shown in the image?"
MC_INSTRUCTION = "Please select the correct answer from the options above."


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """One question with its images (paths, PIL images or arrays, shown before the question) and
    the reference answers (any of them counts as correct).

    ``choices`` (multiple choice only): ``{letter: option text}``; the answer is then a letter and
    a prediction is scored by the letter it picks (``vqa.choice_of``).
    """

    images: tuple
    question: str
    answers: tuple[str, ...]
    id: str
    choices: dict | None = None

    def __post_init__(self):
        if not self.answers:
            raise ValueError(f"sample {self.id!r} has no reference answer")


def subset(samples: Sequence[EvalSample], limit: int | None = None, seed: int | None = 0) -> list[EvalSample]:
    """The deterministic subset of the module docstring: all samples (``limit=None``), or the first
    ``limit`` after a ``seed``-ed permutation (``seed=None``: no permutation)."""
    samples = list(samples)
    if limit is None:
        return samples
    if limit < 0:
        raise ValueError(f"limit must be >= 0; got {limit}")
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(samples))
        samples = [samples[i] for i in order]
    return samples[:limit]


# ------------------------------------------------------------------------------------------------
# easy-VQA


def easy_vqa(split: str = "test", limit: int | None = None, seed: int | None = 0) -> list[EvalSample]:
    """The easy-VQA data set bundled with the ``easy-vqa`` package (64x64 PNG shapes; answers are a
    shape, a colour, yes or no). Ids are ``easy_vqa/<split>/<question index>``."""
    from infinitevl_jax.data.easy_vqa import load_easy_vqa

    samples = [EvalSample((s.image_path,), s.question, (s.answer,), f"easy_vqa/{split}/{i}")
               for i, s in enumerate(load_easy_vqa(split))]
    return subset(samples, limit, seed)


# ------------------------------------------------------------------------------------------------
# Synthetic OCR

_WORDS = (
    "apple", "river", "stone", "cloud", "green", "table", "music", "light", "tiger", "piano", "ocean", "paper",
    "smile", "train", "bread", "chair", "dream", "house", "lemon", "mouse", "night", "plant", "queen", "robot",
    "sugar", "storm", "water", "zebra", "cat", "dog", "sun", "map", "box", "key", "red", "blue", "open", "stop",
    "exit", "sale", "cafe", "gate", "park", "road", "north", "south", "hello", "world", "orbit", "pixel",
)


def _ocr_text(rng: np.random.Generator) -> str:
    kind = rng.integers(4)
    if kind == 0:
        return str(rng.integers(0, 10_000))
    if kind == 1:
        return str(_WORDS[rng.integers(len(_WORDS))])
    if kind == 2:
        return f"{_WORDS[rng.integers(len(_WORDS))]} {rng.integers(1, 100)}"
    return " ".join(str(_WORDS[i]) for i in rng.choice(len(_WORDS), size=2, replace=False))


def _render(text: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """``text`` in a random dark colour on a random light background, as large as fits with a margin."""
    width, height = size
    background = tuple(int(c) for c in rng.integers(200, 256, size=3))
    ink = tuple(int(c) for c in rng.integers(0, 80, size=3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    font_size = max(6, int(height * 0.7))
    while True:
        font = ImageFont.load_default(size=font_size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if (right - left <= 0.9 * width and bottom - top <= 0.8 * height) or font_size <= 6:
            break
        font_size -= 1
    x = (width - (right - left)) // 2 - left + int(rng.integers(-2, 3))
    y = (height - (bottom - top)) // 2 - top + int(rng.integers(-2, 3))
    draw.text((x, y), text, fill=ink, font=font)
    return image


def synthetic_ocr(n: int, seed: int = 0, size: int | tuple[int, int] = (112, 56)) -> list[EvalSample]:
    """``n`` images of random words and numbers rendered with Pillow's scalable default font.

    The question is ``OCR_QUESTION``, the answer the rendered text (a number < 10000, a word, a word
    and a number, or two words); ``size`` is ``(width, height)`` in pixels (an int: square). The
    same ``(n, seed, size)`` gives identical images. Ids are ``ocr/<seed>/<i>``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or min(size) < 16:
        raise ValueError(f"size must be an int or (width, height), each >= 16 pixels; got {size}")
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        text = _ocr_text(rng)
        samples.append(EvalSample((_render(text, size, rng),), OCR_QUESTION, (text,), f"ocr/{seed}/{i}"))
    return samples


# ------------------------------------------------------------------------------------------------
# JSONL


def _strings(value, what: str, where: str) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{where}: {what} must be a string or a non-empty list of strings; got {value!r}")
    return tuple(values)


def jsonl(path: str, limit: int | None = None, seed: int | None = 0) -> list[EvalSample]:
    """One JSON object per line: ``image`` (a path) or ``images`` (a list of paths; may be empty or
    missing for text-only questions), ``question``, ``answer`` (a string) or ``answers`` (a list),
    and an optional ``id`` (default ``<file name>:<line>``). Relative image paths are resolved
    against the file's folder. Blank lines are skipped; a malformed record is a ``ValueError``
    naming ``path:line``; a missing image a ``FileNotFoundError`` naming both."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    samples = []
    with open(path, encoding="utf-8") as f:
        for line_no, record in json_lines(f, path):
            where = f"{path}:{line_no}"
            if not isinstance(record, dict):
                raise ValueError(f"{where}: each line must be a JSON object; got {type(record).__name__}")
            if "image" in record and "images" in record:
                raise ValueError(f"{where}: give either 'image' or 'images', not both")
            images = _strings(record["image"], "'image'", where) if "image" in record else \
                (() if not record.get("images") else _strings(record["images"], "'images'", where))
            if not isinstance(record.get("question"), str):
                raise ValueError(f"{where}: 'question' (a string) is required")
            if ("answer" in record) == ("answers" in record):
                raise ValueError(f"{where}: give exactly one of 'answer' (a string) and 'answers' (a list)")
            answers = _strings(record["answer"] if "answer" in record else record["answers"],
                               "'answer'" if "answer" in record else "'answers'", where)
            resolved = []
            for image in images:
                full = image if os.path.isabs(image) else os.path.join(folder, image)
                if not os.path.isfile(full):
                    raise FileNotFoundError(f"{where}: image {image!r} not found (looked for {full})")
                resolved.append(full)
            sample_id = str(record.get("id", f"{name}:{line_no}"))
            samples.append(EvalSample(tuple(resolved), record["question"], answers, sample_id))
    return subset(samples, limit, seed)


# ------------------------------------------------------------------------------------------------
# VLMEvalKit TSV


def _decode_image(data: str, where: str) -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=False)
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (binascii.Error, ValueError, OSError) as e:
        raise ValueError(f"{where}: the 'image' field is not a base64-encoded image ({e})") from None
    return image.convert("RGB")


def _present(row: dict, key: str) -> bool:
    value = row.get(key)
    return value is not None and value.strip() != "" and value.strip().lower() != "nan"


def multiple_choice_prompt(question: str, choices: dict[str, str], hint: str | None = None) -> str:
    """The prompt VLMEvalKit builds for a multiple-choice row::

        Hint: <hint>            (only when the row has one)
        Question: <question>
        Options:
        A. <option A>
        B. <option B>
        Please select the correct answer from the options above.
    """
    lines = [f"Hint: {hint}"] if hint else []
    lines.append(f"Question: {question}")
    lines.append("Options:")
    lines += [f"{letter}. {text}" for letter, text in choices.items()]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)


def vlmevalkit_tsv(path: str, limit: int | None = None, seed: int | None = 0) -> list[EvalSample]:
    """A VLMEvalKit benchmark TSV (one row per question; tab-separated with a header).

    Columns: ``index``; ``image`` (base64, a list of base64 strings written as ``['..', '..']``, or
    the ``index`` of another row whose image it shares, as VLMEvalKit writes repeated images) or
    ``image_path`` (paths relative to the file's folder, or a list of them); ``question``;
    ``answer``; optional option columns ``A``, ``B``, ... (consecutive letters from ``A``) and
    ``hint``. A row with options becomes a multiple-choice sample: the question is
    ``multiple_choice_prompt`` and the answer is the letter. Ids are the ``index`` values. A
    malformed row is a ``ValueError`` naming ``path:line``.
    """
    csv.field_size_limit(sys.maxsize)
    folder = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in ("index", "question", "answer") if c not in header]
        if missing:
            raise ValueError(f"{path}:1: the header lacks column(s) {missing}; it has {header}")
        if "image" not in header and "image_path" not in header:
            raise ValueError(f"{path}:1: the header needs an 'image' (base64) or 'image_path' column; it has {header}")
        rows = []
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise ValueError(f"{path}:{reader.line_num}: {len(row)} fields where the header has {len(header)}")
            rows.append((reader.line_num, row))
    images_by_index = {row["index"].strip(): row.get("image", "") for _, row in rows}
    option_columns = []
    for letter in string.ascii_uppercase:
        if letter not in header:
            break
        option_columns.append(letter)
    samples = []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        index = row["index"].strip()
        if not index:
            raise ValueError(f"{where}: empty 'index'")
        if not _present(row, "question") or not _present(row, "answer"):
            raise ValueError(f"{where}: 'question' and 'answer' must not be empty")
        images = _tsv_images(row, images_by_index, folder, where)
        choices = {c: row[c].strip() for c in option_columns if _present(row, c)}
        question, answer = row["question"].strip(), row["answer"].strip()
        if choices:
            if answer not in choices:
                raise ValueError(f"{where}: the answer {answer!r} is not one of the option letters {list(choices)}")
            hint = row["hint"].strip() if _present(row, "hint") else None
            samples.append(EvalSample(images, multiple_choice_prompt(question, choices, hint), (answer,), index,
                                      choices))
        else:
            samples.append(EvalSample(images, question, (answer,), index))
    return subset(samples, limit, seed)


def _listed(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            items = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(items, (list, tuple)) and all(isinstance(i, str) for i in items):
            return list(items)
    return [value]


def _tsv_images(row: dict, images_by_index: dict, folder: str, where: str) -> tuple:
    if _present(row, "image"):
        data = row["image"].strip()
        if len(data) <= 64 and data in images_by_index and images_by_index[data].strip() != data:
            data = images_by_index[data].strip()  # a reference to the row holding the image
        return tuple(_decode_image(item, where) for item in _listed(data))
    if _present(row, "image_path"):
        paths = []
        for item in _listed(row["image_path"]):
            full = item if os.path.isabs(item) else os.path.join(folder, item)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{where}: image {item!r} not found (looked for {full})")
            paths.append(full)
        return tuple(paths)
    return ()


def load(data: str, *, split: str = "test", limit: int | None = None, seed: int | None = 0,
         ocr_size: int | tuple[int, int] = (112, 56)) -> list[EvalSample]:
    """Samples from a name or a file: ``easy_vqa`` (``split``), ``ocr`` (``limit`` samples, 100 by
    default, generated with ``seed``), a ``.jsonl`` file or a ``.tsv`` file."""
    if data == "easy_vqa":
        return easy_vqa(split, limit, seed)
    if data == "ocr":
        return synthetic_ocr(100 if limit is None else limit, 0 if seed is None else seed, ocr_size)
    lower = data.lower()
    if lower.endswith(".jsonl"):
        return jsonl(data, limit, seed)
    if lower.endswith(".tsv"):
        return vlmevalkit_tsv(data, limit, seed)
    raise ValueError(f"--data must be 'easy_vqa', 'ocr', a .jsonl or a .tsv file; got {data!r}")
