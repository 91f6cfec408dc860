"""Checkpoint import (Hugging Face folders, run directories, meshes), export to PyTorch, the
student's mimic init, and the convert / export commands.

References: transformers' own ``save_pretrained`` / ``from_pretrained`` and logits (CPU,
float32), the ``safetensors`` package, and spec section 6.2's key table typed out by hand.
"""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.cli import main
from infinitevl_jax.config import load_config
from infinitevl_jax.convert import export as export_module
from infinitevl_jax.convert.export import export_plan, export_pytorch
from infinitevl_jax.convert.name_map import ParamSource
from infinitevl_jax.convert.pretrained import abstract_model, load_pretrained, save_run
from infinitevl_jax.convert.safetensors_io import CorruptCheckpointError, SafetensorsFile, write_safetensors
from infinitevl_jax.convert.student import DT_INIT, student_config, student_from_teacher
from infinitevl_jax.convert.torch_params import torch_tensors
from infinitevl_jax.data.tokenizer import chat_prompt
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel
from infinitevl_jax.train.sharding import make_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from tests.reference.hf_qwen import logits_error, random_image, tiny_qwen2_5_vl  # noqa: E402

PROMPT = [chat_prompt("<|vision_start|><|image_pad|><|vision_end|>What shape is this?")]
IMAGE = [random_image(7, (84, 112))]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Qwen2.5-VL written by transformers' save_pretrained (legacy keys, tied head)."""
    reference = tiny_qwen2_5_vl()
    folder = str(tmp_path_factory.mktemp("hf") / "qwen")
    reference.save_pretrained(folder)
    return reference, folder


def _tensors(model, style="legacy"):
    return torch_tensors(model, style)


def _assert_same_params(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def _tiny_model(dtype="float32", seed=0):
    cfg = VisionLanguageConfig.from_config(load_config("tiny")).with_dtypes(param_dtype=dtype)
    return VisionLanguageModel(cfg, rngs=nnx.Rngs(seed))


# ---- import from Hugging Face folders -------------------------------------------------------------------------

def test_saved_transformers_checkpoint_gives_the_same_logits(hf_dir):
    reference, folder = hf_dir
    ours = load_pretrained(folder, dtype="float32")
    err, _ = logits_error(reference, ours, PROMPT, images=IMAGE)
    assert err <= 1e-4, err
    assert ours.cfg.decoder.layer_types == ("full_attention",) * 2


def test_untied_sharded_bf16_checkpoint(tmp_path):
    folder = str(tmp_path / "sharded")
    tiny_qwen2_5_vl(tie_word_embeddings=False, seed=1).to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    # the reference re-reads the bf16 file in float32 (its rotary buffers must not be bf16-rounded)
    reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    reference.config._attn_implementation = "eager"
    ours = load_pretrained(folder, dtype="float32", param_dtype="bfloat16")
    assert not ours.cfg.decoder.tie_word_embeddings
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    for key, value in _tensors(ours, "modern").items():  # transformers' in-memory names
        np.testing.assert_array_equal(value.astype(np.float32), state[key], err_msg=key)
    err, _ = logits_error(reference, ours, PROMPT, images=IMAGE)
    assert err <= 1e-4, err


def test_modern_key_style_loads(hf_dir, tmp_path):
    _, folder = hf_dir
    source = SafetensorsFile(os.path.join(folder, "model.safetensors"))
    modern = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
               "model." + k if k.startswith("visual.") else k): source.array(k) for k in source.keys()}
    target = tmp_path / "modern"
    target.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), target / "config.json")
    write_safetensors(str(target / "model.safetensors"), modern, {"format": "pt"})
    _assert_same_params(load_pretrained(str(target)), load_pretrained(folder))


def _broken_copy(folder, tmp_path, edit):
    """A copy of ``folder`` whose tensors went through ``edit(dict) -> dict``."""
    source = SafetensorsFile(os.path.join(folder, "model.safetensors"))
    target = tmp_path / "broken"
    target.mkdir(parents=True)
    shutil.copy(os.path.join(folder, "config.json"), target / "config.json")
    write_safetensors(str(target / "model.safetensors"), edit({k: source.array(k) for k in source.keys()}))
    return str(target)


