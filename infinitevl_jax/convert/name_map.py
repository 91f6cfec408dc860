"""One name map for the Qwen2.5-VL / InfiniteVL family, used in both directions.

Every PyTorch tensor of a checkpoint is one ``Entry``: its key, the path of our parameter, the
index on our stacked block axis (or None for unstacked parameters) and a ``Layout`` that turns
our array into the PyTorch one and back. The entries are enumerated from the configs, so the
layer pattern (``layer_types``, ``fullatt_block_indexes``) decides which keys exist.

Our layouts (spec section 6.3):
- Dense kernels are ``[in, out]``; PyTorch Linear weights are ``[out, in]`` (``linear``);
- depthwise conv kernels are ``[width, channels]``; PyTorch Conv1d weights ``[channels, 1, width]``;
- the ViT patch embedding is a Dense ``[C*T*P*P, hidden]``; PyTorch holds the Conv3d weight
  ``[hidden, C, T, P, P]`` with the same (C, T, P, P) flattening;
- the tied/untied head ``lm_head`` is ``[hidden, vocab]``; PyTorch ``[vocab, hidden]``.

Key styles: ``legacy`` (``model.layers.*``, ``visual.*``; what hub checkpoints and the official
InfiniteVL release hold) and ``modern`` (``model.language_model.*``, ``model.visual.*``; what
transformers >= 4.52 keeps in memory). ``lm_head.weight`` is the same in both.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Mapping, NamedTuple

import numpy as np

from infinitevl_jax.models.config import DecoderConfig, VisionConfig, smallest_period

KEY_STYLES = {
    "legacy": {"decoder": "model.", "vision": "visual."},
    "modern": {"decoder": "model.language_model.", "vision": "model.visual."},
}
HEAD_KEY = "lm_head.weight"


class Layout(NamedTuple):
    """``to_torch(ours) -> torch array`` and ``from_torch(torch array) -> ours`` (NumPy, exact)."""

    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]


COPY = Layout(lambda a: a, lambda t: t)
LINEAR = Layout(lambda a: a.T, lambda t: t.T)
DEPTHWISE_CONV = Layout(lambda a: a.T[:, None, :], lambda t: t[:, 0, :].T)


def patch_conv_layout(cfg: VisionConfig) -> Layout:
    """Conv3d ``[hidden, C, T, P, P]`` <-> Dense kernel ``[C*T*P*P, hidden]``."""
    kernel = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
    return Layout(lambda a: a.T.reshape(a.shape[1], *kernel), lambda t: t.reshape(t.shape[0], -1).T)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One PyTorch tensor. ``path``: our parameter path; ``block``: index on the stacked axis."""

    key: str
    path: tuple
    block: int | None
    layout: Layout


def _linear(name: str, bias: bool = False) -> list[tuple[str, str, Layout]]:
    rules = [(f"{name}.weight", f"{name}.kernel", LINEAR)]
    return rules + ([(f"{name}.bias", f"{name}.bias", COPY)] if bias else [])


def _norm(name: str) -> list[tuple[str, str, Layout]]:
    return [(f"{name}.weight", f"{name}.weight", COPY)]


# Per decoder layer: PyTorch name under ``layers.{i}.`` -> our name under the layer module.
_DECODER_COMMON = (_norm("input_layernorm") + _norm("post_attention_layernorm")
                   + _linear("mlp.gate_proj") + _linear("mlp.up_proj") + _linear("mlp.down_proj"))


def _mixer(rules: list[tuple[str, str, Layout]]) -> list[tuple[str, str, Layout]]:
    """Both mixers live under ``self_attn.`` in PyTorch and under ``mixer.`` here."""
    return [(f"self_attn.{t}", f"mixer.{o}", lay) for t, o, lay in rules]


_ATTENTION = _mixer(_linear("q_proj", True) + _linear("k_proj", True) + _linear("v_proj", True)
                    + _linear("o_proj"))
