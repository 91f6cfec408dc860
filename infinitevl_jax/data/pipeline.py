"""The training input pipeline (grain): source -> shuffle -> repeat -> host shard -> encode -> pack.

    ds = build_dataset(config.data, VisionLanguageConfig.from_config(config))
    it = iter(ds)                       # a grain DatasetIterator of PackedBatch (host-local rows)
    batch = next(it)
    state = it.get_state()              # a small dict: save it with the model checkpoint
    it.set_state(state)                 # resume: the following batches equal an uninterrupted run's

Order: the source's records are shuffled with ``seed`` (grain's index shuffle; every epoch gets
its own permutation), repeated ``num_epochs`` times (None: forever), then host ``i`` of ``n``
takes records ``i, i + n, i + 2n, ...`` of that global stream, so hosts read disjoint records and
the order depends only on the config. Each host encodes its records (``read_threads`` threads)
and packs them into ``batch_size / n`` rows of ``seq_len`` tokens; the global batch is the hosts'
rows stacked in process order (``jax.make_array_from_process_local_data``). A finite run ends with
a partly filled batch.

Every batch has the same shapes and dtypes (``PackedBatch``), so a jitted train step compiles
once. The settings live in an ml_collections section, ``default_data_config()``.
"""

from __future__ import annotations

import os

import grain
import jax
import ml_collections

from infinitevl_jax.data.chat_template import DEFAULT_SYSTEM_PROMPT
from infinitevl_jax.data.examples import ExampleEncoder
from infinitevl_jax.data.image_processor import ImageProcessor
from infinitevl_jax.data.packing import PackingSpec, PackIterDataset
from infinitevl_jax.data.sources import EasyVqaSource, LlavaSource, TfdsSource
from infinitevl_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from infinitevl_jax.data.train_tokenizer import quickstart_tokenizer
from infinitevl_jax.data.video import VideoProcessor
from infinitevl_jax.data.vision_budget import VisionBudget
from infinitevl_jax.models.config import VisionLanguageConfig

SOURCES = ("easy_vqa", "llava", "tfds")


def default_data_config() -> ml_collections.ConfigDict:
    """The ``data`` section (quickstart values: easy-VQA, the shipped tokenizer, the tiny model).

    source: easy_vqa | llava | tfds. split: easy_vqa / tfds split. path, image_folder: the LLaVA
    .json/.jsonl file and its media root (None: the file's folder). tfds_*: data set name, data
    dir and the record fields read. tokenizer: quickstart | byte | a checkpoint folder or a
    tokenizer.json path. seq_len, batch_size: tokens per row and global rows per step.
    max_patches: pixel rows per packed row; max_windows, max_slices, max_slice_patches: the rest
    of the row's vision budget (None: derived, ``VisionBudget.for_config``; the quickstart's
    64 admits images up to 112 x 112 px, 4x4 merged tokens). image_*/video_*:
    processor pixel bounds and frame sampling. shuffle, seed, num_epochs (None: forever).
    read_threads, read_buffer: encoding threads per host and examples encoded ahead;
    prefetch_batches: packed batches made ahead in a thread (0: off).
    """
    return ml_collections.ConfigDict(dict(
        source="easy_vqa", split="train", path="", image_folder=None,
        tfds_name="", tfds_data_dir=None, tfds_question_key="question", tfds_answer_key="answer",
        tfds_image_key="image",
        tokenizer="quickstart", system_prompt=DEFAULT_SYSTEM_PROMPT,
        seq_len=256, batch_size=8,
        max_patches=128, max_windows=None, max_slices=None, max_slice_patches=64,
        image_min_pixels=56 * 56, image_max_pixels=112 * 112,
        video_min_pixels=128 * 28 * 28, video_max_pixels=768 * 28 * 28, video_fps=2.0, video_max_frames=768,
        shuffle=True, seed=0, num_epochs=None,
        read_threads=4, read_buffer=64, prefetch_batches=2,
    ))


