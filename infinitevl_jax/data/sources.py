"""Random-access sources of ``Conversation`` records (what ``grain.MapDataset.source`` takes).

- ``EasyVqaSource(split)``: the easy-VQA set bundled with the ``easy-vqa`` pip package (38,575
  train / 9,673 test questions on 64x64 PNGs), one user turn (image + question) and the answer.
- ``LlavaSource(path, image_folder=None)``: a LLaVA-style ``.json`` (a list) or ``.jsonl`` (one
  record per line) file. Two record layouts::

      {"image": "a.png" | ["a.png", ...], "video": "clip.gif" | [...],
       "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is ...?"}, ...]}
      {"images": [...], "videos": [...],
       "messages": [{"role": "user" | "assistant" | "system",
                     "content": "<image>..." | [{"type": "image", "image": "a.png"}, {"type": "text", "text": "..."}]}]}

  ``<image>`` / ``<video>`` tags mark where each medium goes (in list order); a record with media
  and no tags gets them at the start of its first user turn (LLaVA's convention). Media given as
  typed content parts are taken in order of appearance, and then the record must not also list
  top-level media. Relative paths are resolved against ``image_folder`` (default: the file's
  folder). Files are read when a record is encoded; a missing file raises an error that names the
  record (``file[index]``).
- ``TfdsSource(name, split, ...)``: a tensorflow-datasets data set by name, read with
  ``tfds.data_source`` (random access); each record gives one question / answer turn and an
  optional image (fields named by ``question_key``, ``answer_key``, ``image_key``).
  tensorflow-datasets is imported lazily (it is not a dependency); the tests use a fake module.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Sequence

from infinitevl_jax.data.chat_template import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Conversation, Message
from infinitevl_jax.data.easy_vqa import load_easy_vqa

_ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_TAGS = (("<image>", IMAGE_PLACEHOLDER), ("<video>", VIDEO_PLACEHOLDER))


class _ConversationSource(Sequence):
    """A list of raw records converted to ``Conversation`` on access (errors name the record)."""

    def __init__(self, records: Sequence):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise TypeError(f"{type(self).__name__} takes integer indices")
        return self._convert(self._records[index], index)

    @abc.abstractmethod
    def _convert(self, record, index: int) -> Conversation:
        """The record at ``index`` as a conversation (each source defines its layout)."""


def qa_conversation(question: str, answer: str, images: tuple = (), name: str = "conversation") -> Conversation:
    """One user turn (the images, then the question) and the assistant's answer."""
    return Conversation((Message("user", IMAGE_PLACEHOLDER * len(images) + question), Message("assistant", answer)),
                        images=tuple(images), name=name)


class EasyVqaSource(_ConversationSource):
    """easy-VQA questions as single-turn conversations (module docstring)."""

    def __init__(self, split: str = "train"):
        super().__init__(load_easy_vqa(split))
        self.split = split

    def _convert(self, sample, index: int) -> Conversation:
        return qa_conversation(sample.question, sample.answer, (sample.image_path,), f"easy-vqa {self.split}[{index}]")


def _read_records(path: str) -> list:
    """The records of a ``.json`` list or a ``.jsonl`` file (errors name the line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"conversation file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        if not path.endswith(".jsonl"):
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); use .jsonl for one record per line") from None
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json conversation file must hold a list of records")
            return records
        return [record for _, record in json_lines(f, path)]


def json_lines(lines, path: str):
    """(line number, parsed record) of each non-blank line of a JSONL file; a line that is not
    JSON is a ``ValueError`` naming ``path:line``."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


