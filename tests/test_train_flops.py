"""Model-FLOPs accounting (train/flops.py) against independent counts, and the training benchmark's
CPU smoke run (benchmarks/train_gpu.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.config import load_config
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel
from infinitevl_jax.ops.delta_rule.chunked import CHUNK_SIZE, chunked_gated_delta_rule
from infinitevl_jax.ops.delta_rule.triangular import unit_lower_inverse
from infinitevl_jax.train import flops
from infinitevl_jax.train.trainable import param_path

INPUT_MAPS = {"q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj"}
CONVS = {"q_conv", "k_conv", "v_conv"}


def tiny(**decoder_changes) -> VisionLanguageConfig:
    cfg = VisionLanguageConfig.from_config(load_config("tiny"))
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, **decoder_changes))


def tiny_teacher() -> VisionLanguageConfig:
    cfg = tiny()
    return tiny(layer_types=("full_attention",) * cfg.decoder.num_layers)


def walk_weights(cfg: VisionLanguageConfig) -> dict:
    """Matmul-like weight counts read off the built (abstract) model's ``nnx.Param`` state:
    ``head`` (the tied embedding), and per layer index ``input``, ``output`` (mixer o_proj +
    convs), ``mlp`` kernels. Biases, norms, A_log and dt_bias are skipped by name."""
    model = nnx.eval_shape(lambda: VisionLanguageModel(cfg, rngs=nnx.Rngs(0)))
    dec = cfg.decoder
    period = len(dec.block_pattern)
    per_layer = {i: dict(input=0, output=0, mlp=0) for i in range(dec.num_layers)}
    head = 0
    for key_path, value in jax.tree_util.tree_flatten_with_path(nnx.state(model.language_model, nnx.Param))[0]:
        path = param_path(key_path)
        shape = value.shape
        if path == ("embed_tokens",):
            head += math.prod(shape)
            continue
        if path[0] != "blocks":
            continue
        position, module, leaf = path[2], path[3], path[-1]
        if module == "mlp" and leaf == "kernel":
            kind = "mlp"
        elif module == "mixer" and leaf == "kernel":
            kind = "input" if path[4] in INPUT_MAPS else "output"
        elif module == "mixer" and leaf in CONVS:
            kind = "output"
        else:
            continue
        assert shape[0] == dec.num_blocks, path  # stacked blocks on the leading axis
        for block in range(dec.num_blocks):
            per_layer[block * period + position][kind] += math.prod(shape[1:])
    return dict(head=head, layers=per_layer)


def core_flops(dec, layer_type, seq_len):
    """Mixer core per token, from the closed forms of the task statement."""
    if layer_type == "linear_attention":
        g = dec.gdn
        k, v, c = g.head_k_dim, g.head_v_dim, CHUNK_SIZE
        return g.num_heads * (6 * c * k + 4 * c * v + 6 * k * v + c * c / 3)
    window = dec.sliding_window if layer_type == "sliding_attention" else None
    ctx = np.mean([min(t + 1, window or t + 1) for t in range(seq_len)])
    return 4 * dec.num_attention_heads * dec.head_dim * ctx


def test_matmul_params_match_the_built_model():
    cfg = tiny()
    walk = walk_weights(cfg)
    total = walk["head"] + sum(sum(layer.values()) for layer in walk["layers"].values())
    assert flops.matmul_params(cfg.decoder) == total
    assert flops.matmul_params(cfg.decoder, head=False) == total - walk["head"]
    for i, layer_type in enumerate(cfg.decoder.layer_types):
        f = flops.layer_flops(cfg.decoder, layer_type, 64)
        layer = walk["layers"][i]
        assert (f.input_proj, f.other_proj, f.mlp) == (2 * layer["input"], 2 * layer["output"], 2 * layer["mlp"])


def test_matmul_params_of_the_4b_preset_match_the_spec():
    # spec 1.3: LM 3.740 B with the 311 M embedding; our count leaves out norms and biases.
    cfg = VisionLanguageConfig.from_config(load_config("infinitevl_4b"))
    assert flops.matmul_params(cfg.decoder) == pytest.approx(3.740e9, rel=1e-3)
    # kernels.md section 6: 312.7 kFLOP per token and head for d_k 128, d_v 256
    assert flops.gdn_core_flops_per_token_head(128, 256) == pytest.approx(312.7e3, rel=1e-3)


@pytest.mark.parametrize("seq_len, window", [(1, 4), (5, 5), (6, 5), (37, 8), (100, 1), (64, None), (300, 16)])
def test_attention_context_matches_brute_force(seq_len, window):
    brute = np.mean([min(t + 1, window) if window else t + 1 for t in range(seq_len)])
    assert flops.attention_context(seq_len, window) == pytest.approx(brute, rel=1e-12)


def _dot_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general in a jaxpr, scan bodies times their length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        if eqn.primitive.name in ("while", "cond"):
            raise NotImplementedError(f"cannot count {eqn.primitive.name}")
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                total += repeat * _dot_flops(inner)
    return total


def test_gdn_core_count_matches_the_chunked_algorithm():
    """The dot_generals of ``chunked_gated_delta_rule`` equal the docstring's table once the
    prefix-sum product (2 c^3 per chunk) and the inverse's own matmuls are set aside."""
    b, t, h, k, v = 1, 2 * CHUNK_SIZE, 2, 16, 32
    f32 = jnp.float32
    args = (jax.ShapeDtypeStruct((b, t, h, k), f32), jax.ShapeDtypeStruct((b, t, h, k), f32),
            jax.ShapeDtypeStruct((b, t, h, v), f32), jax.ShapeDtypeStruct((b, t, h), f32),
            jax.ShapeDtypeStruct((b, t, h), f32))
    jaxpr = jax.make_jaxpr(lambda q, kk, vv, g, beta: chunked_gated_delta_rule(
        q, kk, vv, g, beta, 0.25, jnp.zeros((b, h, k, v), f32), jnp.zeros((b, t), bool)))(*args)
    chunks = b * h * t // CHUNK_SIZE
    c = CHUNK_SIZE
    inverse = _dot_flops(jax.make_jaxpr(unit_lower_inverse)(jax.ShapeDtypeStruct((b, h, t // c, c, c), f32)).jaxpr)
    prefix_sum = chunks * 2 * c ** 3
    counted = _dot_flops(jaxpr.jaxpr) - inverse - prefix_sum
    per_token_head = flops.gdn_core_flops_per_token_head(k, v) - c * c / 3  # the model count of the inverse
    assert counted == pytest.approx(per_token_head * b * t * h, rel=1e-12)


@pytest.mark.parametrize("seq_len", [1, 16, 100])
def test_sft_count_from_independent_closed_forms(seq_len):
    cfg = tiny()
    dec = cfg.decoder
    walk = walk_weights(cfg)
    weights = walk["head"] + sum(sum(layer.values()) for layer in walk["layers"].values())
    cores = sum(core_flops(dec, t, seq_len) for t in dec.layer_types)
    forward = 2 * weights + cores
    trainable = 12345
    expected = forward + (forward + cores) + 2 * trainable  # backward: matmuls 1x, cores 2x forward
    got = flops.train_flops_breakdown(cfg, seq_len, trainable_params=trainable)
    assert got["student_forward"] == pytest.approx(forward, rel=1e-12)
    assert got["total"] == pytest.approx(expected, rel=1e-12)
    assert flops.train_flops_per_token(cfg, seq_len, trainable_params=trainable) == got["total"]
    assert got["teacher_forward"] == 0.0


def test_weight_gradients_are_two_flops_per_trainable_parameter():
    cfg = tiny()
    a = flops.train_flops_per_token(cfg, 64, trainable_params=1000)
    b = flops.train_flops_per_token(cfg, 64, trainable_params=1500)
    assert b - a == pytest.approx(1000.0)
    with pytest.raises(ValueError, match="trainable_params"):
        flops.train_flops_per_token(cfg, 64, trainable_params=-1)


def test_teacher_adds_exactly_its_forward():
    cfg, teacher = tiny(), tiny_teacher()
    seq_len = 48
    walk = walk_weights(teacher)
    weights = walk["head"] + sum(sum(layer.values()) for layer in walk["layers"].values())
    dec = teacher.decoder
    teacher_forward = 2 * weights + dec.num_layers * 4 * dec.num_attention_heads * dec.head_dim * (seq_len + 1) / 2
    alone = flops.train_flops_per_token(cfg, seq_len, trainable_params=777)
    with_teacher = flops.train_flops_per_token(cfg, seq_len, trainable_params=777, teacher=teacher)
    assert with_teacher - alone == pytest.approx(teacher_forward, rel=1e-12)


def test_layerwise_count():
    """Teacher forward without head + every student layer once + gradients inside the GDN
    layers only (MLP, o_proj, convs, core twice), with no student head."""
    cfg, teacher = tiny(), tiny_teacher()
    dec, seq_len, trainable = cfg.decoder, 40, 999
    walk, twalk = walk_weights(cfg), walk_weights(teacher)
    teacher_forward = sum(2 * sum(layer.values()) + core_flops(teacher.decoder, "full_attention", seq_len)
                          for layer in twalk["layers"].values())
    student = sum(2 * sum(walk["layers"][i].values()) + core_flops(dec, t, seq_len)
                  for i, t in enumerate(dec.layer_types))
    backward = sum(2 * (walk["layers"][i]["mlp"] + walk["layers"][i]["output"]) + 2 * core_flops(dec, t, seq_len)
                   for i, t in enumerate(dec.layer_types) if t == "linear_attention")
    got = flops.train_flops_breakdown(cfg, seq_len, trainable_params=trainable, teacher=teacher, layerwise=True)
    assert got["teacher_forward"] == pytest.approx(teacher_forward, rel=1e-12)
    assert got["student_forward"] == pytest.approx(student, rel=1e-12)
    assert got["total"] == pytest.approx(teacher_forward + student + backward + 2 * trainable, rel=1e-12)
    # cheaper than the end-to-end stage with the same teacher: no heads, no backward through SWA layers
    assert got["total"] < flops.train_flops_per_token(cfg, seq_len, trainable_params=trainable, teacher=teacher)
    with pytest.raises(ValueError, match="teacher"):
        flops.train_flops_per_token(cfg, seq_len, trainable_params=1, layerwise=True)


@pytest.mark.parametrize("kind, platform, peak", [
    ("NVIDIA H100 80GB HBM3", "gpu", 989.4e12),
    ("NVIDIA H100 PCIe", "gpu", 756e12),
    ("NVIDIA H200", "gpu", 989.4e12),
    ("NVIDIA H200 NVL", "gpu", 835.5e12),
    ("NVIDIA GH200 480GB", "gpu", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
    ("NVIDIA A100 80GB PCIe", "gpu", 312e12),
    ("NVIDIA L4", "gpu", 121e12),
    ("NVIDIA L40S", "gpu", 362.05e12),
    ("NVIDIA B200", "gpu", 2250e12),
    ("TPU v4", "tpu", 275e12),
    ("TPU v5 lite", "tpu", 197e12),
    ("TPU v5e", "tpu", 197e12),
    ("TPU v5", "tpu", 459e12),
    ("TPU v5p", "tpu", 459e12),
    ("TPU v6 lite", "tpu", 918e12),
    ("TPU v6e", "tpu", 918e12),
    ("Tesla T4", "gpu", None),
    ("cpu", "cpu", None),
    ("", "gpu", None),
])
def test_peak_lookup(kind, platform, peak):
    assert flops.peak_flops_per_device(types.SimpleNamespace(device_kind=kind, platform=platform)) == peak


def test_peak_of_this_cpu_is_unknown_and_mfu():
    assert flops.peak_flops_per_device(jax.devices()[0]) is None
    assert flops.mfu(1000.0, 1e9, 1e12, 2) == pytest.approx(0.5)
    assert flops.mfu(1000.0, 1e9, None, 2) is None


def test_synthetic_batch_layout():
    from benchmarks.train_gpu import synthetic_batch

    batch = synthetic_batch(2, 10, 50, documents=2, seed=1)
    assert batch["position_ids"].shape == (2, 3, 10)
    np.testing.assert_array_equal(batch["segment_ids"][0], [1] * 5 + [2] * 5)
    np.testing.assert_array_equal(batch["position_ids"][1, 2], list(range(5)) * 2)
    np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 1, 0] * 2)
    ids, targets = batch["input_ids"], batch["targets"]
    np.testing.assert_array_equal(targets[:, :4], ids[:, 1:5])
    assert (targets[:, [4, 9]] == 0).all() and (ids > 0).all()


def test_sharded_random_init_equals_eager_init():
    """``random_model`` (the benchmark's and the trainer's initialiser) places every parameter in
    its fsdp sharding and draws the same values as building the model eagerly (partitionable RNG;
    float32 rounding aside)."""
    from infinitevl_jax.convert.pretrained import random_model
    from infinitevl_jax.train.sharding import make_mesh, param_shardings

    cfg = dataclasses.replace(tiny(), vision=None)
    mesh = make_mesh(data=1, fsdp=len(jax.devices()))
    params = nnx.state(random_model(cfg, seed=3, mesh=mesh), nnx.Param)
    eager = nnx.state(VisionLanguageModel(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    wanted = jax.tree.leaves(param_shardings(params, mesh))
    for got, want, ref in zip(jax.tree.leaves(params), wanted, jax.tree.leaves(eager), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-7)  # fusion rounding
    embed = params["language_model"]["embed_tokens"].get_value()
    assert embed.addressable_shards[0].data.shape[1] == cfg.decoder.hidden_size // len(jax.devices())


def test_benchmark_smoke_run_on_cpu(tmp_path):
    """``python -m benchmarks.train_gpu --preset tiny --seq-len 256 --steps 2`` end to end (8
    simulated CPU devices: fsdp 8, one row each), without the unused ViT and with one warm-up
    step to stay quick."""
    from benchmarks import train_gpu

    out = tmp_path / "train.json"
    payload = train_gpu.main(["--preset", "tiny", "--seq-len", "256", "--steps", "2", "--warmup", "1", "--no-vision",
                              "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["oom"] is False and saved["num_devices"] == len(jax.devices())
    assert saved["settings"]["mesh"]["fsdp"] == len(jax.devices())
    assert saved["settings"]["global_batch"] == len(jax.devices())
    assert len(saved["step_ms_all"]) == 2 and saved["tokens_per_s"] > 0 and saved["mfu"] is None
    assert all(np.isfinite(saved["losses"])) and len(saved["losses"]) == 3
    assert saved["loss_last"] < saved["loss_first"]  # the same batch every step: it memorises
    expected = flops.train_flops_per_token(train_gpu.model_config(train_gpu.parse_args(["--preset", "tiny"]))[0],
                                           256, trainable_params=saved["params"]["trainable"])
    assert saved["flops_per_token"]["total"] == pytest.approx(expected)
    assert payload["step_ms"] == saved["step_ms"]