def make_tokenizer(name: str):
    """``quickstart`` (shipped BPE), ``byte``, a folder holding tokenizer.json, or a .json path."""
    if name == "quickstart":
        return quickstart_tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if os.path.isdir(name):
        return load_tokenizer(name)
    if os.path.isfile(name):
        return HFTokenizer(name)
    raise ValueError(f"data.tokenizer must be 'quickstart', 'byte', a checkpoint folder or a tokenizer.json "
                     f"path; {name!r} is none of these")


def make_source(data: ml_collections.ConfigDict):
    """The random-access ``Conversation`` source the section names."""
    if data.source == "easy_vqa":
        return EasyVqaSource(data.split)
    if data.source == "llava":
        if not data.path:
            raise ValueError("data.source='llava' needs data.path (a .json or .jsonl file)")
        return LlavaSource(data.path, data.image_folder)
    if data.source == "tfds":
        if not data.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name")
        return TfdsSource(data.tfds_name, data.split, data_dir=data.tfds_data_dir,
                          question_key=data.tfds_question_key, answer_key=data.tfds_answer_key,
                          image_key=data.tfds_image_key)
    raise ValueError(f"data.source must be one of {SOURCES}; got {data.source!r}")


def make_encoder(data: ml_collections.ConfigDict, model: VisionLanguageConfig, tokenizer) -> ExampleEncoder:
    """Conversation -> Example with the section's processors and the model's token ids."""
    if tokenizer.vocab_size > model.decoder.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.decoder.vocab_size} embedding rows")
    vision = model.vision
    if vision is None:
        return ExampleEncoder(tokenizer, model.tokens, None, system_prompt=data.system_prompt)
    sizes = dict(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                 merge_size=vision.spatial_merge_size)
    images = ImageProcessor(min_pixels=data.image_min_pixels, max_pixels=data.image_max_pixels, **sizes)
    videos = VideoProcessor(min_pixels=data.video_min_pixels, max_pixels=data.video_max_pixels, fps=data.video_fps,
                            max_frames=data.video_max_frames, **sizes)
    return ExampleEncoder(tokenizer, model.tokens, vision, images, videos, data.system_prompt)


def make_packing_spec(data: ml_collections.ConfigDict, model: VisionLanguageConfig, rows: int) -> PackingSpec:
    """``rows`` rows of ``data.seq_len`` tokens and the section's per-row vision budget."""
    budget = None if model.vision is None else VisionBudget.for_config(
        model.vision, data.max_patches, max_windows=data.max_windows, max_slices=data.max_slices,
        max_slice_patches=data.max_slice_patches, min_pixels=min(data.image_min_pixels, data.video_min_pixels),
        max_pixels=max(data.image_max_pixels, data.video_max_pixels))
    return PackingSpec(rows=rows, seq_len=data.seq_len, tokens=model.tokens, vision=model.vision, budget=budget)


def host_rows(batch_size: int, process_count: int) -> int:
    """Rows each host packs: the global batch split evenly over hosts."""
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"data.batch_size ({batch_size}) must be a positive multiple of the host count "
                         f"({process_count})")
    return batch_size // process_count


def build_dataset(data: ml_collections.ConfigDict, model: VisionLanguageConfig, *, process_index: int | None = None,
                  process_count: int | None = None, source=None) -> grain.IterDataset:
    """This host's ``IterDataset`` of ``PackedBatch`` (module docstring).

    process_index / process_count default to ``jax.process_index()`` / ``jax.process_count()``;
    ``source`` replaces the section's source (any sequence of ``Conversation``).
    """
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..{process_count - 1}")
    spec = make_packing_spec(data, model, host_rows(data.batch_size, process_count))
    encoder = make_encoder(data, model, make_tokenizer(data.tokenizer))
    records = make_source(data) if source is None else source
    if len(records) == 0:
        raise ValueError("the data source is empty")
    ds = grain.MapDataset.source(records)
    if data.shuffle:
        ds = ds.shuffle(seed=data.seed)
    ds = ds.repeat(data.num_epochs)[process_index::process_count].map(encoder)
    ds = PackIterDataset(ds.to_iter_dataset(grain.ReadOptions(num_threads=data.read_threads,
                                                                     prefetch_buffer_size=data.read_buffer)), spec)
    if data.prefetch_batches:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data.prefetch_batches)
    return ds
