"""Float64 NumPy reference of causal sliding-window attention with GQA and segments."""

import numpy as np


def attention_ref(q, k, v, *, window=None, segment_ids=None, q_index=None, k_index=None, k_valid=None):
    """Dense masked softmax attention, float64.

    q ``[B, T, Hq, D]``, k/v ``[B, S, Hkv, D]``; query head h reads KV head ``h // (Hq // Hkv)``.
    Key j is visible to query i iff ``k_index[j] <= q_index[i]``, ``q_index[i] - k_index[j] < window``
    (if window), ``k_valid[j]`` (if given) and equal segment ids (if given, T == S).
    Indices default to ``arange``. Rows without a visible key are zero.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    q_index = np.arange(t) if q_index is None else np.asarray(q_index)
    k_index = np.arange(s) if k_index is None else np.asarray(k_index)
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            for h in range(hq):
                kh = h // (hq // hkv)
                visible = [
                    j for j in range(s)
                    if k_index[j] <= q_index[i]
                    and (window is None or q_index[i] - k_index[j] < window)
                    and (k_valid is None or k_valid[j])
                    and (segment_ids is None or segment_ids[bi, i] == segment_ids[bi, j])
                ]
                if not visible:
                    continue
                scores = np.array([q[bi, i, h] @ k[bi, j, kh] for j in visible]) / np.sqrt(d)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[bi, i, h] = p @ v[bi, visible, kh]
    return out
