"""Tokenizers: a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``) and a byte-level
tokenizer with Qwen2.5-VL's special tokens for the offline tiny model.

Both expose the same interface: ``encode(text) -> list[int]`` (special tokens written in the text
become their ids; nothing is added), ``decode(ids) -> str`` (special tokens kept),
``vocab_size``, ``eos_id`` (``<|im_end|>``, where a chat turn ends) and ``special_ids``
(``{token: id}`` for Qwen2.5-VL's special tokens).

Byte tokenizer: ids 0..255 are the UTF-8 bytes; the special tokens follow in ``SPECIAL_TOKENS``
order. Real checkpoints use their own ``tokenizer.json`` (Qwen's BPE, vocabulary 151,665 + padding
up to the model's 151,936 embedding rows).
"""

from __future__ import annotations

import os
import re

from infinitevl_jax.data.chat_template import DEFAULT_SYSTEM_PROMPT, Message, render_text

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)


class ByteTokenizer:
    """UTF-8 bytes plus special tokens; ``vocab_size`` = 256 + len(SPECIAL_TOKENS)."""

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.special_tokens = {i: tok for tok, i in self.special_ids.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    @property
    def eos_id(self) -> int:
        return self.special_ids["<|im_end|>"]

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self._split.split(text):
            if piece in self.special_ids:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        out, buffer = [], bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                buffer.append(i)
                continue
            out.append(buffer.decode("utf-8", errors="replace"))
            buffer = bytearray()
            out.append(self.special_tokens.get(i, f"<|unk_{i}|>"))
        out.append(buffer.decode("utf-8", errors="replace"))
        return "".join(out)


def chat_prompt(user_text: str, system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Qwen2.5-VL's ChatML template for one user turn, ending with the assistant header."""
    return render_text([Message("user", user_text)], system=system, add_generation_prompt=True)


class HFTokenizer:
    """A ``tokenizer.json`` (as shipped with Qwen2.5-VL and InfiniteVL checkpoints) via ``tokenizers``."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from None
        self.path = path
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.special_ids = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        if "<|im_end|>" not in self.special_ids:
            raise ValueError(f"{path} has no <|im_end|> token: not a Qwen2.5-VL-style chat tokenizer")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.special_ids["<|im_end|>"]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(directory: str | None):
    """The tokenizer of a checkpoint or run directory (its ``tokenizer.json``); the byte tokenizer
    for ``None`` (a preset with random weights)."""
    if directory is None:
        return ByteTokenizer()
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no tokenizer.json (checkpoints must ship their tokenizer)")
    return HFTokenizer(path)
