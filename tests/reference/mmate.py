"""A float64 NumPy M-MATE mixer (``models/mmate.py``) for one row, written token by token.

Independent of the JAX code's permutation machinery: runs, grid coordinates and both orders
come from Python sorts over explicit tuples; the SSM is a plain loop per head; Local-Swin
checks every (query, key) pair against the visibility rule.
"""

from __future__ import annotations

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def runs_of(vision, position_ids):
    """Per token: (run start or None, frame, row, col) from bool ``[T]`` and ``[3, T]`` ids."""
    out, start, frame = [], None, 0
    for t, is_vision in enumerate(vision):
        if not is_vision:
            out.append((None, 0, 0, 0))
            start = None
            continue
        if start is None:
            start, frame = t, -1
        row = int(position_ids[1, t] - position_ids[1, start])
        col = int(position_ids[2, t] - position_ids[2, start])
        if row == 0 and col == 0:
            frame += 1
        out.append((start, frame, row, col))
    return out


def order_by(runs, key):
    """Token indices sorted by (run start or own index, *key(frame, row, col)); text keys empty."""
    def sort_key(t):
        start, frame, row, col = runs[t]
        return (t,) if start is None else (start, *key(frame, row, col))
    return sorted(range(len(runs)), key=sort_key)


def causal_conv(u, taps):
    """``u [T, C]``, taps ``[W, C]`` (last tap = current token), zeros before the start."""
    width = taps.shape[0]
    padded = np.concatenate([np.zeros((width - 1, u.shape[1])), u])
    return sum(taps[i] * padded[i:i + len(u)] for i in range(width))


def flex_ma(x, vision, runs, p, heads, kv_heads, head_dim, eps):
    """Flex-MA on tokens already in scan order; ``p``: the branch's parameters (kernels [in, out])."""
    T = len(x)
    lin = lambda name: x @ p[name + ".kernel"] + p.get(name + ".bias", 0.0)
    rep = heads // kv_heads
    xs = np.repeat(silu(causal_conv(lin("x_proj"), p["x_conv"])).reshape(T, kv_heads, head_dim), rep, axis=1)
    bs = np.repeat(silu(causal_conv(lin("B_proj"), p["B_conv"])).reshape(T, kv_heads, head_dim), rep, axis=1)
    cs = silu(causal_conv(lin("C_proj"), p["C_conv"])).reshape(T, heads, head_dim)
    dt = softplus(lin("dt_proj") + p["dt_bias"])
    a = -np.exp(p["A_log"])
    y_f, y_b = np.zeros((T, heads, head_dim)), np.zeros((T, heads, head_dim))
    for h in range(heads):
        state = np.zeros((head_dim, head_dim))
        for t in range(T):
            state = np.exp(dt[t, h] * a[h]) * state + dt[t, h] * np.outer(bs[t, h], xs[t, h])
            y_f[t, h] = state.T @ cs[t, h]
        hb = heads + h
        state = np.zeros((head_dim, head_dim))
        for t in reversed(range(T)):
            if t + 1 < T and not (vision[t] and vision[t + 1] and runs[t][0] == runs[t + 1][0]):
                state = np.zeros((head_dim, head_dim))
            state = np.exp(dt[t, hb] * a[hb]) * state + dt[t, hb] * np.outer(bs[t, h], xs[t, h])
            y_b[t, h] = state.T @ cs[t, h]
    gates = sigmoid(lin("dir_proj"))
    y = (gates[:, :heads, None] * y_f + gates[:, heads:, None] * y_b * vision[:, None, None]
         + p["D"][:, None] * xs)
    z = lin("z_proj").reshape(T, heads, head_dim)
    normed = y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps) * p["o_norm.weight"] * silu(z)
    return normed.reshape(T, -1) @ p["out_proj.kernel"]


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def local_swin(x, cos, sin, cells, p, heads, kv_heads, head_dim, text_window):
    """Local-Swin on tokens already in window order; ``cells[t]``: the token's window tuple or None."""
    T = len(x)
    lin = lambda name: x @ p[name + ".kernel"] + p.get(name + ".bias", 0.0)
    q = rope(lin("q_proj").reshape(T, heads, head_dim), cos, sin)
    k = rope(lin("k_proj").reshape(T, kv_heads, head_dim), cos, sin)
    v = lin("v_proj").reshape(T, kv_heads, head_dim)
    out = np.zeros((T, heads, head_dim))
    for i in range(T):
        if cells[i] is None:
            keys = [j for j in range(T) if 0 <= i - j < text_window]
        else:
            keys = [j for j in range(T) if cells[j] == cells[i]]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            logits = np.array([q[i, h] @ k[j, kv] for j in keys]) / np.sqrt(head_dim)
            w = np.exp(logits - logits.max())
            w /= w.sum()
            out[i, h] = sum(wj * v[j, kv] for wj, j in zip(w, keys))
    return out.reshape(T, -1) @ p["o_proj.kernel"]


def mmate(x, cos, sin, vision, position_ids, params, *, heads, kv_heads, head_dim, window, text_window, shifted,
          eps):
    """One row: x ``[T, D]``, cos/sin ``[T, head_dim]``, vision bool ``[T]``, position_ids ``[3, T]``;
    ``params``: flat ``{"flex_ma.x_proj.kernel": ..., "local_swin.q_proj.kernel": ..., "mix_proj.kernel": ...}``."""
    runs = runs_of(vision, position_ids)
    branch = lambda prefix: {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}

    scan = order_by(runs, (lambda f, r, c: (f, c, r)) if shifted else (lambda f, r, c: (f, r, c)))
    y = flex_ma(x[scan], vision[scan], [runs[t] for t in scan], branch("flex_ma."), heads, kv_heads, head_dim, eps)
    flex = np.zeros_like(y)
    flex[scan] = y

    shift = [w // 2 if shifted else 0 for w in window]

    def cell_of(frame, row, col):
        return tuple((v + s) // w for v, s, w in zip((frame, row, col), shift, window))

    def cell(t):
        start, frame, row, col = runs[t]
        return None if start is None else (start, *cell_of(frame, row, col))

    windowed = order_by(runs, lambda f, r, c: (*cell_of(f, r, c), f, r, c))
    y = local_swin(x[windowed], cos[windowed], sin[windowed], [cell(t) for t in windowed], branch("local_swin."),
                   heads, kv_heads, head_dim, text_window)
    swin = np.zeros_like(y)
    swin[windowed] = y

    mix = sigmoid(x @ params["mix_proj.kernel"] + params["mix_proj.bias"])
    return mix * flex + (1.0 - mix) * swin
