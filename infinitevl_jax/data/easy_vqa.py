"""The easy-VQA data set bundled with the ``easy-vqa`` pip package (real PNG images, offline)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class VQASample:
    image_path: str
    question: str
    answer: str


def load_easy_vqa(split: str = "test") -> list[VQASample]:
    """All samples of a split, ordered as the package lists its questions."""
    import easy_vqa

    readers = {
        "train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
        "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths),
    }
    if split not in readers:
        raise ValueError(f"easy-vqa split must be one of {sorted(readers)}; got {split!r}")
    read_questions, read_paths = readers[split]
    try:
        questions, answers, image_ids = read_questions()
        paths = read_paths()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the installed easy-vqa package has no {split!r} split ({e.filename})") from None
    return [VQASample(paths[i], q, a) for q, a, i in zip(questions, answers, image_ids)]
