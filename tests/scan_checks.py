"""Shared by the scan-op tests (gated delta rule, SSD): packed-segment ids from reset positions,
and the relative-error check of outputs and final states against a float64 reference."""

from __future__ import annotations

import numpy as np


def segment_ids_from_resets(seq_len, resets_per_row, ids_per_row=None):
    """``[B, T]`` int32 ids that change exactly at the given token positions of each row."""
    ids = np.zeros((len(resets_per_row), seq_len), np.int32)
    for row, resets in enumerate(resets_per_row):
        values = ids_per_row[row] if ids_per_row else range(1, len(resets) + 1)
        for position, value in zip(resets, values):
            ids[row, position:] = value
    return ids


def rel_max_err(x, ref):
    return float(np.max(np.abs(np.asarray(x, np.float64) - ref)) / np.max(np.abs(ref)))


def assert_matches_ref(out, state, ref_out, ref_state, tol):
    """Finite, same shapes, and max |error| / max |reference| <= ``tol`` for outputs and state."""
    assert np.all(np.isfinite(out)), "non-finite outputs"
    assert np.all(np.isfinite(state)), "non-finite final state"
    assert out.shape == ref_out.shape and state.shape == ref_state.shape
    err_o, err_s = rel_max_err(out, ref_out), rel_max_err(state, ref_state)
    assert err_o <= tol, f"outputs: relative max error {err_o:.3g} > {tol}"
    assert err_s <= tol, f"final state: relative max error {err_s:.3g} > {tol}"


def assert_rel_rms(pairs, tol):
    """``(name, value, reference)`` triples: finite, and RMS error / RMS reference <= ``tol`` each
    (the check for 16-bit inputs, whose rounding makes max errors noisy)."""
    for name, value, ref in pairs:
        assert np.all(np.isfinite(value)), f"{name}: non-finite values"
        rel_rms = np.sqrt(np.mean((value - ref) ** 2) / np.mean(ref ** 2))
        assert rel_rms <= tol, f"{name}: relative RMS error {rel_rms:.3g} > {tol}"


def assert_directional_derivative(grads, directions, args, picked, loss64, *, eps, tol, what):
    """Checks the gradients ``grads`` (one per argument of ``args``) along ``directions`` (for the
    arguments in ``picked``; the rest held fixed) against central finite differences of the
    float64 ``loss64(args)``; ``what`` names the check in the failure message."""
    dirs = [directions[i] if i in picked else np.zeros_like(directions[i]) for i in range(len(args))]
    args64 = [v.astype(np.float64) for v in args]
    plus = [v + eps * d for v, d in zip(args64, dirs)]
    minus = [v - eps * d for v, d in zip(args64, dirs)]
    fd = (loss64(plus) - loss64(minus)) / (2 * eps)
    jax_dd = sum(float(np.sum(grads[i] * dirs[i])) for i in picked)
    # Scale: |fd|, or the size of the sum's terms when they happen to cancel (for a random
    # direction both are ~|grad|_2; a wrong gradient makes the difference as large as either).
    terms = np.sqrt(sum(float(np.sum((grads[i] * dirs[i]) ** 2)) for i in picked))
    denom = max(abs(fd), terms)
    assert denom > 0
    assert abs(jax_dd - fd) <= tol * denom, (
        f"{what}: jax {jax_dd:.8g} vs finite differences {fd:.8g} (rel {abs(jax_dd - fd) / denom:.3g})")