class LlavaSource(_ConversationSource):
    """LLaVA-style JSON / JSONL conversations (module docstring)."""

    def __init__(self, path: str, image_folder: str | None = None):
        super().__init__(_read_records(path))
        self.path = path
        self.image_folder = os.path.dirname(os.path.abspath(path)) if image_folder is None else image_folder

    def _convert(self, record, index: int) -> Conversation:
        name = f"{self.path}[{index}]"
        if not isinstance(record, dict):
            raise ValueError(f"{name}: a record must be a JSON object; got {type(record).__name__}")
        if "id" in record:
            name += f" (id {record['id']})"
        images = _as_list(record.get("image", record.get("images")))
        videos = _as_list(record.get("video", record.get("videos")))
        if "conversations" in record:
            turns = [(self._role(turn.get("from"), name, i), turn.get("value")) for i, turn
                     in enumerate(self._turns(record, "conversations", name))]
        elif "messages" in record:
            turns = []
            for i, turn in enumerate(self._turns(record, "messages", name)):
                text, part_images, part_videos = self._content(turn.get("content"), name, i)
                if (part_images or part_videos) and (images or videos):
                    raise ValueError(f"{name}: media given both as content parts and as top-level lists")
                turns.append((self._role(turn.get("role"), name, i), text))
                images, videos = images + part_images, videos + part_videos
        else:
            raise ValueError(f"{name}: a record needs 'conversations' (from/value) or 'messages' (role/content)")
        for i, (_, text) in enumerate(turns):
            if not isinstance(text, str):
                raise ValueError(f"{name}: turn {i} has no text (got {type(text).__name__})")
        texts = self._place_media([text for _, text in turns], [role for role, _ in turns], images, videos, name)
        messages = tuple(Message(role, text) for (role, _), text in zip(turns, texts))
        return Conversation(messages, tuple(self._resolve(p) for p in images),
                            tuple(self._resolve(p) for p in videos), name)

    @staticmethod
    def _turns(record, key, name):
        turns = record[key]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise ValueError(f"{name}: '{key}' must be a list of objects")
        return turns

    @staticmethod
    def _role(role, name, i) -> str:
        if role not in _ROLE_OF:
            raise ValueError(f"{name}: turn {i} has speaker {role!r}; expected one of {sorted(_ROLE_OF)}")
        return _ROLE_OF[role]

    @staticmethod
    def _content(content, name, i) -> tuple[str, list, list]:
        """A string (tags kept) or typed parts -> text with tags, and the parts' media in order."""
        if isinstance(content, str) or content is None:
            return content, [], []
        text, images, videos = [], [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text.append(part.get("text", ""))
            elif kind in ("image", "video") and isinstance(part.get(kind), str):
                text.append(f"<{kind}>")
                (images if kind == "image" else videos).append(part[kind])
            else:
                raise ValueError(f"{name}: turn {i} has a content part {part!r}; expected "
                                 "{'type': 'text'|'image'|'video', ...} with a text or a path")
        return "".join(text), images, videos

    @staticmethod
    def _place_media(texts, roles, images, videos, name) -> list[str]:
        """``<image>``/``<video>`` tags -> placeholders; untagged media go before the first user text."""
        prefix = ""
        for (tag, placeholder), media in zip(_TAGS, (images, videos)):
            found = sum(t.count(tag) for t in texts)
            if found == 0:
                prefix += placeholder * len(media)
            elif found != len(media):
                raise ValueError(f"{name}: {found} {tag} tags but {len(media)} {tag[1:-1]}s in the record")
        texts = [t.replace("<image>", IMAGE_PLACEHOLDER).replace("<video>", VIDEO_PLACEHOLDER) for t in texts]
        if prefix:
            if "user" not in roles:
                raise ValueError(f"{name}: the record has media but no user turn to put them in")
            first = roles.index("user")
            texts[first] = prefix + texts[first]
        return texts

    def _resolve(self, path):
        if not isinstance(path, str):
            raise ValueError(f"{self.path}: media entries must be path strings; got {type(path).__name__}")
        return path if os.path.isabs(path) else os.path.join(self.image_folder, path)


def _text(value) -> str:
    """A tfds text feature (bytes, numpy bytes scalar or str) as str."""
    value = value.item() if hasattr(value, "item") else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource(_ConversationSource):
    """A tensorflow-datasets data set by name as question/answer conversations (module docstring).

    Needs ``tensorflow-datasets`` (not installed by this package) and the data set prepared in
    ``data_dir`` (``tfds.data_source`` reads its ArrayRecord files). ``image_key`` "" (or None):
    text only.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None, question_key: str = "question",
                 answer_key: str = "answer", image_key: str | None = "image"):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise ImportError(f"the tfds source ({name!r}) needs tensorflow-datasets: pip install tensorflow-datasets "
                              "array_record, prepare the data set (tfds build), then set data.tfds_data_dir; or "
                              "use data.source='llava' / 'easy_vqa'") from None
        super().__init__(tfds.data_source(name, split=split, data_dir=data_dir))
        self.name, self.split = name, split
        self.keys = {"question": question_key, "answer": answer_key, "image": image_key or None}

    def _convert(self, record, index: int) -> Conversation:
        name = f"tfds {self.name}/{self.split}[{index}]"
        missing = [key for key in self.keys.values() if key is not None and key not in record]
        if missing:
            raise ValueError(f"{name}: record has no field(s) {missing}; fields: {sorted(record)}")
        images = () if self.keys["image"] is None else (record[self.keys["image"]],)
        return qa_conversation(_text(record[self.keys["question"]]), _text(record[self.keys["answer"]]), images, name)
