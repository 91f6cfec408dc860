"""Qwen2.5-VL vision tower: patch embedding, windowed / per-slice ViT blocks, 2x2 patch merger.

Input ``pixel_values [N, C*T*P*P]`` in the processor's patch order (per image or video, per
temporal slice, per 2x2 merge block in raster order, the block's 4 patches in raster order) and
``grid_thw [n_items, 3]`` (slices, patch rows, patch columns of each item). Output: the merged
tokens ``[N / 4, out_hidden_size]`` in the same order (spec sections 5.2-5.5).

Per block: ``h = x + Attn(RMSNorm1(x)); out = h + SwiGLU(RMSNorm2(h))``. Attention is
non-causal softmax over a group of patches: a window of ``window_merged x window_merged``
merged tokens of one slice (edge windows partial) in windowed blocks, a whole temporal slice
of one item in the ``fullatt_block_indexes`` blocks. q and k get a 2-D rotary embedding of the
patch's (row, col) in its frame. The merger RMS-normalises each patch, concatenates the 4
consecutive patches of a merged token and applies ``Linear -> GELU(erf) -> Linear``.

Everything that depends on ``grid_thw`` (rotary ids, groups) is computed on the host in NumPy by
``vision_layout``; the device computation ``VisionTransformer.encode`` is static-shaped in it.
HF permutes the patch sequence into window order before block 0 and back after the merger; here
the sequence stays in processor order and each attention gathers its groups by index (members
in HF's order: windows in raster order, raster order inside a window), attends within each
padded group, and gathers the results back by the inverse index. Same math, no N x N mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infinitevl_jax.models.config import VisionConfig
from infinitevl_jax.models.layers import Dense, RMSNorm, SwiGLU, gemm_operands
from infinitevl_jax.models.stacking import run_blocks, stacked, with_unstacked_blocks
from infinitevl_jax.ops.rope import apply_rope, rope_inv_freq

# ----------------------------------------------------------------------------------------------
# Host layout (NumPy, from grid_thw)


class AttentionGroups(NamedTuple):
    """Patches that attend to each other, packed into ``G`` padded groups of ``L`` slots.

    index: int32 ``[G, L]``, the patch ids of group g in slots ``0 .. lengths[g] - 1`` (padding
      slots hold 0 and are masked as keys); lengths: int32 ``[G]``; position: int32 ``[N]``, the
      flat slot ``g * L + j`` holding each patch (``index.ravel()[position] == arange(N)``).
    """

    index: np.ndarray
    lengths: np.ndarray
    position: np.ndarray


class VisionLayout(NamedTuple):
    """rows, cols: int32 ``[N]`` patch row / column inside its frame (the rotary ids);
    window: groups of the windowed blocks; full: groups of the full blocks (one per slice)."""

    rows: np.ndarray
    cols: np.ndarray
    window: AttentionGroups
    full: AttentionGroups


def check_grid(grid_thw, merge: int) -> np.ndarray:
    """``grid_thw`` as int64 ``[n, 3]`` after checking shape, positivity and merge divisibility."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise TypeError("grid_thw must be concrete host values (it fixes the static layout); under jit "
                        "pass vision_layout(cfg, grid_thw) to VisionTransformer.encode")
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must be [n_images, 3] (t, h, w); got shape {grid.shape}")
    if not np.issubdtype(grid.dtype, np.integer) or (grid < 1).any():
        raise ValueError(f"grid_thw must hold positive integers; got {grid.tolist()}")
    bad = [row for row in grid.tolist() if row[1] % merge or row[2] % merge]
    if bad:
        raise ValueError(f"grid_thw h and w must be multiples of spatial_merge_size={merge}; got {bad}")
    return grid.astype(np.int64)


