"""The Mamba2 (SSD) scan, every impl and both directions, against the float64 NumPy reference.

Tolerances (float32 inputs): errors are ``max|x - ref| / max|ref|``. Inputs are shaped like the
model's (unit-variance x, B and C scaled by ``N ** -0.5``, dt in (0.01, 0.3), A in (-3, -0.5)),
so outputs are O(1). Both impls measure ~1e-7 (up to ~3e-7), strong and no-decay cases
included; ``FWD_TOL = 1e-5``. Mask, index or reset bugs show up as errors of 1e-2 or more, and
forming the intra-chunk decay exponents as differences of cumulative sums (instead of sums over
``(j, i]``) fails the weak-after-extreme-decay test at 3e-5 .. 5e-4.

Gradients compare the JAX directional derivative of a fixed scalar loss with central finite
differences of the float64 reference (eps = 1e-5); ``GRAD_TOL = 1e-3`` relative.

bf16 inputs are judged against the reference on the bf16-rounded inputs; y itself is rounded to
bf16, so the bound is a relative RMS error of 1e-2.

float64 lives only in NumPy; JAX runs in its default float32 mode.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinitevl_jax.ops.ssm import IMPLS, _resolve_impl, ssd_scan, ssd_step
from tests import scan_checks
from tests.scan_checks import segment_ids_from_resets
from tests.reference.ssm import ssd_scan_ref

IMPL_NAMES = list(IMPLS)
DIRECTIONS = [False, True]
DIRECTION_IDS = ["forward", "reverse"]

BATCH, HEADS, D_STATE, HEAD_DIM = 2, 2, 8, 16
FWD_TOL = 1e-5
GRAD_TOL = 1e-3
BF16_TOL = 1e-2
FD_EPS = 1e-5

# One jitted entry point: compiles are cached per (impl, direction, chunk size, shapes, dtypes,
# which optional arguments are given).
_scan_jit = jax.jit(ssd_scan, static_argnames=("reverse", "impl", "chunk_size"))


def run_impl(impl, x, dt, a, b, c, *, initial_state=None, segment_ids=None, reverse=False, chunk_size=64):
    y, state = _scan_jit(x, dt, a, b, c, initial_state=initial_state, segment_ids=segment_ids,
                         reverse=reverse, impl=impl, chunk_size=chunk_size)
    return np.asarray(y), np.asarray(state)


def make_inputs(seq_len, seed, widths=(BATCH, HEADS, D_STATE, HEAD_DIM)):
    """float32 (x, dt, A, B, C, initial_state) shaped like the model's inputs."""
    batch, heads, d_state, head_dim = widths
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq_len, heads, head_dim))
    dt = rng.uniform(0.01, 0.3, size=(batch, seq_len, heads))
    a = -rng.uniform(0.5, 3.0, size=heads)
    b = rng.standard_normal((batch, seq_len, heads, d_state)) * d_state ** -0.5
    c = rng.standard_normal((batch, seq_len, heads, d_state)) * d_state ** -0.5
    s0 = rng.standard_normal((batch, heads, d_state, head_dim))
    return tuple(v.astype(np.float32) for v in (x, dt, a, b, c, s0))


def assert_matches_ref(out, state, ref_out, ref_state, tol=FWD_TOL):
    scan_checks.assert_matches_ref(out, state, ref_out, ref_state, tol)


