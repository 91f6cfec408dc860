"""Every gated-delta-rule impl against the float64 NumPy reference (never impl against impl).

Tolerances (float32 inputs): errors are measured as ``max|x - ref| / max|ref|``. The inputs are
shaped like the model's (unit-norm q and k, beta in (0, 1), moderate g, unit-variance v), so the
state and outputs are O(1) and the delta-rule update is a contraction. A correct float32
token-serial impl lands near 1e-7, and the chunked form near 1e-6 on ordinary inputs. The
largest legitimate float32 error comes from cumulative log-decays: after a run of g = -20
inside one chunk the cumulative sum reaches ~-1280, whose float32 spacing is ~1.2e-4, so decay
factors of the later tokens in that chunk carry relative errors of up to ~1e-4 (measured: ~1e-5
on the inputs below, up to ~8e-5 on adversarial ones). ``FWD_TOL = 1e-4`` admits that and
nothing much more; mask, index or reset bugs show up as errors of 1e-2 or more.

Gradients compare the JAX directional derivative of a fixed scalar loss with central finite
differences of the float64 reference (eps = 1e-5: truncation error ~eps^2, rounding ~1e-11
relative). ``GRAD_TOL = 1e-3`` relative (float32 backward through 130 tokens measures ~1e-6, and
a gradient that is 1% off in any single input fails).

bf16 inputs are judged against the reference run on the bf16-rounded inputs; the output itself
is rounded to bf16 (relative rounding error <= 2^-8 ~ 4e-3, RMS about a third of that), so the
relative RMS error bound is 1e-2.

float64 lives only in NumPy; JAX runs in its default float32 mode.
"""

from __future__ import annotations

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infinitevl_jax.ops.delta_rule import IMPLS, gated_delta_rule
from tests import scan_checks
from tests.scan_checks import segment_ids_from_resets
from tests.reference.delta_rule import gated_delta_rule_ref

IMPL_NAMES = sorted(IMPLS)

B, H, K, V = 2, 2, 16, 32
FWD_TOL = 1e-4
GRAD_TOL = 1e-3
BF16_TOL = 1e-2
FD_EPS = 1e-5

# One jitted entry point shared by all tests: compiles are cached per (impl, shapes, dtypes,
# which optional arguments are given).
_delta_rule_jit = jax.jit(gated_delta_rule, static_argnames=("impl", "scale"))


def run_impl(impl, q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None):
    o, state = _delta_rule_jit(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                               segment_ids=segment_ids, impl=impl)
    return np.asarray(o), np.asarray(state)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seq_len, seed, *, g_range=(-0.5, -0.01)):
    """float32 (q, k, v, g, beta, initial_state) shaped like the model's inputs."""
    rng = np.random.default_rng(seed)
    q = _unit(rng.standard_normal((B, seq_len, H, K)))
    k = _unit(rng.standard_normal((B, seq_len, H, K)))
    v = rng.standard_normal((B, seq_len, H, V))
    g = rng.uniform(*g_range, size=(B, seq_len, H))
    beta = rng.uniform(0.05, 0.95, size=(B, seq_len, H))
    initial_state = rng.standard_normal((B, H, K, V))
    return tuple(x.astype(np.float32) for x in (q, k, v, g, beta, initial_state))


def assert_matches_ref(out, state, ref_out, ref_state, tol=FWD_TOL):
    scan_checks.assert_matches_ref(out, state, ref_out, ref_state, tol)


# --------------------------------------------------------------------------------------------
# The reference itself, against closed forms.
# --------------------------------------------------------------------------------------------


def test_reference_single_token_zero_state_closed_form():
    # S = 0, so the decay does nothing; u = beta v; S = beta k v^T; o = S^T (s q) = beta s (k.q) v.
    q, k, v, g, beta, _ = make_inputs(1, seed=100)
    scale = K ** -0.5
    o, state = gated_delta_rule_ref(q, k, v, g, beta)
    q64, k64, v64, b64 = (x[:, 0].astype(np.float64) for x in (q, k, v, beta))  # [B,H,...]
    expected_o = (b64 * scale * np.einsum("bhk,bhk->bh", k64, q64))[..., None] * v64
    expected_state = b64[..., None, None] * np.einsum("bhk,bhv->bhkv", k64, v64)
    np.testing.assert_allclose(o[:, 0], expected_o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state, expected_state, rtol=1e-12, atol=1e-12)


