"""Qwen2.5-VL vision tower against transformers' ``Qwen2_5_VisionTransformerPretrainedModel``."""

from functools import partial
from operator import attrgetter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from flax import nnx
from PIL import Image
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.vision_utils import get_vision_window_index

from infinitevl_jax.data.image_processor import ImageProcessor
from infinitevl_jax.infer.vision_encoder import VisionEncoder
from infinitevl_jax.models.config import VisionConfig
from infinitevl_jax.models.vision import (
    VisionTransformer,
    encode_vision,
    vision_layout,
    window_index,
)

DIMS = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=48,
            fullatt_block_indexes=(1, 3))  # blocks [windowed, full] x 2 scanned groups


def _hf_model(window_size):
    """Small float32 eager HF ViT with every parameter randomised (norm weights and biases too)."""
    config = Qwen2_5_VLVisionConfig(window_size=window_size, **DIMS)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")) or "ln_q" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    return model


def _copy_hf_vision_weights(hf, model: VisionTransformer):
    """Loads the HF state dict into ``model`` (stacked blocks: layer i = group i // period, slot i % period)."""
    cfg = model.cfg
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    put = lambda param, value: param.set_value(jnp.asarray(value))
    put(model.patch_embed.kernel, sd["patch_embed.proj.weight"].reshape(cfg.hidden_size, -1).T)
    period = len(cfg.block_pattern)
    for slot, layer in enumerate(model.blocks.layers):
        stack = lambda key, slot=slot: np.stack([sd[f"blocks.{b * period + slot}.{key}"]
                                                 for b in range(cfg.num_blocks)])
        for norm in ("norm1", "norm2"):
            put(getattr(layer, norm).weight, stack(f"{norm}.weight"))
        for name in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            put(attrgetter(name)(layer).kernel, stack(f"{name}.weight").transpose(0, 2, 1))
            put(attrgetter(name)(layer).bias, stack(f"{name}.bias"))
    put(model.merger.ln_q.weight, sd["merger.ln_q.weight"])
    for ours, theirs in (("mlp_in", "mlp.0"), ("mlp_out", "mlp.2")):
        put(getattr(model.merger, ours).kernel, sd[f"merger.{theirs}.weight"].T)
        put(getattr(model.merger, ours).bias, sd[f"merger.{theirs}.bias"])


def _cfg(window_size, remat="none"):
    return VisionConfig(window_size=window_size, dtype="float32", remat=remat, **DIMS)


def _ours(window_size, hf=None, remat="none"):
    cfg = _cfg(window_size, remat)
    model = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))  # abstract: no init compiles
    if hf is not None:
        _copy_hf_vision_weights(hf, model)
    return model


@pytest.fixture(scope="module")
def models():
    """HF and our model with equal weights; window_size 112 = 4x4 merged tokens (the 4B config)."""
    hf = _hf_model(112)
    return hf, _ours(112, hf)


def _pixels(grid, seed=0):
    n = int(np.prod(np.asarray(grid), axis=1).sum())
    return np.random.default_rng(seed).standard_normal((n, 1176)).astype(np.float32)


def _rel_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


GRIDS = {
    "odd_image": [[1, 10, 14]],
    "two_images": [[1, 10, 14], [1, 6, 8]],
    "video_t2": [[2, 8, 12]],
}


@pytest.mark.parametrize("grid", GRIDS.values(), ids=GRIDS.keys())
def test_matches_transformers(models, grid):
    """Edge windows are partial in every case; the odd image runs the eager entry, the rest the jitted one."""
    hf, model = models
    pixels = _pixels(grid)
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels), grid_thw=torch.tensor(grid)).pooler_output.numpy().astype(np.float64)
    run = model if grid == GRIDS["odd_image"] else partial(encode_vision, model)
    with jax.default_matmul_precision("highest"):  # no TF32 when run on a GPU
        ours = run(jnp.asarray(pixels), np.array(grid))
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) <= 1e-4


def test_remat_keeps_gradients(models):
    hf, model = models
    grid = np.array([[1, 4, 4], [2, 2, 4]])
    pixels = jnp.asarray(_pixels(grid, seed=1))
    grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(pixels, grid) ** 2)))
    jax.tree.map(partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 grad(model), grad(_ours(112, hf, remat="full")))


