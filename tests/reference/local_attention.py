"""Float64 NumPy brute force of grouped local attention (LinMU's Local-Swin branch)."""

import numpy as np


def visible_ref(q_pos, k_pos, q_group, k_group, q_segment, k_segment, text_window):
    """The visibility rule for one (query, key) pair of scalars."""
    if q_segment != k_segment:
        return False
    if q_group >= 0:
        return k_group == q_group
    return 0 <= q_pos - k_pos < text_window


def local_attention_ref(q, k, v, *, q_pos, k_pos, q_group, k_group, q_segment, k_segment, text_window,
                        scale=None):
    """q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``, metadata ``[B, T]`` / ``[B, S]``; query head h
    reads KV head ``h // (Hq // Hkv)``. Returns float64 ``[B, T, Hq, D]``, zero rows where no key
    is visible."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    meta = [np.asarray(x) for x in (q_pos, k_pos, q_group, k_group, q_segment, k_segment)]
    qp, kp, qg, kg, qs, ks = meta
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            visible = [j for j in range(s)
                       if visible_ref(qp[bi, i], kp[bi, j], qg[bi, i], kg[bi, j], qs[bi, i], ks[bi, j], text_window)]
            if not visible:
                continue
            for h in range(hq):
                kh = h // (hq // hkv)
                scores = np.array([q[bi, i, h] @ k[bi, j, kh] for j in visible]) * scale
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[bi, i, h] = p @ v[bi, visible, kh]
    return out