def dt_for_log_decay(log_decay, a):
    """The dt giving ``dt * A = log_decay`` per head (``log_decay`` broadcast over [B, T, H])."""
    return (np.asarray(log_decay, np.float64) / a.astype(np.float64)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The reference itself, against closed forms.
# --------------------------------------------------------------------------------------------


def _explicit_sums(x, dt, a, b, c, s0, reverse):
    """y and the final state as the unrolled sums of the module docstring (no resets)."""
    x, dt, a, b, c, s0 = (v.astype(np.float64) for v in (x, dt, a, b, c, s0))
    seq_len = x.shape[1]
    log_decay = dt * a  # [B, T, H]
    y = np.zeros_like(x)
    for t in range(seq_len):
        # forward: token j <= t weighs exp(sum_{j < k <= t} a_k); the state exp(sum_{k <= t} a_k).
        # reverse: token s >= t weighs exp(sum_{t <= k < s} a_k); the state exp(sum_{k >= t} a_k).
        sources = range(t + 1) if not reverse else range(t, seq_len)
        for s in sources:
            span = slice(s + 1, t + 1) if not reverse else slice(t, s)
            weight = np.exp(log_decay[:, span].sum(1)) * dt[:, s] * np.einsum("bhn,bhn->bh", c[:, t], b[:, s])
            y[:, t] += weight[..., None] * x[:, s]
        span = slice(0, t + 1) if not reverse else slice(t, seq_len)
        y[:, t] += np.exp(log_decay[:, span].sum(1))[..., None] * np.einsum("bhnp,bhn->bhp", s0, c[:, t])
    state = np.exp(log_decay.sum(1))[..., None, None] * s0
    for s in range(seq_len):
        span = slice(s + 1, seq_len) if not reverse else slice(0, s)
        weight = np.exp(log_decay[:, span].sum(1)) * dt[:, s]
        state += weight[..., None, None] * np.einsum("bhn,bhp->bhnp", b[:, s], x[:, s])
    return y, state


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
def test_reference_matches_explicit_sums(reverse):
    x, dt, a, b, c, s0 = make_inputs(9, seed=100)
    y, state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, reverse=reverse)
    expected_y, expected_state = _explicit_sums(x, dt, a, b, c, s0, reverse)
    np.testing.assert_allclose(y, expected_y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state, expected_state, rtol=1e-10, atol=1e-12)


def test_reference_single_token_closed_form():
    # S = exp(dt A) S0 + dt B x^T;  y = S^T C.
    x, dt, a, b, c, s0 = (v.astype(np.float64) for v in make_inputs(1, seed=101))
    y, state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0)
    expected_state = (np.exp(dt[:, 0] * a)[..., None, None] * s0
                      + dt[:, 0, :, None, None] * np.einsum("bhn,bhp->bhnp", b[:, 0], x[:, 0]))
    np.testing.assert_allclose(state, expected_state, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y[:, 0], np.einsum("bhnp,bhn->bhp", expected_state, c[:, 0]), rtol=1e-12, atol=1e-12)


def test_reference_zero_dt_keeps_state():
    # dt = 0: no decay and no input, so S stays S0 and y_t = S0^T C_t.
    x, dt, a, b, c, s0 = make_inputs(20, seed=102)
    y, state = ssd_scan_ref(x, np.zeros_like(dt), a, b, c, initial_state=s0)
    np.testing.assert_array_equal(state, s0.astype(np.float64))
    np.testing.assert_allclose(y, np.einsum("bhnp,bthn->bthp", s0.astype(np.float64), c.astype(np.float64)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
def test_reference_packing_equals_separate_runs(reverse):
    # A packed row equals its segments run one by one. The initial state reaches the first
    # segment forward and the last segment in reverse; the final state is the last-run
    # segment's (the last one forward, the first one in reverse).
    seq_len, resets = 30, [7, 8, 20]
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=103)
    ids = segment_ids_from_resets(seq_len, [resets, resets])
    y, state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    bounds = [0, *resets, seq_len]
    parts = list(zip(bounds[:-1], bounds[1:]))
    state_owner = 0 if reverse else len(parts) - 1
    for i, (start, stop) in enumerate(parts):
        gets_s0 = i == (len(parts) - 1 if reverse else 0)
        y_part, state_part = ssd_scan_ref(*(v[:, start:stop] for v in (x, dt)), a,
                                          *(v[:, start:stop] for v in (b, c)),
                                          initial_state=s0 if gets_s0 else None, reverse=reverse)
        np.testing.assert_allclose(y[:, start:stop], y_part, rtol=1e-12, atol=1e-12)
        if i == state_owner:
            np.testing.assert_allclose(state, state_part, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Forward pass (both directions), float32.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("seq_len", [1, 5, 65, 200])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_matches_reference(impl, seq_len, with_initial_state, reverse):
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=seq_len)
    s0 = s0 if with_initial_state else None
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, reverse=reverse)
    y, state = run_impl(impl, x, dt, a, b, c, initial_state=s0, reverse=reverse)
    assert y.dtype == np.float32 and state.dtype == np.float32
    assert_matches_ref(y, state, ref_y, ref_state)