def test_missing_unexpected_and_misshaped_tensors_are_named(hf_dir, tmp_path):
    _, folder = hf_dir
    gone = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(KeyError, match=f"does not match the config: missing keys \\['{gone}'\\]"):
        load_pretrained(_broken_copy(folder, tmp_path / "a", lambda t: {k: v for k, v in t.items() if k != gone}))
    with pytest.raises(KeyError, match=r"unexpected keys \['model.layers.7.mlp.up_proj.weight'\]"):
        load_pretrained(_broken_copy(folder, tmp_path / "b", lambda t: {
            **t, "model.layers.7.mlp.up_proj.weight": t[gone]}))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint shape \(63,\), model expects \(64,\)"):
        load_pretrained(_broken_copy(folder, tmp_path / "c", lambda t: {
            **t, "model.norm.weight": t["model.norm.weight"][:63]}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_pretrained(_broken_copy(folder, tmp_path / "d", lambda t: {
            **t, "lm_head.weight": t["model.embed_tokens.weight"] * 2}))


def test_config_that_disagrees_with_the_weights(hf_dir, tmp_path):
    _, folder = hf_dir
    target = tmp_path / "cfg"
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"missing keys \['model.layers.2.input_layernorm.weight'"):
        load_pretrained(str(target))


def test_corrupt_and_incomplete_folders(hf_dir, tmp_path):
    _, folder = hf_dir
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CorruptCheckpointError, match="file truncated or corrupt"):
        load_pretrained(str(truncated))
    garbage = tmp_path / "garbage"
    shutil.copytree(folder, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptCheckpointError, match="header is not valid JSON"):
        load_pretrained(str(garbage))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="neither a run directory .* nor a Hugging Face checkpoint"):
        load_pretrained(str(no_weights))
    with pytest.raises(FileNotFoundError, match="neither"):
        load_pretrained(str(tmp_path / "does_not_exist"))


def test_missing_shard_and_inconsistent_index(tmp_path):
    folder = tmp_path / "sharded"
    tiny_qwen2_5_vl().save_pretrained(str(folder), max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key, shard = next(iter(index["weight_map"].items()))
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
    index["weight_map"][key] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=f"keys not in their listed shard \\['{key}'\\]"):
        load_pretrained(str(folder))
    os.remove(folder / other)
    with pytest.raises(FileNotFoundError, match=f"shard files \\['{other}'\\] .* are missing"):
        load_pretrained(str(folder))


# ---- meshes -----------------------------------------------------------------------------------------------------

def test_loading_onto_a_mesh_reads_only_shards(hf_dir, monkeypatch):
    _, folder = hf_dir
    assert len(jax.devices()) == 8, "tests/conftest.py simulates 8 CPU devices"
    mesh = make_mesh(fsdp=4, tensor=2)
    reads = []
    original = ParamSource.read
    monkeypatch.setattr(ParamSource, "read", lambda self, index=(): reads.append(
        (self.shape, original(self, index).shape)) or original(self, index))
    sharded = load_pretrained(folder, mesh=mesh)
    embed = sharded.language_model.embed_tokens.get_value()
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # vocab 300 / 2, width 64 / 4
    assert embed.addressable_shards[0].data.shape == (150, 16)
    assert max(int(np.prod(part)) / int(np.prod(full)) for full, part in reads if full == (300, 64)) == 1 / 8
    _assert_same_params(sharded, load_pretrained(folder))


# ---- run directories (Orbax) -----------------------------------------------------------------------------------

def test_run_directory_round_trip_and_mesh_restore(hf_dir, tmp_path):
    _, folder = hf_dir
    model = load_pretrained(folder)
    run = str(tmp_path / "run")
    save_run(model, run, source_dir=folder)
    assert {"run_config.json", "source_config.json", "checkpoints", "generation_config.json"} <= set(os.listdir(run))
    _assert_same_params(load_pretrained(run), model)
    restored = load_pretrained(run, mesh=make_mesh(fsdp=2, tensor=4))
    assert restored.language_model.embed_tokens.get_value().sharding.spec == jax.sharding.PartitionSpec(
        "tensor", "fsdp")
    _assert_same_params(restored, model)
    with pytest.raises(ValueError, match=r"no checkpoint for step 5; saved steps: \[0\]"):
        load_pretrained(run, step=5)
    with pytest.raises(FileExistsError, match="already exists"):
        save_run(model, run)