def test_reference_single_token_with_state_closed_form():
    # S1 = e^g S0;  o = S1^T s q + beta (k . s q) (v - S1^T k);  S = S1 + beta k (v - S1^T k)^T.
    q, k, v, g, beta, s0 = make_inputs(1, seed=101)
    scale = 0.7
    o, state = gated_delta_rule_ref(q, k, v, g, beta, scale=scale, initial_state=s0)
    q64, k64, v64, g64, b64 = (x[:, 0].astype(np.float64) for x in (q, k, v, g, beta))
    s1 = np.exp(g64)[..., None, None] * s0.astype(np.float64)
    error = v64 - np.einsum("bhkv,bhk->bhv", s1, k64)
    expected_o = (np.einsum("bhkv,bhk->bhv", s1, scale * q64)
                  + (b64 * scale * np.einsum("bhk,bhk->bh", k64, q64))[..., None] * error)
    expected_state = s1 + b64[..., None, None] * np.einsum("bhk,bhv->bhkv", k64, error)
    np.testing.assert_allclose(o[:, 0], expected_o, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state, expected_state, rtol=1e-12, atol=1e-12)


def test_reference_beta_zero_no_decay_keeps_state():
    # Nothing is written and nothing decays: S stays S0 and o_t = S0^T (s q_t) for every t.
    q, k, v, g, beta, s0 = make_inputs(20, seed=102)
    o, state = gated_delta_rule_ref(q, k, v, np.zeros_like(g), np.zeros_like(beta), initial_state=s0)
    np.testing.assert_array_equal(state, s0.astype(np.float64))
    expected_o = np.einsum("bhkv,bthk->bthv", s0.astype(np.float64), K ** -0.5 * q.astype(np.float64))
    np.testing.assert_allclose(o, expected_o, rtol=1e-12, atol=1e-12)


def test_reference_unit_write_recalls_value():
    # With beta = 1 and |k| = 1 the delta rule stores v exactly under k: S^T k_t = v_t right
    # after the write, whatever S was, so querying with q_t = k_t (scale 1) returns v_t.
    q, k, v, g, beta, s0 = make_inputs(10, seed=103)
    k = _unit(k.astype(np.float64))  # exactly unit in float64
    o, _ = gated_delta_rule_ref(k, k, v, g, np.ones_like(beta), scale=1.0, initial_state=s0)
    np.testing.assert_allclose(o, v.astype(np.float64), rtol=1e-10, atol=1e-10)


def test_reference_packing_equals_separate_runs():
    # A packed row equals its segments run one by one; the initial state reaches segment 0 only.
    seq_len, resets = 30, [7, 8, 20]
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=104)
    ids = segment_ids_from_resets(seq_len, [resets, resets])
    o, state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    bounds = [0, *resets, seq_len]
    for i, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = [x[:, start:stop] for x in (q, k, v, g, beta)]
        o_part, state_part = gated_delta_rule_ref(*part, initial_state=s0 if i == 0 else None)
        np.testing.assert_allclose(o[:, start:stop], o_part, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state, state_part, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Forward pass, float32.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 300])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_forward_matches_reference(impl, seq_len, with_initial_state):
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=seq_len)
    s0 = s0 if with_initial_state else None
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0)
    o, state = run_impl(impl, q, k, v, g, beta, initial_state=s0)
    assert o.dtype == np.float32 and state.dtype == np.float32
    assert_matches_ref(o, state, ref_o, ref_state)


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_explicit_scale_matches_reference(impl):
    q, k, v, g, beta, s0 = make_inputs(65, seed=65)
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, scale=0.3, initial_state=s0)
    o, state = run_impl(impl, q, k, v, g, beta, scale=0.3, initial_state=s0)
    assert_matches_ref(o, state, ref_o, ref_state)


# Row 0: resets mid-chunk, on a chunk boundary and mid-chunk again. Row 1: a reset one token
# before a boundary, one after it, a single-token segment (128) and ids that return to an
# earlier value (only "differs from the previous token" matters, not the id itself).
SEGMENT_RESETS = ([10, 64, 100], [63, 65, 128, 129, 250])
SEGMENT_VALUES = ([1, 2, 3], [5, 2, 9, 5, 0])


