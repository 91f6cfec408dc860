"""The whole teacher (all-attention Qwen2.5-VL) against transformers' model on the CPU.

A small random ``Qwen2_5_VLForConditionalGeneration`` (float32; 2-block ViT with one
full-attention block and 2x2-token windows, 2-layer text model) is imported through the config
importer and the name map; logits must agree to float32 precision (relative error <= 1e-4) on
text only, image + video + text, and a left-padded batch.
"""

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from infinitevl_jax.convert.hf_config import config_from_hf
from infinitevl_jax.convert.torch_params import load_torch_tensors
from infinitevl_jax.data import ImageProcessor, VideoProcessor, expand_placeholders
from infinitevl_jax.data.tokenizer import ByteTokenizer, chat_prompt
from infinitevl_jax.models.vlm import VisionLanguageModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOK = ByteTokenizer()
IDS = dict(image_token_id=TOK.special_ids["<|image_pad|>"], video_token_id=TOK.special_ids["<|video_pad|>"],
           vision_start_token_id=TOK.special_ids["<|vision_start|>"],
           vision_end_token_id=TOK.special_ids["<|vision_end|>"])
IMAGES = ImageProcessor(min_pixels=28 * 28, max_pixels=84 * 112)
VIDEOS = VideoProcessor(min_pixels=28 * 28, max_pixels=56 * 84, fps=2.0)


@pytest.fixture(scope="module")
def models():
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_scaling=dict(type="default", mrope_section=[2, 3, 3]), max_position_embeddings=1024),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, tokens_per_second=2),
        tie_word_embeddings=True, **IDS)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") or "norm1" in name or "norm2" in name
                    or "ln_q" in name else torch.randn_like(p) * 0.15)
    ours = VisionLanguageModel(config_from_hf(config.to_dict(), dtype="float32"), rngs=nnx.Rngs(0))
    load_torch_tensors(ours, {k: v.numpy() for k, v in reference.state_dict().items()})
    return reference, ours


def _image(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _encode(texts):
    """Token ids ``[B, T]`` left-padded with 0 and the attention mask."""
    ids = [TOK.encode(t) for t in texts]
    length = max(map(len, ids))
    input_ids = np.zeros((len(ids), length), np.int64)
    mask = np.zeros((len(ids), length), np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return input_ids, mask


def _compare(models, texts, *, images=(), videos=(), fps=None):
    reference, ours = models
    inputs = {}
    if images:
        inputs.update(IMAGES(list(images)))
    if videos:
        inputs.update(VIDEOS(list(videos)))
    texts = expand_placeholders(texts, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    input_ids, mask = _encode(texts)
    # what Qwen2_5_VLProcessor returns next to the ids: 1 at image pads, 2 at video pads
    token_types = (input_ids == IDS["image_token_id"]) + 2 * (input_ids == IDS["video_token_id"])
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                        mm_token_type_ids=torch.from_numpy(token_types),
                        **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()
    out = ours(input_ids, attention_mask=mask if mask.min() == 0 else None, **inputs).logits
    real = mask.astype(bool)
    err = np.abs(np.asarray(out)[real] - ref[real]).max() / np.abs(ref[real]).max()
    assert err <= 1e-4, err
    return inputs


def test_text_only_logits_match(models):
    _compare(models, [chat_prompt("What shape is in the image? Answer in one word.")])


def test_image_video_and_text_logits_match(models):
    # video: 4 frames of 56x84 -> grid (2, 4, 6): merged 2 x 3 spatial, temporal ids 0 and 2
    video = [np.asarray(_image(10 + i, (56, 84))) for i in range(4)]
    prompt = chat_prompt("<|vision_start|><|image_pad|><|vision_end|>Compare with "
                         "<|vision_start|><|video_pad|><|vision_end|> and <|vision_start|><|image_pad|>"
                         "<|vision_end|>.")
    inputs = _compare(models, [prompt], images=[_image(1, (84, 112)), _image(2, (60, 45))], videos=[video])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4]]
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]


def test_left_padded_batch_logits_match(models):
    prompts = [chat_prompt("<|vision_start|><|image_pad|><|vision_end|>What color is it?"),
               chat_prompt("<|vision_start|><|image_pad|><|vision_end|>Is there a circle in this picture?")]
    _compare(models, prompts, images=[_image(3, (84, 84)), _image(4, (56, 112))])


def test_placeholder_count_mismatch_is_a_clear_error(models):
    _, ours = models
    inputs = IMAGES([_image(5, (56, 56))])
    input_ids, _ = _encode(["<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>"])
    with pytest.raises(ValueError, match="3 placeholder tokens .* produced 4 merged tokens"):
        ours(input_ids, **inputs)
