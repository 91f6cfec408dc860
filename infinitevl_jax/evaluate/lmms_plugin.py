"""An lmms-eval model backed by ``infinitevl_jax`` (JAX generation; strings in, strings out).

lmms-eval (EvolvingLMMs-Lab/lmms-eval) is not a dependency: this module imports it only when a
model class is first looked up, which lmms-eval itself does. Registration:

- Entry point (lmms-eval's documented plugin mechanism for external packages): ``pyproject.toml``
  declares ``[project.entry-points."lmms_eval.models"] infinitevl_jax =
  "infinitevl_jax.evaluate.lmms_plugin:manifests"``; lmms-eval's model registry calls
  ``manifests()`` and gets a ``ModelManifest`` with both a chat class (``InfiniteVL``, used by
  default: requests carry ``doc_to_messages``) and a simple one (``InfiniteVLSimple``, used with
  ``--force_simple``: requests carry a text context and ``doc_to_visual``). After
  ``pip install -e .`` in the same environment::

      python -m lmms_eval --model infinitevl_jax --model_args pretrained=/path/to/checkpoint \\
          --tasks textvqa_val --batch_size 8

- lmms-eval versions without the entry-point registry (their ``LMMS_EVAL_PLUGINS`` variable
  needs a ``<package>.models.<name>`` module layout): ``python -m
  infinitevl_jax.evaluate.lmms_plugin <lmms-eval arguments>`` registers the model in whichever
  registry the installed lmms-eval has, then runs lmms-eval's command line.

``--model_args``: ``pretrained=DIR`` (a checkpoint or run directory with its tokenizer.json) or
``config=PRESET`` (random weights, for smoke tests; default ``tiny``), ``tokenizer=NAME``
(``make_tokenizer`` names; default the checkpoint's, or ``byte``), ``batch_size``,
``max_new_tokens`` (default for tasks that give none: 128), ``param_dtype``, ``chunk_size``,
``seed``. From Python, ``InfiniteVL(model=vlm, tokenizer=tok)`` wraps an existing model.

Supported requests: one user turn of images and text (images are shown before the text, as
``infer.generate`` does); generation kwargs ``max_new_tokens``, ``temperature`` (0: greedy),
``top_p``, ``top_k``, ``do_sample``, ``until`` (the answer is cut at the first stop string) and
``num_beams == 1``. Videos, audio, system prompts, multi-turn chats, beam search and log-likelihood
requests raise ``NotImplementedError`` naming the task.
"""

from __future__ import annotations

import importlib
import io
import sys
from typing import Any

MODEL_ID = "infinitevl_jax"
DEFAULT_MAX_NEW_TOKENS = 128
_CLASSES: dict[str, type] = {}