# Row 0: resets mid-chunk and on both chunk boundaries (64 and 128 are boundaries whichever the
# direction, as T = 192 = 3 chunks). Row 1: a reset one token before a boundary, one after it,
# a single-token segment (128) and ids that return to an earlier value (only "differs from the
# neighbour" matters, not the id itself).
SEGMENT_RESETS = ([10, 64, 100, 128], [63, 65, 128, 129, 170])
SEGMENT_VALUES = ([1, 2, 3, 4], [5, 2, 9, 5, 0])
SEGMENT_T = 192


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_segment_resets_match_reference(impl, with_initial_state, reverse):
    x, dt, a, b, c, s0 = make_inputs(SEGMENT_T, seed=7)
    s0 = s0 if with_initial_state else None
    ids = segment_ids_from_resets(SEGMENT_T, SEGMENT_RESETS, SEGMENT_VALUES)
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    y, state = run_impl(impl, x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    assert_matches_ref(y, state, ref_y, ref_state)


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
def test_segment_ids_actually_reset(reverse):
    # Guards the test above: the resets must change the reference's answer, at the first token
    # of each new segment forward and at the last token of each segment in reverse.
    x, dt, a, b, c, s0 = make_inputs(SEGMENT_T, seed=7)
    ids = segment_ids_from_resets(SEGMENT_T, SEGMENT_RESETS, SEGMENT_VALUES)
    packed, _ = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    unpacked, _ = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, reverse=reverse)
    for row, resets in enumerate(SEGMENT_RESETS):
        for t in resets:
            token = t - 1 if reverse else t
            assert np.max(np.abs(packed[row, token] - unpacked[row, token])) > 1e-3


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_chunk_sizes_match_reference(chunk_size, reverse):
    seq_len = 50
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=8)
    ids = segment_ids_from_resets(seq_len, ([3, 16, 17, 40], [15, 32, 49]))
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    y, state = run_impl("chunked", x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse,
                        chunk_size=chunk_size)
    assert_matches_ref(y, state, ref_y, ref_state)


def _hard_decay_inputs(case, seq_len, seed):
    """Inputs with strong (dt A = -20) or no decay; ``case`` picks which."""
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=seed)
    rng = np.random.default_rng(seed + 1)
    log_decay = dt * a
    if case == "spikes":  # isolated dt A = -20 at ~10% of tokens (incl. chunk edges)
        log_decay[rng.uniform(size=log_decay.shape) < 0.1] = -20.0
        log_decay[:, [0, 63, 64, 127, 128, seq_len - 1]] = -20.0
        dt = dt_for_log_decay(log_decay, a)
    elif case == "runs":  # long runs of -20 across chunk boundaries (cumulative sums ~ -1300)
        log_decay[0, 20:100] = -20.0
        log_decay[0, 150:182] = -20.0
        log_decay[1, 0:64] = -20.0
        log_decay[1, 100:170] = -20.0
        dt = dt_for_log_decay(log_decay, a)
    elif case == "zero_dt":  # dt = 0 (decay 1, no input): whole chunks and scattered tokens
        dt[:, 64:128] = 0.0
        dt[rng.uniform(size=dt.shape) < 0.2] = 0.0
        dt[:, [0, 63, seq_len - 1]] = 0.0
    elif case == "zero_A":  # A = 0: nothing ever decays, the state is a plain running sum
        a = np.zeros_like(a)
    else:
        raise AssertionError(case)
    return x, dt, a, b, c, s0


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("case", ["spikes", "runs", "zero_dt", "zero_A"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_strong_and_no_decay_match_reference(impl, case, reverse):
    x, dt, a, b, c, s0 = _hard_decay_inputs(case, SEGMENT_T, seed=11)
    ids = segment_ids_from_resets(SEGMENT_T, SEGMENT_RESETS, SEGMENT_VALUES)
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    y, state = run_impl(impl, x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    assert_matches_ref(y, state, ref_y, ref_state)


@pytest.mark.parametrize("big", [-20.0, -100.0, -1000.0])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_weak_decay_after_extreme_run_keeps_float32_precision(impl, big):
    """Weak decays right after long extreme runs inside one chunk: the chunked form must not
    take differences of two huge cumulative log-decays (that would cost ~1e-4 relative)."""
    x, dt, a, b, c, s0 = make_inputs(128, seed=21)
    log_decay = np.full(dt.shape, -0.003)
    log_decay[:, 4:60] = big
    log_decay[:, 70:120] = big
    dt = dt_for_log_decay(log_decay, a)
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0)
    y, state = run_impl(impl, x, dt, a, b, c, initial_state=s0)
    assert_matches_ref(y, state, ref_y, ref_state)


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_long_sequence_with_resets_zero_dt_chunks_and_spikes(impl, reverse):
    """T = 2048 at tiny widths: whole chunks with dt = 0, single -20 steps (also on chunk
    edges) and packed-sequence resets, with an initial state."""
    seq_len = 2048
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=31, widths=(2, 2, 4, 4))
    dt[:, 128:256] = 0.0
    dt[0, 1000:1064] = 0.0
    log_decay = dt * a
    log_decay[:, [0, 63, 64, 700, 1500, 2047]] = -20.0
    dt = dt_for_log_decay(log_decay, a)
    ids = segment_ids_from_resets(seq_len, ([100, 640, 641, 1300], [64, 1024, 1999]))
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    y, state = run_impl(impl, x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    assert_matches_ref(y, state, ref_y, ref_state)


@pytest.mark.parametrize("seq_len", [1, 130])
def test_auto_impl(seq_len):
    assert _resolve_impl("auto", seq_len) == ("recurrent" if seq_len == 1 else "chunked")
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=41)
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0)
    y, state = run_impl("auto", x, dt, a, b, c, initial_state=s0)
    assert_matches_ref(y, state, ref_y, ref_state)


