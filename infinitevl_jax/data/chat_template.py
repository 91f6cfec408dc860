"""Conversations and Qwen2.5-VL's ChatML template, with a per-piece label flag for training.

A conversation renders as (Qwen2.5-VL's ``chat_template``)::

    <|im_start|>system\\n{system}<|im_end|>\\n          (default system turn if the first is not one)
    <|im_start|>{role}\\n{text}<|im_end|>\\n            (each message, role user / assistant / system)
    <|im_start|>assistant\\n                            (only with add_generation_prompt)

Images and videos sit in a message's text as ``<|vision_start|><|image_pad|><|vision_end|>``
(``<|video_pad|>``), one per item, in the order of ``Conversation.images`` / ``videos``.

Labels (what SFT trains on): each assistant message's text and its closing ``<|im_end|>``; the
``<|im_start|>assistant\\n`` header, the ``\\n`` after ``<|im_end|>`` and all other turns are
context. ``render_pieces`` returns the text as ``(piece, is_label)`` runs; a tokenizer encodes
each piece on its own (so a label boundary is always a token boundary, as at inference, where the
prompt ends with the assistant header and the reply is generated after it).
"""

from __future__ import annotations

import dataclasses

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Message:
    """One turn; ``text`` may hold ``IMAGE_PLACEHOLDER`` / ``VIDEO_PLACEHOLDER``."""

    role: str
    text: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Messages plus the media their placeholders refer to, in order of appearance.

    images: file paths, PIL images or uint8 arrays ``[H, W, C]`` (anything ``load_image`` takes);
    videos: anything ``load_video`` takes (frame directory, multi-frame file, ``[T, H, W, C]``
    array, list of frames). ``name`` identifies the record in error messages (e.g. ``file:17``).
    """

    messages: tuple[Message, ...]
    images: tuple = ()
    videos: tuple = ()
    name: str = "conversation"

    def __post_init__(self):
        if not self.messages:
            raise ValueError(f"{self.name}: a conversation needs at least one message")
        for i, message in enumerate(self.messages):
            if message.role not in ROLES:
                raise ValueError(f"{self.name}: message {i} has role {message.role!r}; roles are {ROLES}")
            if message.role == "system" and i:
                raise ValueError(f"{self.name}: only the first message may be a system turn (message {i} is)")
            if message.role == "assistant" and (IMAGE_PLACEHOLDER in message.text or VIDEO_PLACEHOLDER in message.text):
                raise ValueError(f"{self.name}: message {i} (assistant) holds an image/video; media belong to "
                                 "user or system turns")
        for placeholder, media, what in ((IMAGE_PLACEHOLDER, self.images, "image"),
                                         (VIDEO_PLACEHOLDER, self.videos, "video")):
            found = sum(m.text.count(placeholder) for m in self.messages)
            if found != len(media):
                raise ValueError(f"{self.name}: the messages hold {found} {what} placeholders but the record "
                                 f"has {len(media)} {what}s")


def render_pieces(messages, *, system: str = DEFAULT_SYSTEM_PROMPT,
                  add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """ChatML text of ``messages`` as maximal runs ``[(text, is_label), ...]`` (module docstring).

    ``system`` is used only when the first message is not a system turn.
    """
    pieces: list[tuple[str, bool]] = []

    def emit(text: str, is_label: bool):
        if pieces and pieces[-1][1] == is_label:
            pieces[-1] = (pieces[-1][0] + text, is_label)
        else:
            pieces.append((text, is_label))

    if not messages or messages[0].role != "system":
        emit(f"<|im_start|>system\n{system}<|im_end|>\n", False)
    for message in messages:
        emit(f"<|im_start|>{message.role}\n", False)
        emit(f"{message.text}<|im_end|>", message.role == "assistant")
        emit("\n", False)
    if add_generation_prompt:
        emit("<|im_start|>assistant\n", False)
    return pieces


def render_text(messages, *, system: str = DEFAULT_SYSTEM_PROMPT, add_generation_prompt: bool = False) -> str:
    """The whole ChatML string (``render_pieces`` joined)."""
    return "".join(text for text, _ in render_pieces(messages, system=system,
                                                     add_generation_prompt=add_generation_prompt))


def encode_pieces(pieces, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the pieces, each encoded on its own, and the per-token label flag."""
    ids, labels = [], []
    for text, is_label in pieces:
        piece_ids = tokenizer.encode(text)
        ids.extend(piece_ids)
        labels.extend([is_label] * len(piece_ids))
    return ids, labels
