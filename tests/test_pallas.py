"""The Pallas kernels (interpreted on CPU) with several V-blocks and odd head dims, the TPU
kernels lowered for TPU (Mosaic) and the GPU kernels lowered for CUDA (Triton and Mosaic GPU),
without either."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from infinitevl_jax.ops.delta_rule import (CHUNK_SIZE, gated_delta_rule, pallas_gpu, pallas_gpu_terms,
                                           pallas_mosaic_gpu, pallas_tpu, segment_resets)
from infinitevl_jax.ops.delta_rule.chunked import prepare_chunks
from tests.reference.delta_rule import gated_delta_rule_ref

B, T, H, K = 2, 130, 2, 24
# Triton: d_k 24 pads to 32; d_v 80 pads to 128 = 4 V-blocks of 32. Mosaic TPU: d_k 24 whole;
# d_v 256 = 2 V-blocks of 128. Both walk several V-blocks, each writing its slice of V', dV and dS.
# pallas_triton forms forward-only chunk terms in its kernel and the outputs inside the walk;
# pallas_triton_unfused has a separate outputs kernel; pallas_triton_xla_terms takes XLA's terms;
# pallas_triton_fused_backward also forms the outputs' cotangents inside the reverse walk;
# pallas_mosaic_gpu walks bf16 terms in the Mosaic GPU kernel (d_v 80 pads to 128 = 4 V-blocks)
# and float32 ones in the Triton kernels.
KERNELS = {"pallas_triton": 80, "pallas_triton_unfused": 80, "pallas_triton_xla_terms": 80,
           "pallas_triton_fused_backward": 80, "pallas_mosaic_gpu": 80, "pallas_mosaic_tpu": 256}


@pytest.fixture(params=sorted(KERNELS))
def kernel(request):
    return request.param


def test_kernel_settings_give_several_v_blocks():
    assert 128 // pallas_gpu.MAX_BLOCK_V > 1 and KERNELS["pallas_mosaic_tpu"] // pallas_tpu.BLOCK_V > 1


def _inputs(seed=0, V=80):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (unit(rng.normal(size=(B, T, H, K))) for _ in range(2))
    v = rng.normal(size=(B, T, H, V))
    g = rng.uniform(-0.5, -0.01, size=(B, T, H))
    g[:, 70] = -20.0
    beta = rng.uniform(0.05, 0.95, size=(B, T, H))
    s0 = rng.normal(size=(B, H, K, V))
    ids = np.zeros((B, T), np.int32)
    ids[0, 40:] = 1
    ids[1, 64:] = 1
    return [x.astype(np.float32) for x in (q, k, v, g, beta, s0)], ids


def test_several_v_blocks_match_reference(kernel):
    (q, k, v, g, beta, s0), ids = _inputs(V=KERNELS[kernel])
    o, state = jax.jit(lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], segment_ids=a[6], impl=kernel))(
        q, k, v, g, beta, s0, ids)
    ref_o, ref_state = gated_delta_rule_ref(q, k, v, g, beta, initial_state=s0, segment_ids=ids)
    np.testing.assert_allclose(o, ref_o, atol=1e-4 * np.abs(ref_o).max(), rtol=0)
    np.testing.assert_allclose(state, ref_state, atol=1e-4 * np.abs(ref_state).max(), rtol=0)


def test_fused_walk_outputs_equal_the_two_kernels():
    """bf16 inputs: the fused walk-and-outputs kernel rounds S and V' to bf16 where the outputs
    kernel reads them, so o and the final state equal ``pallas_triton_unfused``'s to float32
    summation order (o within one bf16 rounding)."""
    (q, k, v, g, beta, s0), ids = _inputs(seed=6)
    q, k, v, beta = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, beta))
    run = lambda impl: jax.jit(lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], segment_ids=a[6], impl=impl))(
        q, k, v, g, beta, s0, ids)
    (o, state), (fused_o, fused_state) = run("pallas_triton_unfused"), run("pallas_triton")
    assert fused_o.dtype == o.dtype == jnp.bfloat16 and fused_o.shape == o.shape
    o, fused_o = np.asarray(o, np.float32), np.asarray(fused_o, np.float32)
    np.testing.assert_allclose(fused_o, o, rtol=0, atol=2.0 ** -8 * np.abs(o).max())
    np.testing.assert_allclose(fused_state, state, rtol=0, atol=1e-6 * np.abs(np.asarray(state)).max())


@pytest.mark.parametrize("stages,warpgroups", [(2, 1), (3, 1), (2, 2)])
def test_mosaic_gpu_walk_matches_reference_and_the_triton_walk(monkeypatch, stages, warpgroups):
    """The Mosaic GPU walk (interpreted; bf16 terms, the only ones it takes) over 7 chunks, more
    than its ring of ``stages`` slots, and 4 V-blocks (d_v 80 padded to 128; with 2 warpgroups
    two programs of two V-blocks sharing a ring), d_k 24 padded to 64, resets, a g = -20 step
    and an initial state: against the float64 reference on the bf16-rounded inputs to bf16
    accuracy, and equal to ``pallas_triton``'s fused walk (the same bf16 roundings of S and V')
    to float32 summation order, o within one bf16 rounding. Measured (3 stages): o 4.4e-3 and
    state 3.7e-3 of the largest entry against the reference, as the Triton walk's; o 2.5e-4 and
    state 0 against it."""
    monkeypatch.setattr(pallas_mosaic_gpu, "STAGES", stages)
    monkeypatch.setattr(pallas_mosaic_gpu, "WARPGROUPS", warpgroups)
    seq_len = 7 * CHUNK_SIZE - 20
    rng = np.random.default_rng(10)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q, k = (jnp.asarray(unit(rng.normal(size=(B, seq_len, H, K))), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(B, seq_len, H, 80)), jnp.bfloat16)
    g = rng.uniform(-0.3, -0.01, size=(B, seq_len, H)).astype(np.float32)
    g[:, 150] = -20.0
    beta = jnp.asarray(rng.uniform(0.05, 0.95, size=(B, seq_len, H)), jnp.bfloat16)
    s0 = rng.normal(size=(B, H, K, 80)).astype(np.float32)
    ids = np.zeros((B, seq_len), np.int32)
    ids[1, 200:] = 1
    run = lambda impl: jax.jit(lambda *a: gated_delta_rule(*a[:5], initial_state=a[5], segment_ids=a[6], impl=impl))(
        q, k, v, g, beta, s0, ids)
    (o, state), (triton_o, triton_state) = run("pallas_mosaic_gpu"), run("pallas_triton")
    assert o.dtype == jnp.bfloat16 and o.shape == v.shape and state.shape == s0.shape
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref_o, ref_state = gated_delta_rule_ref(*map(f64, (q, k, v, g, beta)), initial_state=s0, segment_ids=ids)
    for name, have, want, tol in (("o", o, ref_o, 2e-2), ("state", state, ref_state, 1e-2),
                                  ("o vs triton", o, triton_o, 2.0 ** -8), ("state vs triton", state, triton_state, 1e-5)):
        want = f64(want)
        np.testing.assert_allclose(f64(have), want, rtol=0, atol=tol * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("stages,warpgroups,need", [(4, 1, 276), (3, 2, 264)])
def test_mosaic_gpu_walk_names_settings_too_big_for_shared_memory(monkeypatch, stages, warpgroups, need):
    """4 x 60 KiB of chunk tiles at d_k 128; or 3 x 64 KiB with two warpgroups' V-blocks, whose
    operand and state tiles come twice."""
    monkeypatch.setattr(pallas_mosaic_gpu, "STAGES", stages)
    monkeypatch.setattr(pallas_mosaic_gpu, "WARPGROUPS", warpgroups)
    x = jnp.zeros((1, 64, 1, 128), jnp.bfloat16)
    g = jnp.zeros((1, 64, 1), jnp.float32)
    with pytest.raises(ValueError, match=rf"needs {need} KiB of shared memory .*{stages} ring slots and {warpgroups} "
                                         r"warpgroup\(s\).* lower STAGES, BLOCK_V or WARPGROUPS"):
        gated_delta_rule(x, x, jnp.zeros((1, 64, 1, 64), jnp.bfloat16), g, g, impl="pallas_mosaic_gpu")
    assert not pallas_mosaic_gpu.fits_shared_memory(128, 64)


def test_mosaic_gpu_walk_takes_a_cluster_or_warpgroups_not_both(monkeypatch):
    monkeypatch.setattr(pallas_mosaic_gpu, "CLUSTER", 2)
    monkeypatch.setattr(pallas_mosaic_gpu, "WARPGROUPS", 2)
    x = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
    g = jnp.zeros((1, 64, 1), jnp.float32)
    with pytest.raises(ValueError, match=r"CLUSTER=2\) or across warpgroups \(WARPGROUPS=2\), not both"):
        gated_delta_rule(x, x, x, g, g, impl="pallas_mosaic_gpu")


@pytest.mark.parametrize("dtype,same_as,tol,warpgroups", [("float32", "pallas_triton", 0.0, 1),
                                                          ("bfloat16", "pallas_triton_fused_backward", 1e-5, 1),
                                                          ("bfloat16", "pallas_triton_fused_backward", 1e-5, 2)])
def test_mosaic_gpu_gradients_equal_the_triton_kernels(monkeypatch, dtype, same_as, tol, warpgroups):
    """Differentiated, the Mosaic GPU walk keeps the entry states and V', and the Mosaic GPU
    reverse walk forms the outputs' cotangents as ``pallas_triton_fused_backward``'s does: with
    bf16 terms the loss and every gradient equal that impl's to float32 summation order (the
    kept and stored tiles are the same bf16 roundings), also with two warpgroups' V-blocks per
    program. float32 terms run ``pallas_triton``'s very kernels. Two ring slots for the 3
    chunks, so both walks reload a slot."""
    monkeypatch.setattr(pallas_mosaic_gpu, "STAGES", 2)
    monkeypatch.setattr(pallas_mosaic_gpu, "WARPGROUPS", warpgroups)
    (q, k, v, g, beta, s0), ids = _inputs(seed=11)
    w_o = np.random.default_rng(14).normal(size=(B, T, H, 80))

    def value_and_grads(impl):
        def loss(q, k, v, g, beta, s0):
            q, k, v, beta = (x.astype(dtype) for x in (q, k, v, beta))
            o, state = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=ids, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(state ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))(q, k, v, g, beta, s0)

    (value, grads), (want_value, want_grads) = (value_and_grads(impl) for impl in ("pallas_mosaic_gpu", same_as))
    np.testing.assert_allclose(value, want_value, rtol=max(tol, 1e-7))
    for name, have, want in zip("q k v g beta s0".split(), grads, want_grads):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        np.testing.assert_allclose(have, want, rtol=0, atol=tol * np.abs(want).max(), err_msg=f"d{name}")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_fused_backward_gradients_equal_the_unfused_kernels(dtype, tol):
    """The reverse walk that forms the outputs' cotangents itself against the reverse walk fed
    by XLA's VJP of the outputs: the same loss and gradients, float32 to summation order, bf16
    within ~one rounding of the largest entry (the fused kernel keeps dL/dS_n and dL/dV'_n in
    float32 where XLA's VJP rounds them to bf16; measured up to 3.8e-3)."""
    (q, k, v, g, beta, s0), ids = _inputs(seed=8)
    rng = np.random.default_rng(9)
    w_o, w_s = rng.normal(size=(B, T, H, 80)), rng.normal(size=s0.shape)

    def value_and_grads(impl):
        def loss(q, k, v, g, beta, s0):
            q, k, v, beta = (x.astype(dtype) for x in (q, k, v, beta))
            o, state = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=ids, impl=impl)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(state * w_s)
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))(q, k, v, g, beta, s0)

    (value, grads), (fused_value, fused_grads) = (value_and_grads(impl) for impl in
                                                  ("pallas_triton", "pallas_triton_fused_backward"))
    np.testing.assert_allclose(fused_value, value, rtol=1e-6)
    for name, want, have in zip("q k v g beta s0".split(), grads, fused_grads):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        np.testing.assert_allclose(have, want, rtol=0, atol=tol * np.abs(want).max(), err_msg=f"d{name}")


