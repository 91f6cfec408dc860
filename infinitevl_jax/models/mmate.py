"""LinMU's M-MATE token mixer: Flex-MA (masked bidirectional Mamba2) + Local-Swin, mixed per token.

For input x ``[B, T, D]`` (after ``input_layernorm``), H = ``num_attention_heads`` SSM heads of
size P = ``head_dim`` with state size N = ``head_dim``, Hkv = ``num_key_value_heads``:

Flex-MA, over the tokens in ``scan_order`` (each vision run rastered row-major, or column-major
in ``mmate_shifted`` layers; text keeps its place), with conv = causal depthwise conv + SiLU:

    x_t = conv(x W_x + b_x)   [Hkv, P] -> repeated to H heads    (init: W_v, b_v)
    B_t = conv(x W_B + b_B)   [Hkv, N] -> repeated to H heads    (init: W_k, b_k)
    C_t = conv(x W_C + b_C)   [H, N]                              (init: W_q, b_q)
    dt  = softplus(x W_dt + dt_bias) [2H],  A = -exp(A_log) [2H]  (forward heads, backward heads)
    y_f = SSD forward over every token (``ops.ssm``): S <- e^{dt A} S + dt B x^T,  y = S^T C
    y_b = SSD reversed, restarted at every vision run: only vision tokens read it
    y   = sigmoid(g_f) * y_f + sigmoid(g_b) * [vision] * y_b + D * x_t,   (g_f, g_b) = x W_dir
    out_F = W_out( GatedRMSNorm(y, gate = x W_z) )                          (W_out init: W_o)

Local-Swin, over the tokens in ``window_order`` (Swin windows of (frames, rows, cols) cells,
shifted by half a window in ``mmate_shifted`` layers), with the teacher's q/k/v/o and mRoPE:
a vision token attends to the tokens of its window (both ways); a text token to the previous
``text_window`` tokens of the layer's order (itself included).

Mix: ``out = m * out_F + (1 - m) * out_S`` with ``m = sigmoid(x w_mix + b_mix)`` per token.

Decoding carries the forward SSM state, the conv tails and Local-Swin's last ``text_window - 1``
keys/values: a fixed size. A vision run must arrive whole in one call (its backward scan and its
windows are computed there); ``infer.engine`` never splits one.

Padding in cache mode (``valid`` false) is zeroed before the projections' convs and gets dt = 0,
so the state, conv tails and key ring are exactly what the real tokens leave.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from infinitevl_jax.models.config import DecoderConfig
from infinitevl_jax.models.layers import Dense, GatedRMSNorm
from infinitevl_jax.models.sliding_attention import (
    KVCache,
    SelfAttention,
    init_kv_cache,
    ring_in_stream_order,
    ring_write,
)
from infinitevl_jax.models.vision_runs import (
    VisionRuns,
    inverse,
    permute,
    scan_order,
    window_groups,
    window_order,
)
from infinitevl_jax.ops.conv import causal_conv1d, init_conv_cache
from infinitevl_jax.ops.local_attention import local_attention
from infinitevl_jax.ops.ssm import ssd_scan


class MMateCache(NamedTuple):
    """Per-layer decode state: conv tails of x/B/C ``[B, conv_size - 1, C]``, the forward SSM
    state ``[B, H, N, P]`` float32 and Local-Swin's ring of ``text_window - 1`` keys/values."""

    conv_x: jax.Array
    conv_b: jax.Array
    conv_c: jax.Array
    state: jax.Array
    ring: KVCache


def init_mmate_cache(cfg: DecoderConfig, batch: int) -> MMateCache:
    """The state at the start of a sequence (zeros)."""
    m, dtype = cfg.mmate, cfg.compute_dtype
    hd, kv_dim, q_dim = cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.num_attention_heads * cfg.head_dim
    return MMateCache(
        conv_x=init_conv_cache(batch, m.conv_size, kv_dim, dtype),
        conv_b=init_conv_cache(batch, m.conv_size, kv_dim, dtype),
        conv_c=init_conv_cache(batch, m.conv_size, q_dim, dtype),
        state=jnp.zeros((batch, cfg.num_attention_heads, hd, hd), jnp.float32),
        ring=init_kv_cache(cfg, m.text_window, batch))