_GATED_DELTANET = _mixer(
    sum((_linear(n) for n in ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj")), [])
    + _norm("o_norm")
    + [(f"{x}_conv1d.weight", f"{x}_conv", DEPTHWISE_CONV) for x in "qkv"]
    + [("A_log", "A_log", COPY), ("dt_bias", "dt_bias", COPY)])
# LinMU's M-MATE (no official checkpoint exists; these keys are ours, PyTorch-laid-out).
_MMATE = _mixer(
    [(f"flex_ma.{t}", f"flex_ma.{o}", lay) for t, o, lay in
     _linear("x_proj", True) + _linear("B_proj", True) + _linear("C_proj", True)
     + sum((_linear(n) for n in ("z_proj", "dt_proj", "dir_proj", "out_proj")), []) + _norm("o_norm")
     + [(f"{x}_conv1d.weight", f"{x}_conv", DEPTHWISE_CONV) for x in "xBC"]
     + [("A_log", "A_log", COPY), ("dt_bias", "dt_bias", COPY), ("D", "D", COPY)]]
    + [(f"local_swin.{t}", f"local_swin.{o}", lay) for t, o, lay in
       _linear("q_proj", True) + _linear("k_proj", True) + _linear("v_proj", True) + _linear("o_proj")]
    + _linear("mix_proj", True))
DECODER_LAYER_RULES = {
    "sliding_attention": _DECODER_COMMON + _ATTENTION,
    "full_attention": _DECODER_COMMON + _ATTENTION,
    "linear_attention": _DECODER_COMMON + _GATED_DELTANET,
    "mmate": _DECODER_COMMON + _MMATE,
    "mmate_shifted": _DECODER_COMMON + _MMATE,
}
VISION_BLOCK_RULES = (_norm("norm1") + _norm("norm2") + _linear("attn.qkv", True) + _linear("attn.proj", True)
                      + _linear("mlp.gate_proj", True) + _linear("mlp.up_proj", True)
                      + _linear("mlp.down_proj", True))


def _split(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def _stacked(prefix: str, root: str, pattern_of_layer: tuple, rules_of: Callable) -> Iterator[Entry]:
    """Layer i of the PyTorch list is position ``i % period`` of stacked block ``i // period``."""
    period = len(smallest_period(pattern_of_layer))
    for i, kind in enumerate(pattern_of_layer):
        for torch_name, ours, layout in rules_of(kind):
            path = (root, "layers", i % period, *_split(ours))
            yield Entry(f"{prefix}{i}.{torch_name}", path, i // period, layout)


def decoder_entries(cfg: DecoderConfig, style: str = "legacy") -> list[Entry]:
    """Entries of the text decoder (paths relative to ``Decoder``); the head only when untied."""
    prefix = KEY_STYLES[style]["decoder"]
    entries = [Entry(f"{prefix}embed_tokens.weight", ("embed_tokens",), None, COPY),
               Entry(f"{prefix}norm.weight", ("norm", "weight"), None, COPY)]
    entries += _stacked(f"{prefix}layers.", "blocks", cfg.layer_types, DECODER_LAYER_RULES.__getitem__)
    if not cfg.tie_word_embeddings:
        entries.append(Entry(HEAD_KEY, ("lm_head",), None, LINEAR))
    return entries


def vision_entries(cfg: VisionConfig, style: str = "legacy") -> list[Entry]:
    """Entries of the ViT + merger (paths relative to ``VisionTransformer``)."""
    prefix = KEY_STYLES[style]["vision"]
    entries = [Entry(f"{prefix}patch_embed.proj.weight", ("patch_embed", "kernel"), None, patch_conv_layout(cfg))]
    entries += _stacked(f"{prefix}blocks.", "blocks", cfg.full_attention_pattern, lambda _: VISION_BLOCK_RULES)
    entries += [Entry(f"{prefix}merger.{t}", ("merger", *_split(o)), None, lay) for t, o, lay in
                _norm("ln_q") + [("mlp.0.weight", "mlp_in.kernel", LINEAR), ("mlp.0.bias", "mlp_in.bias", COPY),
                                 ("mlp.2.weight", "mlp_out.kernel", LINEAR), ("mlp.2.bias", "mlp_out.bias", COPY)]]
    return entries


def detect_style(keys) -> str:
    """``modern`` if any key lives under ``model.language_model.`` or ``model.visual.``, else ``legacy``."""
    modern = KEY_STYLES["modern"]
    return "modern" if any(k.startswith((modern["decoder"], modern["vision"])) for k in keys) else "legacy"


def check_keys(entries: list[Entry], keys) -> None:
    """Raises naming every missing and every unexpected key (nothing is silently dropped)."""
    wanted = {e.key for e in entries}
    keys = set(keys)
    missing = sorted(wanted - keys)
    unexpected = sorted(keys - wanted)

    def listed(what, keys):
        return f"{what} keys {keys[:20]}{' ...' if len(keys) > 20 else ''} ({len(keys)} in all)"

    problems = [listed(what, keys) for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if problems:
        raise KeyError(f"checkpoint does not match the config: {'; '.join(problems)}")


class ParamSource(NamedTuple):
    """One of our parameters as lazily converted views of PyTorch tensors (nothing is read yet).

    ``views``: one view, or one per stacked block (``stacked``); ``read(index)`` materialises
    the sub-array ``index`` (a tuple of slices over our shape, as ``jax.make_array_from_callback``
    passes), reading only what it covers when the views are memory-mapped.
    """

    views: tuple
    stacked: bool

    @property
    def shape(self) -> tuple[int, ...]:
        inner = tuple(self.views[0].shape)
        return (len(self.views), *inner) if self.stacked else inner

    def read(self, index: tuple = ()) -> np.ndarray:
        if not self.stacked:
            return np.asarray(self.views[0][index])
        blocks, rest = (index[0], index[1:]) if index else (slice(None), ())
        return np.stack([np.asarray(v[rest]) for v in self.views[blocks]])


def param_sources(entries: list[Entry], tensors: Mapping[str, np.ndarray],
                  shapes: Mapping[tuple, tuple]) -> dict[tuple, ParamSource]:
    """``{our path: ParamSource}`` for every entry, shapes checked before anything is read.

    ``shapes``: our parameter shapes by path (stacked ones include the leading block axis); a
    converted tensor of the wrong shape raises naming the key and both shapes.
    """
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    sources = {}
    for e in entries:
        if e.path not in shapes:
            raise KeyError(f"{e.key} maps to {'.'.join(map(str, e.path))}, which the model does not have")
        want = shapes[e.path] if e.block is None else shapes[e.path][1:]
        try:
            view = e.layout.from_torch(tensors[e.key])
        except (IndexError, ValueError):  # a tensor of the wrong rank for its layout
            view = None
        if view is None or tuple(view.shape) != tuple(want):
            torch_shape = tuple(e.layout.to_torch(np.broadcast_to(np.int8(0), want)).shape)
            raise ValueError(f"{e.key}: checkpoint shape {tuple(np.shape(tensors[e.key]))}, model expects "
                             f"{torch_shape} (ours {tuple(want)} at {'.'.join(map(str, e.path))})")
        if e.block is None:
            sources[e.path] = ParamSource((view,), stacked=False)
        else:
            stacks.setdefault(e.path, {})[e.block] = view
    for path, blocks in stacks.items():
        if sorted(blocks) != list(range(shapes[path][0])):
            raise KeyError(f"{'.'.join(map(str, path))}: checkpoint covers blocks {sorted(blocks)} of {shapes[path][0]}")
        sources[path] = ParamSource(tuple(blocks[b] for b in range(len(blocks))), stacked=True)
    return sources


def to_torch(entries: list[Entry], flat: Mapping[tuple, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat parameters ``{path: array}`` -> ``{key: PyTorch-layout array}`` for every entry."""
    out = {}
    for e in entries:
        value = np.asarray(flat[e.path])
        out[e.key] = np.ascontiguousarray(e.layout.to_torch(value if e.block is None else value[e.block]))
    return out