# Each input's directional derivative against central differences of the float64 reference,
# errors relative to the largest of them (cancellation across inputs would make a relative
# error of the sum meaningless). bf16 inputs: the kernels take bf16 terms and bf16 matmul
# operands (float32 accumulation and state); measured up to 1.1e-2 of the largest derivative
# (the chunked XLA impl: 5e-3), while a wrong index, mask or V-block is off by 0.1 or more.
GRAD_TOLS = {"float32": 1e-4, "bfloat16": 3e-2}


@pytest.mark.parametrize("dtype", sorted(GRAD_TOLS))
def test_gradients_with_several_v_blocks_match_finite_differences(kernel, dtype):
    _check_gradients(kernel, dtype)


@pytest.mark.parametrize("dtype", sorted(GRAD_TOLS))
def test_gradients_through_the_terms_backward_kernel_match_finite_differences(monkeypatch, dtype):
    monkeypatch.setattr(pallas_gpu_terms, "TERMS_BACKWARD", "kernel")
    _check_gradients("pallas_triton", dtype)


@pytest.mark.parametrize("kernel", ["pallas_triton", "pallas_triton_fused_backward"])
@pytest.mark.parametrize("dtype", sorted(GRAD_TOLS))
def test_gradients_through_the_chunk_gradients_kernel_match_finite_differences(monkeypatch, kernel, dtype):
    monkeypatch.setattr(pallas_gpu, "CHUNK_GRADIENTS", "kernel")
    _check_gradients(kernel, dtype)