@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_segment_resets_match_reference(impl, with_initial_state):
    seq_len = 300
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=7)
    s0 = s0 if with_initial_state else None
    ids = segment_ids_from_resets(seq_len, SEGMENT_RESETS, SEGMENT_VALUES)
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    o, state = run_impl(impl, q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    assert_matches_ref(o, state, ref_o, ref_state)


def test_segment_ids_actually_reset():
    # Guards the test above: the resets must change the reference's answer.
    seq_len = 300
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=7)
    ids = segment_ids_from_resets(seq_len, SEGMENT_RESETS, SEGMENT_VALUES)
    packed, _ = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    unpacked, _ = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0)
    for row, resets in enumerate(SEGMENT_RESETS):
        for t in resets:
            assert np.max(np.abs(packed[row, t] - unpacked[row, t])) > 1e-3


def _strong_decay_g(case, seq_len, seed):
    rng = np.random.default_rng(seed)
    g = rng.uniform(-0.5, -0.01, size=(B, seq_len, H))
    if case == "spikes":  # isolated g = -20 at ~10% of tokens (incl. chunk edges)
        g[rng.uniform(size=g.shape) < 0.1] = -20.0
        g[:, [0, 63, 64, 127, 128]] = -20.0
    elif case == "runs":  # long runs of -20 across chunk boundaries, moderate g after them
        g[0, 20:100] = -20.0
        g[0, 150:182] = -20.0
        g[1, 64:124] = -20.0
        g[1, 190:260] = -20.0
    elif case == "all_strong":
        g[:] = -20.0
    elif case == "no_decay":  # g = 0 everywhere: nothing forgets
        g[:] = 0.0
    else:
        raise AssertionError(case)
    return g.astype(np.float32)


@pytest.mark.parametrize("with_initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("case", ["spikes", "runs", "all_strong", "no_decay"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_strong_and_no_decay_match_reference(impl, case, with_initial_state):
    seq_len = 300
    q, k, v, _, beta, s0 = make_inputs(seq_len, seed=11)
    g = _strong_decay_g(case, seq_len, seed=12)
    if case == "no_decay":  # writes close to 1 as well: the textbook instability case
        beta = np.random.default_rng(13).uniform(0.5, 0.999, size=beta.shape).astype(np.float32)
    s0 = s0 if with_initial_state else None
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0)
    o, state = run_impl(impl, q, k, v, g, beta, initial_state=s0)
    assert_matches_ref(o, state, ref_o, ref_state)