class FlexMA(nnx.Module):
    """The masked bidirectional Mamba2 branch (module docstring)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)
        self.x_proj = Dense(d, hkv * hd, axes=("embed", "kv_heads"), use_bias=True, **dense)
        self.B_proj = Dense(d, hkv * hd, axes=("embed", "kv_heads"), use_bias=True, **dense)
        self.C_proj = Dense(d, h * hd, axes=("embed", "heads"), use_bias=True, **dense)
        self.z_proj = Dense(d, h * hd, axes=("embed", "heads"), **dense)
        self.dt_proj = Dense(d, 2 * h, axes=("embed", "heads"), **dense)
        self.dir_proj = Dense(d, 2 * h, axes=("embed", "heads"), **dense)
        self.out_proj = Dense(h * hd, d, axes=("heads", "embed"), **dense)
        width, wdt = cfg.mmate.conv_size, cfg.weight_dtype
        identity = lambda c: nnx.Param(jnp.zeros((width, c), wdt).at[-1].set(1.0), logical_axes=("conv", "heads"))
        self.x_conv, self.B_conv, self.C_conv = identity(hkv * hd), identity(hkv * hd), identity(h * hd)
        self.dt_bias = nnx.Param(jnp.full((2 * h,), jnp.log(jnp.expm1(1e-3)), wdt), logical_axes=("heads",))
        self.A_log = nnx.Param(jnp.zeros((2 * h,), wdt), logical_axes=("heads",))
        self.D = nnx.Param(jnp.ones((h,), wdt), logical_axes=("heads",))
        self.o_norm = GatedRMSNorm(hd, eps=cfg.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=wdt)

    def __call__(self, x, is_vision, backward_segments, *, cache: MMateCache | None = None, segment_ids=None,
                 valid=None, valid_len=None):
        """x ``[B, T, D]`` in scan order -> (``[B, T, D]``, (conv_x, conv_b, conv_c, state) or Nones).

        is_vision bool ``[B, T]``; backward_segments int ``[B, T]`` (one id per vision run, a fresh
        one per text token); valid: cache mode's real tokens (None: all).
        """
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

        def branch(proj, weight, conv_cache, heads):
            u = proj(x)
            if valid is not None:
                u = jnp.where(valid[..., None], u, jnp.zeros((), u.dtype))
            y, new_conv = causal_conv1d(u, weight[...].astype(cfg.compute_dtype), cache=conv_cache,
                                        segment_ids=segment_ids, valid_len=valid_len)
            y = jax.nn.silu(y).reshape(batch, seq_len, heads, hd)
            return jnp.repeat(y, h // heads, axis=2), new_conv

        previous = cache if cache is not None else MMateCache(None, None, None, None, None)
        xs, conv_x = branch(self.x_proj, self.x_conv, previous.conv_x, hkv)
        bs, conv_b = branch(self.B_proj, self.B_conv, previous.conv_b, hkv)
        cs, conv_c = branch(self.C_proj, self.C_conv, previous.conv_c, h)
        dt = jax.nn.softplus(self.dt_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        if valid is not None:
            dt = jnp.where(valid[..., None], dt, 0.0)
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y_f, state = ssd_scan(xs, dt[..., :h], a[:h], bs, cs, initial_state=previous.state, segment_ids=segment_ids)
        y_b, _ = ssd_scan(xs, dt[..., h:], a[h:], bs, cs, segment_ids=backward_segments, reverse=True)
        gates = jax.nn.sigmoid(self.dir_proj(x).astype(jnp.float32))[..., None]  # [B, T, 2H, 1]
        y = (gates[:, :, :h] * y_f.astype(jnp.float32)
             + gates[:, :, h:] * jnp.where(is_vision[..., None, None], y_b.astype(jnp.float32), 0.0)
             + self.D[...].astype(jnp.float32)[:, None] * xs.astype(jnp.float32))
        gate = self.z_proj(x).reshape(batch, seq_len, h, hd)
        out = self.out_proj(self.o_norm(y, gate).reshape(batch, seq_len, -1))
        return out, (conv_x, conv_b, conv_c, state)


def backward_segments(runs: VisionRuns):
    """One id per vision run (its first token's index), a distinct negative id per text token."""
    t = jnp.arange(runs.run.shape[1], dtype=jnp.int32)
    return jnp.where(runs.is_vision, runs.run, -2 - t[None])


class MMate(nnx.Module):
    """One M-MATE mixer; ``shifted``: shifted Swin windows and column-major scans (odd layers)."""

    def __init__(self, cfg: DecoderConfig, shifted: bool, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.shifted = shifted
        self.flex_ma = FlexMA(cfg, rngs=rngs)
        self.local_swin = SelfAttention(cfg, None, rngs=rngs)
        self.mix_proj = Dense(cfg.hidden_size, 1, axes=("embed", None), use_bias=True, dtype=cfg.compute_dtype,
                              param_dtype=cfg.weight_dtype, rngs=rngs, kernel_init=nnx.initializers.zeros)

    def __call__(self, x, cos, sin, runs: VisionRuns, *, cache: MMateCache | None = None, index=0, start=None,
                 valid_len=None, segment_ids=None):
        """x ``[B, T, D]``, cos/sin ``[B, T, head_dim]``, runs of x's tokens (``vision_runs``).

        Cache mode (``cache`` given): ``index``, ``start``, ``valid_len`` as for ``SelfAttention``.
        Returns (``[B, T, D]``, new cache or None).
        """
        batch, seq_len, _ = x.shape
        valid = None
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a decode cache")
            start = jnp.zeros((batch,), jnp.int32) if start is None else start
            valid_len = seq_len if valid_len is None else valid_len
            t = jnp.arange(seq_len)
            valid = ((index + t)[None] >= start[:, None]) & (t < valid_len)[None]
            x = jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))
            runs = runs._replace(is_vision=runs.is_vision & valid)

        order = scan_order(runs, column_major=self.shifted)
        sorted_segments = None if segment_ids is None else permute(segment_ids, order)
        flex, (conv_x, conv_b, conv_c, state) = self.flex_ma(
            permute(x, order), permute(runs.is_vision, order), permute(backward_segments(runs), order),
            cache=cache, segment_ids=sorted_segments, valid=None if valid is None else permute(valid, order),
            valid_len=valid_len)
        flex = permute(flex, inverse(order))

        swin, ring = self.swin_branch(x, cos, sin, runs, valid=valid, cache=cache, index=index, start=start,
                                      valid_len=valid_len, segment_ids=segment_ids)
        mix = jax.nn.sigmoid(self.mix_proj(x).astype(jnp.float32))
        out = (mix * flex.astype(jnp.float32) + (1.0 - mix) * swin.astype(jnp.float32)).astype(x.dtype)
        new_cache = None if cache is None else MMateCache(conv_x, conv_b, conv_c, state, ring)
        return out, new_cache

    def swin_branch(self, x, cos, sin, runs: VisionRuns, *, valid=None, cache: MMateCache | None = None, index=0,
                    start=None, valid_len=None, segment_ids=None):
        """Local-Swin's output ``[B, T, D]`` (in x's order) and the new key ring (None without a cache);
        arguments as in ``__call__`` (``valid``: cache mode's real tokens)."""
        m = self.cfg.mmate
        batch, seq_len, _ = x.shape
        order = window_order(runs, m.window, self.shifted)
        q, k, v = self.local_swin.project(permute(x, order), permute(cos, order), permute(sin, order))
        place = jnp.broadcast_to(index + jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
        groups = window_groups(runs, order, m.window, self.shifted, offset=index)
        if cache is None:
            q_segments = jnp.zeros((batch, seq_len), jnp.int32) if segment_ids is None else permute(segment_ids, order)
            k_all, v_all, k_pos, k_groups, k_segments = k, v, place, groups, q_segments
            ring = None
        else:  # keys: the ring's (stream order) then the call's; invalid ones in segment -1
            q_segments = jnp.zeros((batch, seq_len), jnp.int32)
            past_k, past_v = ring_in_stream_order(cache.ring, index)
            capacity = past_k.shape[1]
            past_pos = jnp.broadcast_to(index - capacity + jnp.arange(capacity, dtype=jnp.int32), (batch, capacity))
            past_valid = (past_pos >= 0) & (past_pos >= start[:, None])  # empty slots, left padding
            k_all = jnp.concatenate([past_k, k.astype(past_k.dtype)], axis=1)
            v_all = jnp.concatenate([past_v, v.astype(past_v.dtype)], axis=1)
            k_pos = jnp.concatenate([past_pos, place], axis=1)
            k_groups = jnp.concatenate([jnp.full((batch, capacity), -1, jnp.int32), groups], axis=1)
            k_segments = jnp.where(jnp.concatenate([past_valid, permute(valid, order)], axis=1), 0, -1)
            ring = ring_write(cache.ring, k, v, index, valid_len)
        o = local_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), q_pos=place, k_pos=k_pos,
                            q_group=groups, k_group=k_groups, q_segment=q_segments, k_segment=k_segments,
                            text_window=m.text_window, radius=max(m.window_tokens, m.text_window) - 1)
        out = self.local_swin.o_proj(o.reshape(batch, seq_len, -1))
        return permute(out, inverse(order)), ring