@pytest.mark.parametrize("kernel", ["pallas_triton", "pallas_triton_fused_backward"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunk_gradients_kernel_equals_the_xla_matmuls(monkeypatch, kernel, dtype):
    """The per-chunk gradients in one kernel (``CHUNK_GRADIENTS = "kernel"``, V looped in two
    blocks of 64) against XLA's batched matmuls: every input's gradient equal to float32
    summation order (measured at most 2.5e-7 of the largest entry, in dg)."""
    (q, k, v, g, beta, s0), ids = _inputs(seed=12)
    w_o = np.random.default_rng(13).normal(size=(B, T, H, 80))

    def grads(mode):
        monkeypatch.setattr(pallas_gpu, "CHUNK_GRADIENTS", mode)

        def loss(q, k, v, g, beta, s0):
            q, k, v, beta = (x.astype(dtype) for x in (q, k, v, beta))
            o, state = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=ids, impl=kernel)
            return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(state ** 2)
        return jax.jit(jax.grad(loss, argnums=tuple(range(6))))(q, k, v, g, beta, s0)

    for name, want, have in zip("q k v g beta s0".split(), grads("xla"), grads("kernel")):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        np.testing.assert_allclose(have, want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=f"d{name}")


def test_chunk_gradients_setting_is_checked(monkeypatch):
    monkeypatch.setattr(pallas_gpu, "CHUNK_GRADIENTS", "triton")
    (q, k, v, g, beta, _), _ = _inputs()
    loss = lambda q: jnp.sum(gated_delta_rule(q, k, v, g, beta, impl="pallas_triton")[0])
    with pytest.raises(ValueError, match="CHUNK_GRADIENTS must be 'xla' or 'kernel'"):
        jax.eval_shape(jax.grad(loss), q)


def _check_gradients(kernel, dtype):
    """Each input's directional derivative through ``kernel`` against the float64 reference."""
    V = KERNELS[kernel]
    (q, k, v, g, beta, s0), ids = _inputs(seed=1, V=V)
    q, k, v, beta = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, beta))
    rng = np.random.default_rng(2)
    w_o, w_s = rng.normal(size=(B, T, H, V)), rng.normal(size=(B, H, K, V))
    args = (q, k, v, g, beta, s0)
    directions = [rng.normal(size=x.shape) * (0.1 if i == 3 else 1.0) for i, x in enumerate(args)]

    def loss(q, k, v, g, beta, s0):
        q, k, v, beta = (x.astype(dtype) for x in (q, k, v, beta))
        o, state = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=ids, impl=kernel)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(state * w_s)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*args)
    analytic = np.array([np.sum(np.asarray(gr, np.float64) * d) for gr, d in zip(grads, directions)])

    def ref_loss(which, eps):
        shifted = [np.asarray(x, np.float64) + (eps * d if i == which else 0.0)
                   for i, (x, d) in enumerate(zip(args, directions))]
        o, state = gated_delta_rule_ref(*shifted[:5], initial_state=shifted[5], segment_ids=ids)
        return float(np.sum(o * w_o) + np.sum(state * w_s))

    numeric = np.array([(ref_loss(i, 1e-5) - ref_loss(i, -1e-5)) / 2e-5 for i in range(6)])
    np.testing.assert_allclose(analytic, numeric, rtol=0, atol=GRAD_TOLS[dtype] * np.abs(numeric).max())


