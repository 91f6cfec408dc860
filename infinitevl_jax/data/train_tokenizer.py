"""The quickstart tokenizer: a small byte-level BPE trained on easy-VQA chats (``tokenizers``).

    python -m infinitevl_jax.data.train_tokenizer [--out PATH] [--vocab-size 512]

rewrites ``infinitevl_jax/assets/quickstart_tokenizer.json`` (or PATH) bit-identically: the
corpus is every easy-VQA train conversation (question, answer) rendered with the Qwen2.5-VL chat
template, in the package's order, and BPE training is deterministic.

Layout: ids 0..255 are the 256 single bytes in byte order (GPT-2's byte-to-character map), ids
256..263 Qwen2.5-VL's special tokens in ``SPECIAL_TOKENS`` order, then one id per learned merge in
merge order. The byte and special ids are the ``ByteTokenizer``'s, so the ``tiny`` preset (vocab
512, its multimodal token ids) runs with either tokenizer. Pre-tokenisation is Qwen2's: split by
the regex below, then map bytes to characters; no normaliser, so ``decode(encode(text)) == text``.
"""

from __future__ import annotations

import argparse
import json
import os
import re

from infinitevl_jax.data.chat_template import render_text
from infinitevl_jax.data.sources import EasyVqaSource
from infinitevl_jax.data.tokenizer import SPECIAL_TOKENS, HFTokenizer

QUICKSTART_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "quickstart_tokenizer.json")
QUICKSTART_VOCAB_SIZE = 512
# Qwen2's pre-tokeniser split: contractions, letter runs (with one leading non-letter), single
# digits, punctuation runs, newline runs, and other whitespace.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def byte_characters() -> list[str]:
    """GPT-2's byte-level alphabet: the character standing for each byte 0..255 (printable Latin-1
    bytes stand for themselves, the others for chr(256), chr(257), ... in byte order)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def quickstart_corpus() -> list[str]:
    """The easy-VQA train conversations as ChatML text (one string each, in the package's order)."""
    source = EasyVqaSource("train")
    return [render_text(conversation.messages) for conversation in (source[i] for i in range(len(source)))]


def _empty_tokenizer(vocab=None, merges=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _between_special_tokens(texts):
    """The text between special tokens (which encoding splits off first; training does not)."""
    split = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    return [piece for text in texts for piece in split.split(text) if piece]


def _special_tokens():
    from tokenizers import AddedToken

    return [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]


def train_quickstart_tokenizer(vocab_size: int = QUICKSTART_VOCAB_SIZE, corpus: list[str] | None = None):
    """A ``tokenizers.Tokenizer`` in the module docstring's layout, trained on ``corpus``
    (default ``quickstart_corpus()``)."""
    from tokenizers import pre_tokenizers, trainers

    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed 256 bytes + {len(SPECIAL_TOKENS)} special tokens; got {vocab_size}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained = _empty_tokenizer()
    trained.train_from_iterator(_between_special_tokens(quickstart_corpus() if corpus is None else corpus),
                                trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(trained.to_str())["model"]["merges"]]

    vocab = {char: i for i, char in enumerate(byte_characters())}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = _empty_tokenizer(vocab, merges)
    tokenizer.add_special_tokens(_special_tokens())
    return tokenizer


def write_quickstart_tokenizer(path: str = QUICKSTART_TOKENIZER, vocab_size: int = QUICKSTART_VOCAB_SIZE) -> str:
    """Trains the tokenizer and writes its ``tokenizer.json`` (pretty-printed) to ``path``."""
    text = train_quickstart_tokenizer(vocab_size).to_str(pretty=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    return path


def quickstart_tokenizer() -> HFTokenizer:
    """The shipped quickstart tokenizer (``assets/quickstart_tokenizer.json``)."""
    return HFTokenizer(QUICKSTART_TOKENIZER)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the quickstart BPE tokenizer on easy-VQA chats.")
    parser.add_argument("--out", default=QUICKSTART_TOKENIZER, help="where to write tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=QUICKSTART_VOCAB_SIZE)
    args = parser.parse_args(argv)
    path = write_quickstart_tokenizer(args.out, args.vocab_size)
    print(f"wrote {path} ({HFTokenizer(path).vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