def rotary_ids(grid: np.ndarray, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column (int32 ``[N]``) of every patch in processor order, repeated for each slice."""
    rows, cols = [], []
    for t, h, w in grid.tolist():
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocked = (a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel() for a in (r, c))
        r, c = (np.tile(a, t) for a in blocked)
        rows.append(r)
        cols.append(c)
    return np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32)


def window_index(grid: np.ndarray, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """HF's window permutation: merged-token ids in window order, and merged tokens per window.

    Per item and slice, the ``(h/merge) x (w/merge)`` merged grid is tiled by ``window x window``
    windows from the top-left (edge windows partial, none empty); windows in raster order, tokens
    in raster order inside a window. Returns int64 ``[N / merge^2]`` and ``[n_windows]``.
    """
    order, sizes, offset = [], [], 0
    for t, h, w in grid.tolist():
        hm, wm = h // merge, w // merge
        nh, nw = -(-hm // window), -(-wm // window)
        table = np.full((t, nh * window, nw * window), -1)
        table[:, :hm, :wm] = offset + np.arange(t * hm * wm).reshape(t, hm, wm)
        table = table.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(-1, window * window)
        valid = table >= 0
        order.append(table[valid])
        sizes.append(valid.sum(axis=1))
        offset += t * hm * wm
    return np.concatenate(order), np.concatenate(sizes)


def pack_groups(members: np.ndarray, lengths: np.ndarray) -> AttentionGroups:
    """Packs a partition of ``arange(N)`` into padded groups.

    Args:
      members: ``[N]`` patch ids listed group after group (a permutation of ``arange(N)``).
      lengths: ``[G]`` group sizes, summing to N.
    """
    width = int(lengths.max())
    slot = np.arange(width)
    valid = slot < lengths[:, None]
    starts = np.cumsum(lengths) - lengths
    index = np.where(valid, members[np.minimum(starts[:, None] + slot, members.size - 1)], 0)
    position = np.empty(members.size, np.int64)
    position[members] = np.flatnonzero(valid)
    return AttentionGroups(index.astype(np.int32), lengths.astype(np.int32), position.astype(np.int32))


def vision_layout(cfg: VisionConfig, grid_thw) -> VisionLayout:
    """Host-side layout of one ``encode`` call (NumPy), from ``grid_thw [n, 3]``."""
    merge, unit = cfg.spatial_merge_size, cfg.merge_unit
    grid = check_grid(grid_thw, merge)
    rows, cols = rotary_ids(grid, merge)
    merged, sizes = window_index(grid, merge, cfg.window_merged)
    window = pack_groups((merged[:, None] * unit + np.arange(unit)).ravel(), sizes * unit)
    slices = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    full = pack_groups(np.arange(slices.sum()), slices)
    return VisionLayout(rows, cols, window, full)


# ----------------------------------------------------------------------------------------------
# Device computation


def rotary_cos_sin(rows, cols, head_dim: int, theta: float):
    """float32 ``[1, N, head_dim]`` tables of the 2-D rotary embedding.

    With ``inv_freq_j = theta^(-4j / head_dim)`` (``j < head_dim / 4``):
    ``phi = concat(row * inv_freq, col * inv_freq)``, ``emb = concat(phi, phi)``.
    """
    inv_freq = rope_inv_freq(head_dim // 2, theta)
    phi = jnp.concatenate([rows[:, None].astype(jnp.float32) * inv_freq,
                           cols[:, None].astype(jnp.float32) * inv_freq], axis=-1)
    emb = jnp.concatenate([phi, phi], axis=-1)[None]
    return jnp.cos(emb), jnp.sin(emb)


def _attention_impl(dtype) -> str:
    """cuDNN flash attention on GPU for half precision, XLA otherwise."""
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"


def grouped_attention(q, k, v, groups: AttentionGroups):
    """Non-causal softmax attention inside each group; q, k, v ``[N, H, D]`` -> ``[N, H, D]``.

    Gathers each into ``[G, L, H, D]``, masks padding keys via the group lengths (scale
    ``D^-1/2``, float32 softmax), and gathers every patch's output back from its slot.
    """
    g, width = groups.index.shape
    gather = lambda a: jnp.take(a, groups.index.reshape(-1), axis=0).reshape(g, width, *a.shape[1:])
    out = jax.nn.dot_product_attention(gather(q), gather(k), gather(v), key_value_seq_lengths=groups.lengths,
                                       implementation=_attention_impl(q.dtype))
    return jnp.take(out.reshape(g * width, *q.shape[1:]), groups.position, axis=0)


class VisionAttention(nnx.Module):
    """Fused qkv (``[q heads | k heads | v heads]``), 2-D rotary in float32, grouped attention, proj."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        dense = dict(use_bias=True, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Dense(d, 3 * d, axes=("embed", "heads"), **dense)
        self.proj = Dense(d, d, axes=("heads", "embed"), **dense)

    def __call__(self, x, cos, sin, groups: AttentionGroups):
        """x ``[N, hidden]``; cos, sin float32 ``[1, N, head_dim]``."""
        n = x.shape[0]
        (x,) = gemm_operands(x, 1)  # keeps the norm's scale out of the GEMM (layers.SEPARATE_GEMM_OPERANDS)
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim), 1, 0)
        q, k = (apply_rope(a[None].astype(jnp.float32), cos, sin)[0].astype(x.dtype) for a in (q, k))
        return self.proj(grouped_attention(q, k, v, groups).reshape(n, -1))