def test_tpu_kernels_lower_to_mosaic_at_the_4b_head_dims(monkeypatch):
    """Forward and backward lower through Pallas' Mosaic TPU lowering (``jax.export`` for TPU
    runs it on any host): tiles of d_k 128 x 128-lane V-blocks, chunk 64, bf16 inputs."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # compile for TPU, not the interpreter
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
    q = k = shape(1, 256, 2, 128)
    v = shape(1, 256, 2, 256)
    g, beta = shape(1, 256, 2, dtype=jnp.float32), shape(1, 256, 2)

    def loss(q, k, v, g, beta):
        o, state = gated_delta_rule(q, k, v, g, beta, impl="pallas_mosaic_tpu")
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    lowered = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))), platforms=["tpu"])(
        q, k, v, g, beta)
    text = lowered.mlir_module()
    assert text.count("tpu_custom_call") == 2 and "gdn_state_walk_bwd_tpu" in text


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 2.0 ** -8)])
def test_terms_kernel_matches_prepare_chunks(dtype, tol):
    """The chunk terms' kernel (interpreted) against XLA's ``prepare_chunks`` on the same inputs,
    resets and a g = -20 step included (both are pinned to the float64 reference end to end in
    test_delta_rule): float32 to 1e-6 (measured ~1e-7), bf16 within one rounding (measured:
    identical)."""
    (q, k, v, g, beta, _), ids = _inputs(seed=3)
    q, k, v, beta = (jnp.asarray(x, dtype) for x in (q, k, v, beta))
    reset = segment_resets(jnp.asarray(ids), T, B)
    args = (q, k, v, jnp.asarray(g), beta.astype(jnp.float32), K ** -0.5, reset, CHUNK_SIZE, jnp.dtype(dtype))
    expected = prepare_chunks(*args)
    got = pallas_gpu_terms.gpu_prepare_chunks(*args)
    for name, want, have in zip(expected._fields, expected, got):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        assert want.shape == have.shape, name
        np.testing.assert_allclose(have, want, rtol=0, atol=tol * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-6), ("bfloat16", 1.5e-2)])
def test_terms_backward_kernel_matches_xla_vjp(monkeypatch, dtype, tol):
    """The terms kernel's own VJP (``TERMS_BACKWARD = "kernel"``, interpreted) against the XLA VJP
    of ``prepare_chunks`` for random cotangents of every term, resets and a g = -20 step
    included: each input's gradient within ``tol`` of its largest entry. Measured: float32
    5e-7 (dg), bf16 7e-3 (dk; the kernel rounds other intermediates to bf16 than XLA's autodiff
    does)."""
    monkeypatch.setattr(pallas_gpu_terms, "TERMS_BACKWARD", "kernel")
    (q, k, v, g, beta, _), ids = _inputs(seed=4)
    q, k, v, beta = (jnp.asarray(x, dtype) for x in (q, k, v, beta))
    reset = segment_resets(jnp.asarray(ids), T, B)
    inputs = (q, k, v, jnp.asarray(g), beta.astype(jnp.float32))
    settings = (K ** -0.5, reset, CHUNK_SIZE, jnp.dtype(dtype))
    terms, xla_vjp = jax.vjp(lambda *a: prepare_chunks(*a, *settings), *inputs)
    rng = np.random.default_rng(5)
    cotangents = type(terms)(*(jnp.asarray(rng.normal(size=t.shape), t.dtype) for t in terms))
    kernel_terms, kernel_vjp = jax.vjp(lambda *a: pallas_gpu_terms.gpu_prepare_chunks(*a, *settings), *inputs)
    for name, want, have in zip(terms._fields, terms, kernel_terms):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        np.testing.assert_allclose(have, want, rtol=0, atol=max(tol, 2.0 ** -8) * np.abs(want).max(), err_msg=name)
    for name, want, have in zip("q k v g beta".split(), xla_vjp(cotangents), kernel_vjp(cotangents)):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        assert want.shape == have.shape, name
        np.testing.assert_allclose(have, want, rtol=0, atol=tol * np.abs(want).max(), err_msg=f"d{name}")


@pytest.mark.parametrize("cluster,warpgroups,stages", [(8, 1, 3), (1, 1, 3), (1, 2, 2)])
def test_mosaic_gpu_walk_lowers_for_cuda_at_the_4b_head_dims(monkeypatch, cluster, warpgroups, stages):
    """The Mosaic GPU kernels lower for CUDA on any host (Mosaic GPU's lowering runs here; the
    module is compiled on the GPU): d_k 128, d_v 256, chunk 64, bf16; with a cluster of 8
    V-blocks multicasting the K-wide tiles (the path the interpreter cannot run), without, and
    with two warpgroups' V-blocks per program sharing a ring of two slots.
    Forward-only calls run it beside the Triton terms kernel; differentiated calls run it (with
    the entry states and V' kept) and the Mosaic GPU reverse walk, on XLA's terms, and then the
    Triton per-chunk gradients kernel (``CHUNK_GRADIENTS = "kernel"``, the default)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # compile, not the interpreters
    monkeypatch.setattr(pallas_mosaic_gpu, "CLUSTER", cluster)
    monkeypatch.setattr(pallas_mosaic_gpu, "WARPGROUPS", warpgroups)
    monkeypatch.setattr(pallas_mosaic_gpu, "STAGES", stages)
    shape = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
    q = k = shape(1, 512, 2, 128)
    v = shape(1, 512, 2, 256)
    g, beta = shape(1, 512, 2, dt=jnp.float32), shape(1, 512, 2)
    loss = lambda *a: jnp.sum(gated_delta_rule(*a, impl="pallas_mosaic_gpu")[0].astype(jnp.float32))
    lower = lambda fn: jax.jit(fn).trace(q, k, v, g, beta).lower(lowering_platforms=("cuda",)).as_text()
    forward = lower(loss)
    assert forward.count("mosaic_gpu_v2") == 1 and forward.count("__gpu$xla.gpu.triton") == 1
    backward = lower(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    assert backward.count("mosaic_gpu_v2") == 2 and backward.count("__gpu$xla.gpu.triton") == 1
    assert "gdn_chunk_grads" in backward


def test_terms_kernel_takes_its_own_warps(monkeypatch):
    """``TERMS_NUM_WARPS`` sets the terms kernel's launch and leaves the walk's alone."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_gpu_terms, "TERMS_NUM_WARPS", 8)
    shape = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
    args = (shape(1, 256, 2, 128), shape(1, 256, 2, 128), shape(1, 256, 2, 256), shape(1, 256, 2, dt=jnp.float32),
            shape(1, 256, 2))
    text = jax.jit(lambda *a: gated_delta_rule(*a, impl="pallas")).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    launches = dict(re.findall(r'name = "(gdn_\w+)", num_stages = \d+ : i32, num_warps = (\d+)', text))
    assert launches == {"gdn_chunk_terms": "8", "gdn_walk_outputs_fwd": str(pallas_gpu.TRITON_PARAMS["num_warps"])}


@pytest.mark.parametrize("impl,kernels", [
    ("pallas_triton", ("gdn_state_walk_fwd", "gdn_state_walk_bwd", "gdn_chunk_outputs")),
    ("pallas_triton_fused_backward", ("gdn_walk_outputs_fwd", "gdn_walk_outputs_bwd"))])
def test_chunk_gradients_in_xla_leave_out_their_kernel(monkeypatch, impl, kernels):
    """``CHUNK_GRADIENTS = "xla"`` (the default is ``"kernel"``: TRITON_LOWERINGS) forms the
    per-chunk gradients in XLA: no ``gdn_chunk_grads`` kernel."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(pallas_gpu, "CHUNK_GRADIENTS", "xla")
    shape = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt)
    args = (shape(1, 256, 2, 128), shape(1, 256, 2, 128), shape(1, 256, 2, 256), shape(1, 256, 2, dt=jnp.float32),
            shape(1, 256, 2))
    loss = lambda *a: jnp.sum(gated_delta_rule(*a, impl=impl)[0].astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert sorted(re.findall(r'name = "(gdn_\w+)"', text)) == sorted(kernels)


# What each Triton impl's call lowers to, forward only and differentiated (the terms' VJP by
# XLA, the default, or by the terms' backward kernel; the per-chunk gradients by their kernel).
TRITON_LOWERINGS = [
    ("pallas_triton", False, "xla", ("gdn_chunk_terms", "gdn_walk_outputs_fwd")),
    ("pallas_triton", True, "xla", ("gdn_state_walk_fwd", "gdn_state_walk_bwd", "gdn_chunk_outputs",
                                    "gdn_chunk_grads")),
    ("pallas_triton", True, "kernel", ("gdn_chunk_terms", "gdn_chunk_terms_bwd", "gdn_state_walk_fwd",
                                       "gdn_state_walk_bwd", "gdn_chunk_outputs", "gdn_chunk_grads")),
    ("pallas_triton_unfused", False, "xla", ("gdn_chunk_terms", "gdn_state_walk_fwd", "gdn_chunk_outputs")),
    ("pallas_triton_unfused", True, "xla", ("gdn_state_walk_fwd", "gdn_state_walk_bwd", "gdn_chunk_outputs",
                                            "gdn_chunk_grads")),
    ("pallas_triton_xla_terms", False, "xla", ("gdn_state_walk_fwd", "gdn_chunk_outputs")),
    ("pallas_triton_fused_backward", False, "xla", ("gdn_chunk_terms", "gdn_walk_outputs_fwd")),
    ("pallas_triton_fused_backward", True, "xla", ("gdn_walk_outputs_fwd", "gdn_walk_outputs_bwd",
                                                   "gdn_chunk_grads"))]


@pytest.mark.parametrize("impl,with_backward,terms_backward,kernels", TRITON_LOWERINGS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_triton_kernels_lower_for_cuda_at_the_4b_head_dims(monkeypatch, dtype, impl, with_backward, terms_backward,
                                                           kernels):
    """The kernels lower through Pallas' Triton lowering for CUDA on any host (their Triton IR is
    built at lowering time; PTX is compiled on the GPU): d_k 128, d_v 256, chunk 64, with bf16
    terms (16-bit inputs) and float32 terms (3xTF32 matmuls)."""
    monkeypatch.setattr(pallas_gpu_terms, "TERMS_BACKWARD", terms_backward)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # Triton, not the interpreter
    shape = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, jnp.dtype(dt))
    q = k = shape(1, 256, 2, 128)
    v = shape(1, 256, 2, 256)
    g, beta = shape(1, 256, 2, dt="float32"), shape(1, 256, 2)

    def loss(q, k, v, g, beta):
        o, state = gated_delta_rule(q, k, v, g, beta, impl=impl)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)) if with_backward else loss
    text = jax.jit(fn).trace(q, k, v, g, beta).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == len(kernels)
    for kernel in kernels:
        assert f'name = "{kernel}"' in text