# --------------------------------------------------------------------------------------------
# Decoding step.
# --------------------------------------------------------------------------------------------

_step_jit = jax.jit(ssd_step)


def test_step_repeated_equals_scan():
    seq_len = 20
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=51)
    state = jnp.asarray(s0)
    ys = []
    for t in range(seq_len):
        y_t, state = _step_jit(x[:, t], dt[:, t], a, b[:, t], c[:, t], state)
        assert y_t.dtype == jnp.float32 and state.dtype == jnp.float32
        ys.append(np.asarray(y_t))
    y_steps, state_steps = np.stack(ys, axis=1), np.asarray(state)
    y_scan, state_scan = run_impl("chunked", x, dt, a, b, c, initial_state=s0, chunk_size=8)
    np.testing.assert_allclose(y_steps, y_scan, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state_steps, state_scan, rtol=1e-5, atol=1e-5)
    ref_y, ref_state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0)
    assert_matches_ref(y_steps, state_steps, ref_y, ref_state)


def test_step_bf16_returns_x_dtype_and_float32_state():
    x, dt, a, b, c, s0 = make_inputs(1, seed=52)
    y, state = _step_jit(jnp.asarray(x[:, 0], jnp.bfloat16), dt[:, 0], a, b[:, 0], c[:, 0], s0)
    assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32


# --------------------------------------------------------------------------------------------
# Gradients: JAX directional derivatives vs float64 central differences of the reference.
# --------------------------------------------------------------------------------------------

GRAD_ARGS = ("x", "dt", "A", "B", "C", "initial_state")
GRAD_RESETS = {1: ([], []), 130: ([10, 64, 100], [63, 65, 128])}
# (seq_len, decay): every problem has an initial state and, for T > 1, resets mid-chunk and on
# a boundary. "strong" adds a run of dt A = -20 across a chunk boundary (cumulative sums to
# ~ -1200 inside a chunk), a lone -20 and a stretch of dt = 0.
GRAD_PROBLEMS = [(1, "moderate"), (130, "moderate"), (130, "strong")]


def _grad_problem(seq_len, decay):
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=1000 + seq_len)
    if decay == "strong":
        log_decay = dt * a
        log_decay[0, 5:70] = -20.0
        log_decay[1, 100] = -20.0
        dt = dt_for_log_decay(log_decay, a)
        dt[1, 20:40] = 0.0
    rng = np.random.default_rng(2000 + seq_len)
    w_y = rng.standard_normal(x.shape)
    w_s = rng.standard_normal(s0.shape)
    ids = segment_ids_from_resets(seq_len, GRAD_RESETS[seq_len])
    directions = [rng.standard_normal(v.shape) for v in (x, dt, a, b, c, s0)]
    return (x, dt, a, b, c, s0), ids, w_y, w_s, directions


def _ref_loss(args, ids, w_y, w_s, reverse):
    x, dt, a, b, c, s0 = args
    y, state = ssd_scan_ref(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse)
    return float(np.sum(y * w_y) + np.sum(state * w_s))