# ---- export -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_then_load_is_bit_exact(dtype, tmp_path):
    model = _tiny_model(dtype)
    files = export_pytorch(model, str(tmp_path / "out"), dtype=dtype, max_shard_bytes=400_000)
    shards = [f for f in files if f.endswith(".safetensors")]
    assert "model.safetensors.index.json" in files and len(shards) > 1
    assert all(os.path.getsize(tmp_path / "out" / f) <= 400_000 + 4096 for f in shards)  # + header
    _assert_same_params(load_pretrained(str(tmp_path / "out"), param_dtype=dtype), model)


def test_export_layout_matches_spec_and_safetensors(tmp_path):
    model = _tiny_model()
    export_pytorch(model, str(tmp_path / "out"))
    loaded = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in loaded.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in loaded  # tied (spec 6.1)
    with open(tmp_path / "out" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    ours = _tensors(model)
    for key, value in loaded.items():
        np.testing.assert_array_equal(value.float().numpy(), ours[key].astype(ml_dtypes.bfloat16).astype(np.float32))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "infinite_vl" and config["tie_word_embeddings"] is True
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_infinitevl.InfiniteVLQwen2_5_VLForConditionalGeneration"
    assert config["layer_types"][:4] == ["sliding_attention", "linear_attention", "linear_attention",
                                         "linear_attention"]


def test_exported_teacher_loads_in_transformers_with_the_same_logits(hf_dir, tmp_path):
    reference, folder = hf_dir
    ours = load_pretrained(folder, dtype="float32")
    export_pytorch(ours, str(tmp_path / "out"), dtype="float32", source_dir=folder)
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "out"),
                                                                               dtype=torch.float32).eval()
    reloaded.config._attn_implementation = "eager"
    want = reference.state_dict()
    got = reloaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    err, _ = logits_error(reloaded, ours, PROMPT, images=IMAGE)
    assert err <= 1e-4, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == reference.config.text_config.eos_token_id


def _spec_4b_keys():
    """Spec section 6.2, typed out: every tensor of the released InfiniteVL-4B and its shape."""
    keys = {"model.embed_tokens.weight": (151936, 2048), "model.norm.weight": (2048,)}
    for n in range(36):
        p = f"model.layers.{n}."
        keys.update({p + "input_layernorm.weight": (2048,), p + "post_attention_layernorm.weight": (2048,),
                     p + "mlp.gate_proj.weight": (11008, 2048), p + "mlp.up_proj.weight": (11008, 2048),
                     p + "mlp.down_proj.weight": (2048, 11008)})
        a = p + "self_attn."
        if n % 4 == 0:
            keys.update({a + "q_proj.weight": (2048, 2048), a + "q_proj.bias": (2048,), a + "k_proj.weight": (256, 2048),
                         a + "k_proj.bias": (256,), a + "v_proj.weight": (256, 2048), a + "v_proj.bias": (256,),
                         a + "o_proj.weight": (2048, 2048)})
        else:
            keys.update({a + "q_proj.weight": (2048, 2048), a + "k_proj.weight": (2048, 2048),
                         a + "v_proj.weight": (4096, 2048), a + "a_proj.weight": (16, 2048),
                         a + "b_proj.weight": (16, 2048), a + "A_log": (16,), a + "dt_bias": (16,),
                         a + "q_conv1d.weight": (2048, 1, 4), a + "k_conv1d.weight": (2048, 1, 4),
                         a + "v_conv1d.weight": (4096, 1, 4), a + "g_proj.weight": (4096, 2048),
                         a + "o_norm.weight": (256,), a + "o_proj.weight": (2048, 4096)})
    keys["visual.patch_embed.proj.weight"] = (1280, 3, 2, 14, 14)
    for b in range(32):
        p = f"visual.blocks.{b}."
        keys.update({p + "norm1.weight": (1280,), p + "norm2.weight": (1280,), p + "attn.qkv.weight": (3840, 1280),
                     p + "attn.qkv.bias": (3840,), p + "attn.proj.weight": (1280, 1280), p + "attn.proj.bias": (1280,),
                     p + "mlp.gate_proj.weight": (3420, 1280), p + "mlp.gate_proj.bias": (3420,),
                     p + "mlp.up_proj.weight": (3420, 1280), p + "mlp.up_proj.bias": (3420,),
                     p + "mlp.down_proj.weight": (1280, 3420), p + "mlp.down_proj.bias": (1280,)})
    keys.update({"visual.merger.ln_q.weight": (1280,), "visual.merger.mlp.0.weight": (5120, 5120),
                 "visual.merger.mlp.0.bias": (5120,), "visual.merger.mlp.2.weight": (2048, 5120),
                 "visual.merger.mlp.2.bias": (2048,)})
    return keys