@pytest.mark.parametrize("big", [-20.0, -100.0, -1000.0])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_weak_decay_after_extreme_run_keeps_float32_precision(impl, big):
    """Weak decays right after a long extreme run inside one chunk: the chunked form must not
    take differences of two huge cumulative log-decays (that cost ~3e-4 relative at -100)."""
    q, k, v, _, beta, s0 = make_inputs(128, seed=21)
    g = np.full(beta.shape, -0.003, np.float32)
    g[:, 4:60] = big
    g[:, 70:120] = big
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0)
    o, state = run_impl(impl, q, k, v, g, beta, initial_state=s0)
    assert_matches_ref(o, state, ref_o, ref_state, tol=1e-5)


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_long_sequence_with_resets_zero_decay_chunks_and_spikes(impl):
    """FLA's hard cases together at T = 2048: whole chunks with g = 0, single -20 steps (also
    on chunk edges) and packed-sequence resets, with an initial state."""
    seq_len = 2048
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=31)
    g[:, 128:256] = 0.0
    g[0, 1000:1064] = 0.0
    g[:, [0, 63, 64, 700, 1500, 2047]] = -20.0
    ids = segment_ids_from_resets(seq_len, ([100, 640, 641, 1300], [64, 1024, 1999]))
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    o, state = run_impl(impl, q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    assert_matches_ref(o, state, ref_o, ref_state)


@pytest.mark.parametrize("backend,kernel", [("gpu", "pallas_triton_fused_backward"), ("tpu", "pallas_mosaic_tpu"),
                                            ("cpu", "chunked")])
def test_auto_picks_the_backends_pallas_kernel_and_recurrent_for_one_token(monkeypatch, backend, kernel):
    from infinitevl_jax.ops.delta_rule import resolve_impl

    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert resolve_impl("auto", 1) == "recurrent"
    assert resolve_impl("auto", 300) == kernel
    assert resolve_impl("pallas", 300) == ("pallas_triton_fused_backward" if backend != "tpu" else "pallas_mosaic_tpu")


@pytest.mark.parametrize("hopper,batch_heads,head_dims,kernel", [
    (True, 32, (128, 256), "pallas_mosaic_gpu"),             # B2 H16 at the 4B dims
    (True, 16, (128, 256), "pallas_triton_fused_backward"),  # B1 H16: the Triton walks measured as fast
    (True, 64, (256, 256), "pallas_triton_fused_backward"),  # the Mosaic walks exceed shared memory
    (True, 64, None, "pallas_triton_fused_backward"),        # head dims not given
    (False, 64, (128, 256), "pallas_triton_fused_backward"),  # not a Hopper GPU
])
def test_pallas_on_gpu_picks_the_mosaic_walks_on_hopper_with_enough_states(monkeypatch, hopper, batch_heads,
                                                                           head_dims, kernel):
    import infinitevl_jax.ops.delta_rule as delta_rule

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(delta_rule, "is_hopper", lambda: hopper)
    assert delta_rule.resolve_impl("pallas", 300, batch_heads, head_dims) == kernel
    assert delta_rule.resolve_impl("auto", 300, batch_heads, head_dims) == kernel
    assert delta_rule.resolve_impl("pallas", 1, batch_heads, head_dims) == kernel  # explicit pallas: any T


def test_is_hopper_reads_the_devices_compute_capability(monkeypatch):
    import infinitevl_jax.ops.delta_rule as delta_rule

    for capability, want in (("9.0", True), ("8.0", False), ("10.0", False)):
        monkeypatch.setattr(jax, "devices", lambda c=capability: [types.SimpleNamespace(compute_capability=c)])
        assert delta_rule.is_hopper() is want
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace()])  # a CPU or TPU device
    assert delta_rule.is_hopper() is False


# --------------------------------------------------------------------------------------------
# Gradients: JAX directional derivatives vs float64 central differences of the reference.
# --------------------------------------------------------------------------------------------

GRAD_ARGS = ("q", "k", "v", "g", "beta", "initial_state")
GRAD_RESETS = {1: ([], []), 65: ([30, 64], [1, 50]), 130: ([10, 64, 100], [63, 65, 128])}
# (seq_len, decay): every problem has an initial state and, for T > 1, mid-chunk resets.
# "strong" adds a run of g = -20 across a chunk boundary, a lone -20 and a stretch of g = 0.
GRAD_PROBLEMS = [(1, "moderate"), (65, "moderate"), (130, "moderate"), (130, "strong")]


def _grad_problem(seq_len, decay):
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=1000 + seq_len)
    if decay == "strong":
        g[0, 5:70] = -20.0
        g[1, 100] = -20.0
        g[1, 20:40] = 0.0
    rng = np.random.default_rng(2000 + seq_len)
    w_o = rng.standard_normal((B, seq_len, H, V))
    w_s = rng.standard_normal((B, H, K, V))
    ids = segment_ids_from_resets(seq_len, GRAD_RESETS[seq_len])
    directions = [rng.standard_normal(x.shape) for x in (q, k, v, g, beta, s0)]
    return (q, k, v, g, beta, s0), ids, w_o, w_s, directions


def _ref_loss(args, ids, w_o, w_s):
    q, k, v, g, beta, s0 = args
    o, state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    return float(np.sum(o * w_o) + np.sum(state * w_s))


def _jax_loss(q, k, v, g, beta, s0, ids, w_o, w_s, impl):
    """L = sum(o * Wo) + sum(final_state * Ws)."""
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=ids, impl=impl)
    return jnp.sum(o * w_o) + jnp.sum(state * w_s)


_jax_grad = jax.jit(jax.grad(_jax_loss, argnums=tuple(range(6))), static_argnames=("impl",))
_GRAD_CACHE = {}


def _jax_grads(impl, seq_len, decay):
    """float64 copies of dL/d(q, k, v, g, beta, initial_state) from ``impl`` (cached)."""
    key = (impl, seq_len, decay)
    if key not in _GRAD_CACHE:
        args, ids, w_o, w_s, _ = _grad_problem(seq_len, decay)
        grads = _jax_grad(*args, ids, w_o.astype(np.float32), w_s.astype(np.float32), impl=impl)
        _GRAD_CACHE[key] = [np.asarray(x, np.float64) for x in grads]
    return _GRAD_CACHE[key]