def _jax_loss(x, dt, a, b, c, s0, ids, w_y, w_s, impl, reverse):
    """L = sum(y * Wy) + sum(final_state * Ws)."""
    y, state = ssd_scan(x, dt, a, b, c, initial_state=s0, segment_ids=ids, reverse=reverse, impl=impl)
    return jnp.sum(y * w_y) + jnp.sum(state * w_s)


_jax_grad = jax.jit(jax.grad(_jax_loss, argnums=tuple(range(6))), static_argnames=("impl", "reverse"))
_GRAD_CACHE = {}


def _jax_grads(impl, seq_len, decay, reverse):
    """float64 copies of dL/d(x, dt, A, B, C, initial_state) from ``impl`` (cached)."""
    key = (impl, seq_len, decay, reverse)
    if key not in _GRAD_CACHE:
        args, ids, w_y, w_s, _ = _grad_problem(seq_len, decay)
        grads = _jax_grad(*args, ids, w_y.astype(np.float32), w_s.astype(np.float32), impl=impl, reverse=reverse)
        _GRAD_CACHE[key] = [np.asarray(g, np.float64) for g in grads]
    return _GRAD_CACHE[key]


@pytest.mark.parametrize("wrt", [*GRAD_ARGS, "all"])
@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("seq_len,decay", GRAD_PROBLEMS, ids=[f"T{t}-{d}" for t, d in GRAD_PROBLEMS])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_gradient_matches_finite_differences(impl, seq_len, decay, reverse, wrt):
    args, ids, w_y, w_s, directions = _grad_problem(seq_len, decay)
    grads = _jax_grads(impl, seq_len, decay, reverse)
    for name, grad in zip(GRAD_ARGS, grads):
        assert np.all(np.isfinite(grad)), f"non-finite gradient wrt {name}"

    picked = range(6) if wrt == "all" else [GRAD_ARGS.index(wrt)]
    scan_checks.assert_directional_derivative(grads, directions, args, picked, lambda a: _ref_loss(a, ids, w_y, w_s, reverse), eps=FD_EPS, tol=GRAD_TOL,
                                              what=f"d/d{wrt}")


def test_gradients_finite_under_extreme_decay():
    # Every token at dt A = -20 (cumulative sums ~ -1300 per chunk) or far beyond (-1e4 per
    # token, where exp underflows everywhere): outputs and all gradients stay finite.
    x, dt, a, b, c, s0 = make_inputs(130, seed=61)
    ids = segment_ids_from_resets(130, GRAD_RESETS[130])
    for log_decay in (-20.0, -1e4):
        dt_big = dt_for_log_decay(np.full(dt.shape, log_decay), a)
        grads = _jax_grad(x, dt_big, a, b, c, s0, ids, x, s0, impl="chunked", reverse=False)
        for name, grad in zip(GRAD_ARGS, grads):
            assert np.all(np.isfinite(np.asarray(grad))), f"non-finite gradient wrt {name} at dt A = {log_decay}"


def _residual_sizes(impl, seq_len, widths, chunk_size):
    """Sizes (in elements) of the arrays the backward pass keeps from the forward pass (the
    vjp's residuals)."""
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=71, widths=widths)

    def f(x, dt, a, b, c, s0):
        return ssd_scan(x, dt, a, b, c, initial_state=s0, impl=impl, chunk_size=chunk_size)

    _, vjp_fn = jax.vjp(jax.jit(f), x, dt, a, b, c, s0)
    return [leaf.size for leaf in jax.tree_util.tree_leaves(vjp_fn) if hasattr(leaf, "size")]


def test_chunked_keeps_states_per_chunk_not_per_token():
    seq_len, widths, chunk_size = 128, (1, 2, 32, 64), 16
    batch, heads, d_state, head_dim = widths
    per_token_states = batch * seq_len * heads * d_state * head_dim
    # The guard: the token-serial impl does keep one state per token.
    assert max(_residual_sizes("recurrent", seq_len, widths, chunk_size)) >= per_token_states
    # Chunked: one state per chunk (per_token_states / 16) and O(T (N + P + L)) besides.
    sizes = _residual_sizes("chunked", seq_len, widths, chunk_size)
    assert max(sizes) <= per_token_states / chunk_size, sorted(sizes)[-5:]
    assert sum(sizes) < per_token_states / 2, sorted(sizes)[-5:]


