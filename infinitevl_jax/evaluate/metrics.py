"""Answer scoring: VQA normalisation, exact match, the VQAv2 soft score, and ANLS.

VQA normalisation (the steps the official VQA evaluation script describes, written from that
description):

1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation: each mark of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the
   text has it next to a space (``"x ,"``, ``", x"``) or when the text holds a digit-comma-digit
   group such as ``1,000``; otherwise it becomes a space (``"black/white"`` -> ``"black white"``).
   A period is deleted unless it sits between two digits (``"3.5"`` keeps it). Apostrophes and
   colons are kept;
3. lowercase; split on whitespace; number words ``none, zero, one, ..., ten`` become digits
   (``none`` -> ``0``); the articles ``a``, ``an``, ``the`` are dropped; contractions written
   without their apostrophe get it back (``dont`` -> ``don't``, ``youre`` -> ``you're``);
   words are joined with single spaces.

Differences from the official script, on purpose: it normalises only when a question's ten
references disagree, we always normalise (as lmms-eval does), so ``"Two"`` matches ``"2"``
everywhere; its period rule also keeps a period before a digit (``".5"``), ours only between
digits; contractions that are also plain words (``ill``, ``well``, ``were``, ``its``, ``id``,
``im``, ``hell``, ``shell``, ``shed``, ``wed``) are left alone.

Scores of one prediction ``p`` against references ``r_1..r_n`` (``N`` = the normalisation):

- exact match: ``1 if N(p) == N(r_j) for some j else 0``;
- VQAv2 soft score with ``m = #{j : N(p) == N(r_j)}``: ``min(m / 3, 1)``; the official form
  averages that over the ``n`` leave-one-out subsets of the references, which in closed form is
  ``(m * min((m - 1) / 3, 1) + (n - m) * min(m / 3, 1)) / n``;
- ANLS (Biten et al. 2019, "Scene Text Visual Question Answering"): with ``a`` = ``p`` and ``b`` =
  ``r_j`` lowercased, whitespace-collapsed and stripped,
  ``NL(a, b) = lev(a, b) / max(|a|, |b|)`` (0 when both are empty),
  ``s(a, b) = 1 - NL(a, b) if NL(a, b) < tau else 0`` with ``tau = 0.5``, and the sample's score is
  ``max_j s(a, r_j)``; the data set's ANLS is the mean over samples.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# Contractions in their written form; a word equal to one of them with some or all apostrophes
# left out is mapped back to it. Words that are ordinary English without the apostrophe stay out.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i've",
    "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've", "mustn't",
    "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd", "she'd've", "she's", "should've",
    "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd",
    "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's",
    "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's",
    "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'd've", "you'd", "you'd've",
    "you'll", "you're", "you've",
)
_KEPT_AS_WORDS = frozenset({"ill", "well", "were", "its", "id", "im", "hell", "shell", "shed", "wed"})


def _contraction_table() -> dict[str, str]:
    """``{spelling without some/all apostrophes: contraction}`` for every contraction above."""
    table = {}
    for word in _CONTRACTIONS:
        parts = word.split("'")
        gaps = len(parts) - 1
        for mask in range(2 ** gaps - 1):  # bit i set: apostrophe i kept; the all-kept form is the word itself
            text = parts[0]
            for i, part in enumerate(parts[1:]):
                text += ("'" if mask >> i & 1 else "") + part
            if text and text not in _KEPT_AS_WORDS:
                table.setdefault(text, word)
    return table


CONTRACTIONS = _contraction_table()
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.|\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    """Step 2 of the module docstring: punctuation deleted or turned into spaces, periods outside numbers deleted."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if mark not in text:
            continue
        touches_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (touches_space or delete_all) else " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out)


def normalize_answer(text: str) -> str:
    """The VQA normalisation of ``text`` (module docstring): e.g. ``"The Two dogs."`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def _references(answers: str | Sequence[str]) -> list[str]:
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise ValueError("a sample needs at least one reference answer")
    return refs


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """True when the normalised prediction equals the normalised form of any reference."""
    target = normalize_answer(prediction)
    return any(normalize_answer(a) == target for a in _references(answers))


def vqa_soft_score(prediction: str, answers: Sequence[str], *, leave_one_out: bool = True) -> float:
    """VQAv2 accuracy ``min(#matches / 3, 1)`` over normalised answers (module docstring).

    ``leave_one_out`` (the official VQAv2 form): the mean of that score over the ``n`` subsets of
    ``n - 1`` references, i.e. ``(m min((m-1)/3, 1) + (n-m) min(m/3, 1)) / n``; with 10 references
    and ``m`` matches this is 0, 0.3, 0.6, 0.9, 1 for m = 0..4+ (rounded). Needs >= 3 references
    (fewer cannot reach 1 with the ``/3`` rule; use ``exact_match``).
    """
    refs = _references(answers)
    if len(refs) < 3:
        raise ValueError(f"the VQA soft score needs >= 3 reference answers; got {len(refs)}")
    target = normalize_answer(prediction)
    hits = [normalize_answer(a) == target for a in refs]
    if not leave_one_out:
        return min(sum(hits) / 3.0, 1.0)
    m = sum(hits)
    return sum(min((m - hit) / 3.0, 1.0) for hit in hits) / len(hits)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each of cost 1) by the two-row DP:
    ``D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1, D[i-1][j-1] + [a_i != b_j])``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.lower().split())


def anls_score(prediction: str, answers: str | Sequence[str], *, threshold: float = 0.5) -> float:
    """ANLS of one sample: ``max_j (1 - NL) if NL < threshold else 0`` (module docstring)."""
    pred = _anls_text(prediction)
    best = 0.0
    for ref in (_anls_text(a) for a in _references(answers)):
        longest = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean; NaN for no values (an empty evaluation has no score)."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
