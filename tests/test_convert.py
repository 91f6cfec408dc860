"""Name map and config import: layouts against PyTorch's own ops, key sets against the spec, errors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.config import load_config
from infinitevl_jax.convert.hf_config import config_from_hf
from infinitevl_jax.convert.name_map import DEPTHWISE_CONV, decoder_entries, patch_conv_layout, vision_entries
from infinitevl_jax.convert.torch_params import load_torch_tensors, model_entries, torch_tensors
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel

torch = pytest.importorskip("torch")

# spec section 1.1: the released InfiniteVL config.json (flat; GDN fields take their defaults)
INFINITEVL_JSON = dict(
    model_type="infinite_vl", vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6,
    rope_scaling=dict(type="default", rope_type="default", mrope_section=[16, 24, 24]), use_sliding_window=True,
    sliding_window=8192, max_window_layers=70, tie_word_embeddings=True, image_token_id=151655,
    video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    vision_config=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, hidden_act="silu",
                       in_chans=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048, tokens_per_second=2))
# the hub's Qwen2.5-VL-3B-Instruct config.json (legacy flat layout)
QWEN_JSON = {**INFINITEVL_JSON, "model_type": "qwen2_5_vl", "use_sliding_window": False, "sliding_window": 32768,
             "rope_scaling": dict(type="mrope", mrope_section=[16, 24, 24])}


def _preset(name):
    return VisionLanguageConfig.from_config(load_config(name))


@pytest.mark.parametrize("json_dict,preset", [(INFINITEVL_JSON, "infinitevl_4b"), (QWEN_JSON, "qwen2_5_vl_3b")])
def test_config_from_hf_matches_presets(json_dict, preset):
    assert config_from_hf(json_dict) == _preset(preset)


def test_config_from_hf_rejects_unknown_family_and_sliding_qwen():
    with pytest.raises(ValueError, match="model_type 'llama'"):
        config_from_hf({**QWEN_JSON, "model_type": "llama"})
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        config_from_hf({**QWEN_JSON, "use_sliding_window": True})


def test_key_counts_match_the_released_checkpoint():
    """Spec section 6.2: 596 text tensors (tied head omitted) and 390 vision tensors."""
    cfg = _preset("infinitevl_4b")
    assert len(decoder_entries(cfg.decoder)) == 596
    assert len(vision_entries(cfg.vision)) == 390
    keys = {e.key for e in decoder_entries(cfg.decoder)}
    assert "model.layers.4.self_attn.k_proj.bias" in keys and "model.layers.5.self_attn.A_log" in keys
    assert "model.layers.5.self_attn.q_proj.bias" not in keys
    modern = {e.key for e in model_entries(cfg, "modern")}
    assert "model.language_model.layers.35.self_attn.v_conv1d.weight" in modern
    assert "model.visual.merger.mlp.2.bias" in modern


def test_depthwise_conv_layout_matches_torch_conv1d():
    """torch Conv1d(groups=C, padding=W-1) truncated to T equals our causal conv with [W, C] taps."""
    rng = np.random.default_rng(0)
    width, channels, steps = 4, 6, 9
    weight = rng.standard_normal((channels, 1, width)).astype(np.float32)
    x = rng.standard_normal((1, steps, channels)).astype(np.float32)
    ref = torch.nn.functional.conv1d(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(weight),
                                     padding=width - 1, groups=channels)[..., :steps].transpose(1, 2).numpy()
    ours = DEPTHWISE_CONV.from_torch(weight)
    padded = np.concatenate([np.zeros((1, width - 1, channels), np.float32), x], axis=1)
    out = sum(padded[:, i:i + steps] * ours[i] for i in range(width))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(DEPTHWISE_CONV.to_torch(ours), weight)


def test_patch_layout_matches_torch_conv3d():
    cfg = _preset("tiny").vision
    layout = patch_conv_layout(cfg)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((cfg.hidden_size, 3, 2, 14, 14)).astype(np.float32)
    patches = rng.standard_normal((5, 3, 2, 14, 14)).astype(np.float32)
    ref = torch.nn.functional.conv3d(torch.from_numpy(patches), torch.from_numpy(weight), stride=(2, 14, 14))
    ours = patches.reshape(5, -1) @ layout.from_torch(weight)
    np.testing.assert_allclose(ours, ref.reshape(5, -1).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layout.to_torch(layout.from_torch(weight)), weight)


def _tiny_model(seed, **decoder_changes):
    cfg = _preset("tiny")
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, **decoder_changes))
    return VisionLanguageModel(cfg, rngs=nnx.Rngs(seed))


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("style", ["legacy", "modern"])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_through_torch_names(style, tied):
    source, target = _tiny_model(0, tie_word_embeddings=tied), _tiny_model(1, tie_word_embeddings=tied)
    tensors = torch_tensors(source, style)
    assert ("lm_head.weight" in tensors) == (not tied)
    load_torch_tensors(target, tensors)
    jax.tree.map(np.testing.assert_array_equal, _params(target), _params(source))


def test_tied_head_present_in_state_dict_is_accepted_when_equal():
    source, target = _tiny_model(0), _tiny_model(1)
    tensors = torch_tensors(source)
    load_torch_tensors(target, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]})
    with pytest.raises(ValueError, match="differs from model.embed_tokens.weight"):
        load_torch_tensors(target, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1})


def test_load_errors_name_keys_and_shapes():
    model = _tiny_model(0)
    tensors = torch_tensors(model)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.3.self_attn.dt_bias"}
    with pytest.raises(KeyError, match=r"missing keys \['model.layers.3.self_attn.dt_bias'\]"):
        load_torch_tensors(model, missing)
    with pytest.raises(KeyError, match=r"unexpected keys \['model.layers.9.mlp.up_proj.weight'\]"):
        load_torch_tensors(model, {**tensors, "model.layers.9.mlp.up_proj.weight": np.zeros((2, 2))})
    bad = {**tensors, "visual.blocks.2.attn.qkv.weight": np.zeros((10, 32), np.float32)}
    with pytest.raises(ValueError, match=r"visual.blocks.2.attn.qkv.weight: checkpoint shape \(10, 32\), "
                                         r"model expects \(96, 32\)"):
        load_torch_tensors(model, bad)