@pytest.mark.parametrize("wrt", [*GRAD_ARGS, "all"])
@pytest.mark.parametrize("seq_len,decay", GRAD_PROBLEMS, ids=[f"T{t}-{d}" for t, d in GRAD_PROBLEMS])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_gradient_matches_finite_differences(impl, seq_len, decay, wrt):
    args, ids, w_o, w_s, directions = _grad_problem(seq_len, decay)
    grads = _jax_grads(impl, seq_len, decay)
    for name, grad in zip(GRAD_ARGS, grads):
        assert np.all(np.isfinite(grad)), f"non-finite gradient wrt {name}"

    picked = range(6) if wrt == "all" else [GRAD_ARGS.index(wrt)]
    scan_checks.assert_directional_derivative(grads, directions, args, picked, lambda a: _ref_loss(a, ids, w_o, w_s), eps=FD_EPS, tol=GRAD_TOL,
                                              what=f"d/d{wrt}")


# --------------------------------------------------------------------------------------------
# bf16 inputs.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_bf16_inputs(impl):
    seq_len = 65
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=21)
    ids = segment_ids_from_resets(seq_len, GRAD_RESETS[seq_len])
    q16, k16, v16, beta16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, beta))
    o, state = _delta_rule_jit(q16, k16, v16, g, beta16, initial_state=s0, segment_ids=ids, impl=impl)
    assert o.dtype == jnp.bfloat16
    assert state.dtype == jnp.float32
    rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in (q16, k16, v16)]
    ref_o, ref_state = gated_delta_rule_ref(
        *rounded, g, np.asarray(beta16.astype(jnp.float32), np.float64), initial_state=s0, segment_ids=ids)
    o = np.asarray(o.astype(jnp.float32), np.float64)
    state = np.asarray(state, np.float64)
    scan_checks.assert_rel_rms((("o", o, ref_o), ("final_state", state, ref_state)), BF16_TOL)


# --------------------------------------------------------------------------------------------
# Input validation and dispatch.
# --------------------------------------------------------------------------------------------


def _bad_inputs(case):
    q, k, v, g, beta, s0 = make_inputs(5, seed=0)
    kwargs = {"initial_state": None, "segment_ids": None}
    if case == "q":
        q = q[..., 0]
    elif case == "k":
        k = k[:, :, :, :8]
    elif case == "v":
        v = v[:, :4]
    elif case == "g":
        g = g[..., None]
    elif case == "beta":
        beta = beta[:, :, :1]
    elif case == "initial_state":
        kwargs["initial_state"] = s0[..., :8]
    elif case == "segment_ids":
        kwargs["segment_ids"] = np.zeros((B, 4), np.int32)
    elif case == "float_segment_ids":
        kwargs["segment_ids"] = np.zeros((B, 5), np.float32)
    else:
        raise AssertionError(case)
    return (q, k, v, g, beta), kwargs


@pytest.mark.parametrize(
    "case", ["q", "k", "v", "g", "beta", "initial_state", "segment_ids", "float_segment_ids"])
@pytest.mark.parametrize("impl", ["auto", *IMPL_NAMES])
def test_bad_shapes_raise_value_error_naming_argument(impl, case):
    args, kwargs = _bad_inputs(case)
    name = "segment_ids" if case == "float_segment_ids" else case
    with pytest.raises(ValueError) as info:
        gated_delta_rule(*args, impl=impl, **kwargs)
    assert re.search(rf"\b{name}\b", str(info.value)), f"message does not name {name!r}: {info.value}"


def test_unknown_impl_raises_value_error():
    q, k, v, g, beta, _ = make_inputs(5, seed=0)
    with pytest.raises(ValueError, match="no_such_impl"):
        gated_delta_rule(q, k, v, g, beta, impl="no_such_impl")


@pytest.mark.parametrize("seq_len", [1, 130])
def test_auto_impl_matches_reference(seq_len):
    q, k, v, g, beta, s0 = make_inputs(seq_len, seed=31)
    ids = segment_ids_from_resets(seq_len, GRAD_RESETS[seq_len])
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    o, state = run_impl("auto", q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    assert_matches_ref(o, state, ref_o, ref_state)