# --------------------------------------------------------------------------------------------
# bf16 inputs.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_bf16_inputs(impl, reverse):
    seq_len = 130
    x, dt, a, b, c, s0 = make_inputs(seq_len, seed=81)
    ids = segment_ids_from_resets(seq_len, GRAD_RESETS[seq_len])
    x16, dt16, b16, c16 = (jnp.asarray(v, jnp.bfloat16) for v in (x, dt, b, c))
    y, state = _scan_jit(x16, dt16, a, b16, c16, initial_state=s0, segment_ids=ids, reverse=reverse, impl=impl)
    assert y.dtype == jnp.bfloat16
    assert state.dtype == jnp.float32
    rounded = [np.asarray(v.astype(jnp.float32), np.float64) for v in (x16, dt16, b16, c16)]
    ref_y, ref_state = ssd_scan_ref(rounded[0], rounded[1], a, rounded[2], rounded[3], initial_state=s0,
                                    segment_ids=ids, reverse=reverse)
    y = np.asarray(y.astype(jnp.float32), np.float64)
    state = np.asarray(state, np.float64)
    scan_checks.assert_rel_rms((("y", y, ref_y), ("final_state", state, ref_state)), BF16_TOL)


# --------------------------------------------------------------------------------------------
# Input validation and dispatch.
# --------------------------------------------------------------------------------------------


def _bad_scan_inputs(case):
    x, dt, a, b, c, s0 = make_inputs(5, seed=0)
    kwargs = {}
    if case == "x":
        x = x[..., 0]
    elif case == "dt":
        dt = dt[..., None]
    elif case == "A":
        a = a[:1]
    elif case == "B":
        b = b[:, :4]
    elif case == "C":
        c = c[..., :4]
    elif case == "initial_state":
        kwargs["initial_state"] = s0[..., :8]
    elif case == "segment_ids":
        kwargs["segment_ids"] = np.zeros((BATCH, 4), np.int32)
    elif case == "float_segment_ids":
        kwargs["segment_ids"] = np.zeros((BATCH, 5), np.float32)
    elif case == "time":
        x, dt, b, c = (v[:, :0] for v in (x, dt, b, c))
    elif case == "chunk_size":
        kwargs["chunk_size"] = 0
    else:
        raise AssertionError(case)
    return (x, dt, a, b, c), kwargs


SCAN_CASES = ["x", "dt", "A", "B", "C", "initial_state", "segment_ids", "float_segment_ids", "time",
              "chunk_size"]


@pytest.mark.parametrize("case", SCAN_CASES)
@pytest.mark.parametrize("impl", ["auto", *IMPL_NAMES])
def test_bad_scan_inputs_raise_value_error_naming_the_problem(impl, case):
    args, kwargs = _bad_scan_inputs(case)
    name = {"float_segment_ids": "segment_ids", "time": "time axis"}.get(case, case)
    with pytest.raises(ValueError) as info:
        ssd_scan(*args, impl=impl, **kwargs)
    assert re.search(rf"\b{name}\b", str(info.value)), f"message does not name {name!r}: {info.value}"


@pytest.mark.parametrize("case", ["x", "dt", "A", "B", "C", "state"])
def test_bad_step_inputs_raise_value_error_naming_argument(case):
    x, dt, a, b, c, s0 = make_inputs(1, seed=0)
    args = {"x": x[:, 0], "dt": dt[:, 0], "A": a, "B": b[:, 0], "C": c[:, 0], "state": s0}
    args[case] = {"x": x[:, 0, 0], "dt": dt[:, 0, :, None], "A": a[:1], "B": b[:1, 0], "C": c[:, 0, :, :4],
                  "state": s0[..., :8]}[case]
    with pytest.raises(ValueError) as info:
        ssd_step(args["x"], args["dt"], args["A"], args["B"], args["C"], args["state"])
    assert re.search(rf"\b{case}\b", str(info.value)), f"message does not name {case!r}: {info.value}"


def test_unknown_impl_raises_value_error_listing_choices():
    x, dt, a, b, c, _ = make_inputs(5, seed=0)
    with pytest.raises(ValueError, match="no_such_impl") as info:
        ssd_scan(x, dt, a, b, c, impl="no_such_impl")
    for choice in ("auto", *IMPLS):
        assert choice in str(info.value)
