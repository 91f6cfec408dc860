"""A byte-level tokenizer with Qwen2.5-VL's special tokens, for the offline tiny model.

Ids 0..255 are the UTF-8 bytes; the special tokens follow in ``SPECIAL_TOKENS`` order. Real
checkpoints use their own ``tokenizer.json`` (Qwen's BPE, vocabulary 151936).
"""

from __future__ import annotations

import re

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


def chat_prompt(user_text: str, system: str = "You are a helpful assistant.") -> str:
    """Qwen2.5-VL's ChatML template for one user turn, ending with the assistant header."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n"
            f"<|im_start|>user\n{user_text}<|im_end|>\n"
            f"<|im_start|>assistant\n")