@pytest.mark.parametrize("unroll", [False, True], ids=["scanned", "unrolled"])
def test_vision_encoder_matches_transformers(models, unroll):
    """``VisionEncoder``: pixel rows (``encode``) and uint8 frames normalised on the device
    (``encode_frames``: one image, a 3-frame video) against the HF tower on the processor's rows."""
    hf, model = models
    processor = ImageProcessor(min_pixels=56 * 56, max_pixels=16 * 28 * 28)
    encoder = VisionEncoder(model, processor, unroll_layers=unroll)
    assert isinstance(encoder.tower.blocks, nnx.List) == unroll
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)
    video = [rng.integers(0, 256, (90, 60, 3), dtype=np.uint8) for _ in range(3)]
    for frames, rows, grid in [(image, *processor.encode([Image.fromarray(image)])),
                               (video, *processor.encode([Image.fromarray(f) for f in video]))]:
        with torch.no_grad():
            ref = hf(torch.from_numpy(rows), grid_thw=torch.tensor([grid])).pooler_output.numpy().astype(np.float64)
        with jax.default_matmul_precision("highest"):
            from_rows = encoder.encode(jnp.asarray(rows), np.array([grid]))
            from_frames, frame_grid = encoder.encode_frames(frames)
        assert frame_grid == grid
        assert _rel_err(from_rows, ref) <= 1e-4 and _rel_err(from_frames, ref) <= 1e-4
    assert len(encoder._layouts) == 2  # one per grid, reused
    with jax.default_matmul_precision("highest"):
        encoder.encode_frames(image)
    assert len(encoder._layouts) == 2


def test_vision_encoder_keeps_the_most_recent_layouts(models):
    """The layout cache is bounded: the least recently used grid goes first, and comes back
    (rebuilt, same values) when asked for again."""
    _, model = models
    processor = ImageProcessor(min_pixels=56 * 56, max_pixels=16 * 28 * 28)
    encoder = VisionEncoder(model, processor, unroll_layers=False, max_layouts=2)
    grids = [(1, 4, 4), (1, 4, 6), (1, 6, 4)]
    first = encoder.layout([grids[0]])
    encoder.layout([grids[1]])
    encoder.layout([grids[0]])  # now the most recent
    encoder.layout([grids[2]])  # evicts grids[1]
    assert list(encoder._layouts) == [(grids[0],), (grids[2],)]
    again = encoder.layout([grids[1]])
    assert list(encoder._layouts) == [(grids[2],), (grids[1],)]
    assert encoder.layout([grids[0]]) is not first  # rebuilt after its eviction
    expected = vision_layout(model.cfg, np.array([grids[1]]))
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="max_layouts"):
        VisionEncoder(model, processor, max_layouts=0)


def test_vision_encoder_reload_weights(models):
    """An unrolled encoder holds copies: a changed source weight shows only after ``reload_weights``."""
    hf, _ = models
    model = _ours(112, hf)
    encoder = VisionEncoder(model, ImageProcessor(), unroll_layers=True)
    grid = np.array([[1, 4, 4]])
    pixels = jnp.asarray(_pixels(grid, seed=2))
    before = encoder.encode(pixels, grid)
    model.merger.mlp_out.bias.set_value(model.merger.mlp_out.bias[...] + 1.0)
    model.blocks.layers[0].norm1.weight.set_value(model.blocks.layers[0].norm1.weight[...] * 0.5)
    np.testing.assert_array_equal(encoder.encode(pixels, grid), before)
    encoder.reload_weights()
    np.testing.assert_allclose(encoder.encode(pixels, grid), encode_vision(model, pixels, grid), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match the tower"):
        VisionEncoder(model, ImageProcessor(patch_size=16))


@pytest.mark.parametrize("window_size", [56, 112])
def test_window_index_matches_transformers(window_size):
    grid = np.array([[1, 10, 14], [2, 8, 12], [1, 16, 4]])
    ref_index, ref_cu = get_vision_window_index(torch.tensor(grid), 2, window_size, 14)
    merged, sizes = window_index(grid, 2, window_size // 28)
    np.testing.assert_array_equal(merged, ref_index.numpy())
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(sizes * 4)]), ref_cu.numpy())
    layout = vision_layout(_cfg(window_size), grid)
    for groups in (layout.window, layout.full):
        np.testing.assert_array_equal(groups.index.ravel()[groups.position], np.arange(grid.prod(1).sum()))


@pytest.mark.parametrize("pixels_shape, grid, match", [
    ((140, 1000), [[1, 10, 14]], "must be \\[patches, 1176\\]"),
    ((139, 1176), [[1, 10, 14]], "sum\\(t\\*h\\*w\\) = 140"),
    ((126, 1176), [[1, 9, 14]], "multiples of spatial_merge_size"),
    ((140, 1176), [1, 10, 14], "must be \\[n_images, 3\\]"),
    ((140, 1176), [[10, 14]], "must be \\[n_images, 3\\]"),
])
def test_errors(pixels_shape, grid, match):
    model = _ours(112)
    with pytest.raises(ValueError, match=match):
        model(jnp.zeros(pixels_shape), np.array(grid))