class VisionBlock(nnx.Module):
    """Pre-norm ViT block; ``full_attention`` picks the slice groups instead of the windows."""

    def __init__(self, cfg: VisionConfig, full_attention: bool, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.full_attention = full_attention
        self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=True, separate_operands=False, rngs=rngs,
                          **kw)

    def __call__(self, x, cos, sin, layout: VisionLayout):
        x = x + self.attn(self.norm1(x), cos, sin, layout.full if self.full_attention else layout.window)
        return x + self.mlp(self.norm2(x))


class VisionBlockGroup(nnx.Module):
    """One period of ``cfg.block_pattern`` (the unit stacked and scanned)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([VisionBlock(cfg, full, rngs=rngs) for full in cfg.block_pattern])

    def __call__(self, x, cos, sin, layout: VisionLayout):
        for layer in self.layers:
            x = layer(x, cos, sin, layout)
        return x


class PatchMerger(nnx.Module):
    """``[N, hidden] -> [N / 4, out]``: RMSNorm per patch, concat 4 consecutive, Linear-GELU-Linear."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        wide = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp_in = Dense(wide, wide, axes=("embed", "mlp"), use_bias=True, rngs=rngs, **kw)
        self.mlp_out = Dense(wide, cfg.out_hidden_size, axes=("mlp", "embed"), use_bias=True, rngs=rngs, **kw)

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.mlp_in.kernel.shape[0])
        return self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))


class VisionTransformer(nnx.Module):
    """Qwen2.5-VL ViT + merger: ``(pixel_values [N, patch_dim], grid_thw) -> [N / 4, out_hidden]``."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = Dense(cfg.patch_dim, cfg.hidden_size, axes=(None, "embed"), dtype=cfg.compute_dtype,
                                 param_dtype=cfg.weight_dtype, rngs=rngs)

        self.blocks = stacked(lambda r: VisionBlockGroup(cfg, rngs=r), cfg.num_blocks, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs)

    def __call__(self, pixel_values, grid_thw):
        """Host-level entry: builds the layout from concrete ``grid_thw [n, 3]`` and runs ``encode``."""
        return self.encode(pixel_values, vision_layout(self.cfg, grid_thw))

    def encode(self, pixel_values, layout: VisionLayout):
        """``pixel_values [N, patch_dim]`` -> merged tokens ``[N / 4, out_hidden]`` (compute dtype).

        ``layout`` (from ``vision_layout``; NumPy or traced arrays) fixes every shape, so this is
        jit-able with the layout as an argument.
        """
        cfg = self.cfg
        n = layout.rows.shape[0]
        if pixel_values.ndim != 2 or pixel_values.shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [patches, {cfg.patch_dim}] (C*T*P*P); got {pixel_values.shape}")
        if pixel_values.shape[0] != n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes "
                             f"sum(t*h*w) = {n}")
        layout = jax.tree.map(jnp.asarray, layout)
        cos, sin = rotary_cos_sin(layout.rows, layout.cols, cfg.head_dim, cfg.rope_theta)
        x = self.patch_embed(pixel_values)
        x = run_blocks(self.blocks, lambda block, h: block(h, cos, sin, layout), x, remat=cfg.remat)
        return self.merger(x)

    def unstacked(self) -> "VisionTransformer":
        """This tower with its block groups as separate modules run by a Python loop (inference on
        GPU, see ``Decoder.unstacked``); the block parameters are copied, the rest shared."""
        return with_unstacked_blocks(self)


@nnx.jit
def _encode_jit(model: VisionTransformer, pixel_values, layout: VisionLayout):
    return model.encode(pixel_values, layout)


def encode_vision(model: VisionTransformer, pixel_values, grid_thw):
    """Jitted ``model(pixel_values, grid_thw)``: the layout is built on the host and passed as
    arrays, so XLA compiles once per distinct layout shape (patches, groups, group width)."""
    return _encode_jit(model, pixel_values, vision_layout(model.cfg, grid_thw))
