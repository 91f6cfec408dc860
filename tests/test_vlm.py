"""The whole teacher (all-attention Qwen2.5-VL) against transformers' model on the CPU.

A small random ``Qwen2_5_VLForConditionalGeneration`` (float32; 2-block ViT with one
full-attention block and 2x2-token windows, 2-layer text model) is imported through the config
importer and the name map; logits must agree to float32 precision (relative error <= 1e-4) on
text only, image + video + text, and a left-padded batch.
"""

import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.convert.hf_config import config_from_hf
from infinitevl_jax.convert.torch_params import load_torch_tensors
from infinitevl_jax.data.tokenizer import chat_prompt
from infinitevl_jax.models.vlm import VisionLanguageModel

pytest.importorskip("torch")
pytest.importorskip("transformers")
from tests.reference.hf_qwen import (IMAGES, encode_left_padded, logits_error, random_image,  # noqa: E402
                                     tiny_qwen2_5_vl)


@pytest.fixture(scope="module")
def models():
    reference = tiny_qwen2_5_vl()
    ours = VisionLanguageModel(config_from_hf(reference.config.to_dict(), dtype="float32"), rngs=nnx.Rngs(0))
    load_torch_tensors(ours, {k: v.numpy() for k, v in reference.state_dict().items()})
    return reference, ours


def _compare(models, texts, *, images=(), videos=()):
    err, inputs = logits_error(*models, texts, images=images, videos=videos)
    assert err <= 1e-4, err
    return inputs


def test_text_only_logits_match(models):
    _compare(models, [chat_prompt("What shape is in the image? Answer in one word.")])


def test_image_video_and_text_logits_match(models):
    # video: 4 frames of 56x84 -> grid (2, 4, 6): merged 2 x 3 spatial, temporal ids 0 and 2
    video = [np.asarray(random_image(10 + i, (56, 84))) for i in range(4)]
    prompt = chat_prompt("<|vision_start|><|image_pad|><|vision_end|>Compare with "
                         "<|vision_start|><|video_pad|><|vision_end|> and <|vision_start|><|image_pad|>"
                         "<|vision_end|>.")
    inputs = _compare(models, [prompt], images=[random_image(1, (84, 112)), random_image(2, (60, 45))], videos=[video])
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8], [1, 4, 4]]
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]


def test_left_padded_batch_logits_match(models):
    prompts = [chat_prompt("<|vision_start|><|image_pad|><|vision_end|>What color is it?"),
               chat_prompt("<|vision_start|><|image_pad|><|vision_end|>Is there a circle in this picture?")]
    _compare(models, prompts, images=[random_image(3, (84, 84)), random_image(4, (56, 112))])


def test_placeholder_count_mismatch_is_a_clear_error(models):
    _, ours = models
    inputs = IMAGES([random_image(5, (56, 56))])
    input_ids, _ = encode_left_padded(["<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>"])
    with pytest.raises(ValueError, match="3 placeholder tokens .* produced 4 merged tokens"):
        ours(input_ids, **inputs)