def manifests():
    """The entry-point payload: lmms-eval's ``ModelManifest`` for ``MODEL_ID``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.InfiniteVLSimple",
                          chat_class_path=f"{__name__}.InfiniteVL")]


def _image(value, where: str):
    """A ``Request`` image (PIL image, array or path) from an lmms-eval visual."""
    from PIL import Image

    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets' encoded image
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, str):
        if value.lower().endswith((".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wav", ".mp3", ".flac")):
            raise NotImplementedError(f"{where}: videos and audio are not supported by the infinitevl_jax plugin "
                                      f"(got {value!r}); it answers image questions")
        return value
    if hasattr(value, "convert") or hasattr(value, "__array__"):
        return value
    raise NotImplementedError(f"{where}: unsupported visual of type {type(value).__name__}")


def _field(obj, name: str, default=None):
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def request_from_messages(messages, where: str):
    """``infer.generate.Request`` of a chat request's messages (lmms-eval's ``doc_to_messages``
    output: ``[{"role": "user", "content": [{"type": "image", "url": ...}, {"type": "text",
    "text": ...}]}]``, as dicts or as ``lmms_eval.protocol`` objects). Text parts are joined with
    newlines; images keep their order and come before the text."""
    from infinitevl_jax.infer.generate import Request

    if hasattr(messages, "messages"):
        messages = messages.messages
    roles = [_field(m, "role") for m in messages]
    if roles != ["user"]:
        raise NotImplementedError(f"{where}: the infinitevl_jax plugin answers one user turn with the model's default "
                                  f"system prompt; got messages with roles {roles}")
    texts, images = [], []
    content = _field(messages[0], "content")
    for part in [content] if isinstance(content, str) else content:
        kind = "text" if isinstance(part, str) else _field(part, "type")
        if kind == "text":
            texts.append(part if isinstance(part, str) else _field(part, "text"))
        elif kind == "image":
            images.append(_image(_field(part, "url", _field(part, "image")), where))
        else:
            raise NotImplementedError(f"{where}: {kind} inputs are not supported by the infinitevl_jax plugin")
    return Request("\n".join(texts), tuple(images))


def request_from_context(context: str, visuals, where: str):
    """``Request`` of a simple request: the text context (lmms-eval's ``<image>`` markers removed)
    and ``doc_to_visual``'s images."""
    from infinitevl_jax.infer.generate import Request

    flat = []
    for visual in visuals or []:
        flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
    return Request(context.replace("<image>", "").strip(), tuple(_image(v, where) for v in flat))


def sampling_of(gen_kwargs: dict, where: str):
    """``(SamplingConfig, max_new_tokens or None, stop strings)`` from lmms-eval generation kwargs."""
    from infinitevl_jax.infer.sampling import SamplingConfig

    if int(gen_kwargs.get("num_beams", 1) or 1) != 1:
        raise NotImplementedError(f"{where}: beam search (num_beams={gen_kwargs['num_beams']}) is not supported")
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    sampling = SamplingConfig(temperature=temperature, top_k=int(gen_kwargs.get("top_k") or 0),
                              top_p=float(gen_kwargs.get("top_p") or 1.0) if temperature > 0 else 1.0)
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = gen_kwargs.get("max_new_tokens")
    return sampling, (int(max_new) if max_new is not None else None), until


def cut_at_stops(text: str, until) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class _InfiniteVLBase:
    """Everything but the lmms-eval base class (mixed in by ``InfiniteVL`` / ``InfiniteVLSimple``)."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, config: str = "tiny", tokenizer: Any = None,
                 batch_size: int | str = 1, max_new_tokens: int | str | None = None, param_dtype: str | None = None,
                 chunk_size: int | str = 4096, seed: int | str = 0, model: Any = None, device: Any = None,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"unknown model_args for the infinitevl_jax model: {sorted(unknown)}; known: pretrained, "
                            f"config, tokenizer, batch_size, max_new_tokens, param_dtype, chunk_size, seed")
        from infinitevl_jax.data.pipeline import make_tokenizer
        from infinitevl_jax.data.tokenizer import load_tokenizer

        if model is not None:
            if tokenizer is None:
                raise ValueError("model= needs its tokenizer= (an object or a make_tokenizer name)")
            self.model = model
            self.pretrained = None
        elif pretrained:
            from infinitevl_jax.convert.pretrained import load_pretrained

            self.model = load_pretrained(pretrained, param_dtype=param_dtype)
            tokenizer = load_tokenizer(pretrained) if tokenizer is None else tokenizer
            self.pretrained = str(pretrained)
        else:
            from flax import nnx

            from infinitevl_jax.config import load_config
            from infinitevl_jax.models.config import VisionLanguageConfig
            from infinitevl_jax.models.vlm import VisionLanguageModel

            cfg = VisionLanguageConfig.from_config(load_config(config)).with_dtypes(param_dtype=param_dtype)
            self.model = VisionLanguageModel(cfg, rngs=nnx.Rngs(int(seed)))
            tokenizer = "byte" if tokenizer is None else tokenizer
            self.pretrained = None
        self.tokenizer = make_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.batch_size = int(batch_size)
        self.max_new_tokens = None if max_new_tokens is None else int(max_new_tokens)
        self.chunk_size = int(chunk_size)
        self.seed = int(seed)
        self.model_name = self.pretrained or f"infinitevl_jax:{config}"
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")

    # lmms-eval's ``Instance.args`` layouts
    def _parse(self, instance):
        args = tuple(instance.args)
        if self.is_simple:
            if len(args) != 6:
                raise ValueError(f"a simple lmms-eval request has 6 args (contexts, gen_kwargs, doc_to_visual, doc_id, "
                                 f"task, split); got {len(args)}")
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
            where = f"{task}/{split}/{doc_id}"
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            request = request_from_context(context, visuals, where)
        else:
            if len(args) != 6:
                raise ValueError(f"a chat lmms-eval request has 6 args (context, doc_to_messages, gen_kwargs, doc_id, "
                                 f"task, split); got {len(args)}")
            context, doc_to_messages, gen_kwargs, doc_id, task, split = args
            where = f"{task}/{split}/{doc_id}"
            request = request_from_messages(doc_to_messages(self.task_dict[task][split][doc_id]), where)
        sampling, max_new, until = sampling_of(dict(gen_kwargs or {}), where)
        max_new = max_new or self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        return context, dict(gen_kwargs or {}), request, (sampling, max_new), until

    def generate_until(self, requests) -> list[str]:
        """Answers in request order. Requests with the same sampling settings and token budget are
        batched (``batch_size`` rows, fixed shape: see ``vqa.generate_in_batches``); each answer is
        cut at its ``until`` strings."""
        from infinitevl_jax.evaluate.vqa import generate_in_batches

        parsed = [self._parse(r) for r in requests]
        groups: dict = {}
        for i, item in enumerate(parsed):
            groups.setdefault(item[3], []).append(i)
        results: list[str | None] = [None] * len(parsed)
        hook = getattr(self, "cache_hook", None)
        for (sampling, max_new), indices in groups.items():
            done = 0
            for answers in generate_in_batches(self.model, self.tokenizer, [parsed[i][2] for i in indices],
                                               batch_size=self.batch_size, max_new_tokens=max_new, sampling=sampling,
                                               seed=self.seed, chunk_size=self.chunk_size):
                for answer in answers:
                    i = indices[done]
                    context, gen_kwargs, _, _, until = parsed[i]
                    results[i] = cut_at_stops(answer.text, until).strip()
                    if hook is not None and hasattr(hook, "add_partial"):
                        hook.add_partial("generate_until", (context, gen_kwargs), results[i])
                    done += 1
        return results

    def loglikelihood(self, requests):
        raise NotImplementedError("the infinitevl_jax lmms-eval model implements generate_until only: tasks whose "
                                  "output_type is loglikelihood (or multiple_choice scored by likelihood) are not "
                                  "supported; use their generate_until variants")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the infinitevl_jax lmms-eval model answers single-turn requests only "
                                  "(generate_until); multi-round generation is not implemented")


def _build(name: str) -> type:
    """Defines ``InfiniteVL`` and ``InfiniteVLSimple`` on top of ``lmms_eval.api.model.lmms``."""
    if not _CLASSES:
        try:
            from lmms_eval.api.model import lmms
        except ImportError as e:
            raise ImportError("infinitevl_jax.evaluate.lmms_plugin needs lmms-eval (pip install lmms-eval); it is "
                              "loaded by lmms-eval's model registry") from e

        class InfiniteVL(_InfiniteVLBase, lmms):
            """Chat model: requests carry ``doc_to_messages`` (lmms-eval's default lane)."""

            is_simple = False

        class InfiniteVLSimple(_InfiniteVLBase, lmms):
            """Simple model: requests carry a text context and ``doc_to_visual`` (``--force_simple``)."""

            is_simple = True

        for cls in (InfiniteVL, InfiniteVLSimple):
            cls.__module__ = __name__
            _CLASSES[cls.__name__] = cls
    return _CLASSES[name]


def __getattr__(name: str):
    """``InfiniteVL`` / ``InfiniteVLSimple`` are created on first access (module-level lazy import)."""
    if name in ("InfiniteVL", "InfiniteVLSimple"):
        return _build(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(models_module=None) -> None:
    """Registers ``MODEL_ID`` in the installed lmms-eval's model registry: the entry-point
    registry (``MODEL_REGISTRY_V2``) when it has one, else the ``AVAILABLE_MODELS`` table of
    lmms-eval versions that import models by class path."""
    models = models_module or importlib.import_module("lmms_eval.models")
    registry = getattr(models, "MODEL_REGISTRY_V2", None)
    if registry is not None:
        registry.register_manifests(manifests(), overwrite=True)
        return
    table = getattr(models, "AVAILABLE_MODELS", None)
    if not isinstance(table, dict):
        raise RuntimeError("this lmms-eval has neither MODEL_REGISTRY_V2 nor an AVAILABLE_MODELS table; "
                           "register the model by hand")
    table[MODEL_ID] = f"{__name__}.InfiniteVLSimple"


def main(argv=None) -> None:
    """``python -m infinitevl_jax.evaluate.lmms_plugin <lmms-eval arguments>``."""
    register()
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