def test_4b_export_plan_has_exactly_the_released_keys_and_shapes():
    cfg = VisionLanguageConfig.from_config(load_config("infinitevl_4b"))
    abstract = abstract_model(cfg)  # shapes only: nothing of 4.4 B parameters is allocated
    shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    plan = export_plan(cfg, shapes)
    spec = _spec_4b_keys()
    assert len(spec) == 596 + 390
    assert {t.key: t.shape for t in plan} == spec
    assert sum(t.nbytes for t in plan) == 2 * sum(int(np.prod(s)) for s in spec.values())  # bf16


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    model = _tiny_model()
    calls = []

    def failing_write(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return write_safetensors(path, tensors, metadata)

    monkeypatch.setattr(export_module, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        export_pytorch(model, str(tmp_path / "out"), max_shard_bytes=200_000)
    assert os.listdir(tmp_path) == []
    (tmp_path / "existing").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_pytorch(model, str(tmp_path / "existing"))


# ---- student (mimic init) ---------------------------------------------------------------------------------------

def test_student_mimic_init(hf_dir):
    _, folder = hf_dir
    teacher = load_pretrained(folder, dtype="float32")
    student = student_from_teacher(teacher, seed=3)
    assert student.cfg == student_config(teacher.cfg)
    assert student.cfg.decoder.layer_types == ("sliding_attention", "linear_attention")
    t, s = _tensors(teacher), _tensors(student)
    for key in s:
        if not key.startswith("model.layers.1.self_attn."):
            np.testing.assert_array_equal(s[key], t[key], err_msg=key)  # everything else is the teacher's
    gdn = {k[len("model.layers.1.self_attn."):]: v for k, v in s.items() if k.startswith("model.layers.1.self_attn.")}
    np.testing.assert_array_equal(gdn["a_proj.weight"], 0)
    np.testing.assert_array_equal(gdn["b_proj.weight"], 0)
    np.testing.assert_array_equal(gdn["A_log"], 0)
    np.testing.assert_allclose(np.logaddexp(0, gdn["dt_bias"]), DT_INIT, rtol=1e-5)  # softplus(dt_bias) = 0.001
    np.testing.assert_array_equal(gdn["o_norm.weight"], 1)
    for conv in ("q_conv1d", "k_conv1d", "v_conv1d"):
        taps = gdn[f"{conv}.weight"]
        np.testing.assert_array_equal(taps[:, 0, :-1], 0)
        np.testing.assert_array_equal(taps[:, 0, -1], 1)
    hidden = 64
    for name, fan_in in (("q_proj", hidden), ("v_proj", hidden), ("g_proj", hidden), ("o_proj", 2 * 64)):
        w = gdn[f"{name}.weight"]
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound  # U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert abs(w.std() - bound / np.sqrt(3)) < 0.1 * bound
    with pytest.raises(ValueError, match="teacher must be all full attention"):
        student_config(student.cfg)


# ---- commands ---------------------------------------------------------------------------------------------------

def test_convert_and_export_commands(hf_dir, tmp_path, capsys):
    _, folder = hf_dir
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    assert main(["convert", "--from-hf", folder, "--out", run, "--student"]) == 0
    assert main(["export", "--checkpoint", run, "--step", "0", "--out", out, "--max-shard-size", "150KB"]) == 0
    printed = capsys.readouterr().out
    assert "student (mimic init, seed 0)" in printed and "model.safetensors.index.json" in printed
    student = load_pretrained(run)
    exported = load_pretrained(out, param_dtype="bfloat16")
    for key, value in _tensors(exported).items():
        np.testing.assert_array_equal(value, _tensors(student)[key].astype(ml_dtypes.bfloat16), err_msg=key)
    assert json.loads(open(os.path.join(out, "config.json")).read())["eos_token_id"] == 258  # from the source
    assert main(["export", "--checkpoint", run, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--checkpoint", run, "--out", out, "--step", "3"]) == 2
    assert "no checkpoint for step 3" in capsys.readouterr().err
