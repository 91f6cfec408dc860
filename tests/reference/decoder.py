"""Float64 NumPy forward of the text decoder, written from spec sections 2-4 (not from our modules).

Reads parameters from the pure dict of a ``Decoder`` (``nnx.to_pure_dict(nnx.state(m, nnx.Param))``),
whose blocks are stacked: layer ``l = b * period + i`` is ``blocks.layers[i]`` at index ``b``.
Text-only positions ``0..T-1`` (all three mRoPE components equal, i.e. plain 1-D RoPE).
"""

import numpy as np

from tests.reference.attention import attention_ref
from tests.reference.delta_rule import gated_delta_rule_ref


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _rmsnorm(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, positions, theta):
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angle = positions[:, None] * inv_freq[None]  # [T, d/2]
    cos, sin = np.cos(np.concatenate([angle, angle], -1)), np.sin(np.concatenate([angle, angle], -1))
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def _causal_conv(x, w):
    """x [B, T, C], w [W, C]: y_t = sum_i w[i] x_{t - (W - 1) + i}, zeros before the start."""
    width = w.shape[0]
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        for i in range(width):
            src = t - (width - 1) + i
            if src >= 0:
                y[:, t] += w[i] * x[:, src]
    return y


def _attention_layer(p, x, cfg, window):
    b, t, _ = x.shape
    hq, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ p["q_proj"]["kernel"] + p["q_proj"]["bias"]).reshape(b, t, hq, hd)
    k = (x @ p["k_proj"]["kernel"] + p["k_proj"]["bias"]).reshape(b, t, hkv, hd)
    v = (x @ p["v_proj"]["kernel"] + p["v_proj"]["bias"]).reshape(b, t, hkv, hd)
    positions = np.arange(t, dtype=np.float64)
    q, k = _rope(q, positions, cfg.rope_theta), _rope(k, positions, cfg.rope_theta)
    o = attention_ref(q, k, v, window=window)
    return o.reshape(b, t, -1) @ p["o_proj"]["kernel"]


def _gated_deltanet_layer(p, x, cfg):
    g = cfg.gdn
    b, t, _ = x.shape

    def branch(name, head_dim):
        y = _silu(_causal_conv(x @ p[f"{name}_proj"]["kernel"], p[f"{name}_conv"]))
        return y.reshape(b, t, g.num_heads, head_dim)

    q, k, v = branch("q", g.head_k_dim), branch("k", g.head_k_dim), branch("v", g.head_v_dim)
    q = q / np.sqrt(np.sum(q * q, -1, keepdims=True) + 1e-6)
    k = k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6)
    beta = 1.0 / (1.0 + np.exp(-(x @ p["b_proj"]["kernel"])))
    decay = -np.exp(p["A_log"]) * _softplus(x @ p["a_proj"]["kernel"] + p["dt_bias"])
    o, _ = gated_delta_rule_ref(q, k, v, decay, beta)
    gate = (x @ p["g_proj"]["kernel"]).reshape(b, t, g.num_heads, g.head_v_dim)
    o = _rmsnorm(o, p["o_norm"]["weight"], g.norm_eps) * _silu(gate)
    return o.reshape(b, t, -1) @ p["o_proj"]["kernel"]


def decoder_logits_ref(params, cfg, input_ids):
    """``[B, T]`` ids -> ``[B, T, vocab]`` float64 logits of the decoder described by ``cfg``."""
    params = _to_float64(params)
    x = params["embed_tokens"][np.asarray(input_ids)]
    pattern = cfg.block_pattern
    for layer in range(cfg.num_layers):
        block, slot = divmod(layer, len(pattern))
        p = _take(params["blocks"]["layers"][slot], block)
        layer_type = cfg.layer_types[layer]
        h = _rmsnorm(x, p["input_layernorm"]["weight"], cfg.rms_norm_eps)
        if layer_type == "linear_attention":
            h = _gated_deltanet_layer(p["mixer"], h, cfg)
        else:
            window = cfg.sliding_window if layer_type == "sliding_attention" else None
            h = _attention_layer(p["mixer"], h, cfg, window)
        x = x + h
        h = _rmsnorm(x, p["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        mlp = p["mlp"]
        x = x + (_silu(h @ mlp["gate_proj"]["kernel"]) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    x = _rmsnorm(x, params["norm"]["weight"], cfg.rms_norm_eps)
    head = params["embed_tokens"].T if cfg.tie_word_embeddings else params["lm_head"]
    return x @ head


def _to_float64(tree):
    if isinstance(tree, dict):
        return {k: _to_float64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def _take(tree, index):
    if isinstance(tree, dict):
        return {k: _take(v, index) for k, v in tree.items()}
    return tree[index]
