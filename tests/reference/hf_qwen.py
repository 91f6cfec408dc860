"""Small random transformers ``Qwen2_5_VLForConditionalGeneration`` models (float32, CPU): the
independent reference for the teacher's logits and for checkpoint import/export.

The text model is 2 layers of width 64 over the byte tokenizer's ids; the ViT has 2 blocks
(block 1 attends over whole slices, block 0 over 2x2-merged-token windows). Weights are drawn
so that every tensor matters (norm weights around 1, the rest N(0, 0.15^2)).
"""

import numpy as np
import torch
import transformers
from PIL import Image

from infinitevl_jax.data import ImageProcessor, VideoProcessor, expand_placeholders
from infinitevl_jax.data.tokenizer import ByteTokenizer

_TOK = ByteTokenizer()
TOKEN_IDS = dict(image_token_id=_TOK.special_ids["<|image_pad|>"], video_token_id=_TOK.special_ids["<|video_pad|>"],
                 vision_start_token_id=_TOK.special_ids["<|vision_start|>"],
                 vision_end_token_id=_TOK.special_ids["<|vision_end|>"])
IMAGES = ImageProcessor(min_pixels=28 * 28, max_pixels=84 * 112)
VIDEOS = VideoProcessor(min_pixels=28 * 28, max_pixels=56 * 84, fps=2.0)


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name


def tiny_qwen2_5_vl(*, tie_word_embeddings: bool = True, seed: int = 0):
    """A random tiny Qwen2.5-VL in eval mode with eager attention."""
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_scaling=dict(type="default", mrope_section=[2, 3, 3]), max_position_embeddings=1024,
                         bos_token_id=_TOK.special_ids["<|endoftext|>"], eos_token_id=_TOK.eos_id),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=56, tokens_per_second=2),
        tie_word_embeddings=tie_word_embeddings, **TOKEN_IDS)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if _is_norm(name) else torch.randn_like(p) * 0.15)
    return model


def random_image(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def encode_left_padded(texts):
    """Byte-token ids ``[B, T]`` left-padded with 0, and the attention mask."""
    ids = [_TOK.encode(t) for t in texts]
    length = max(map(len, ids))
    input_ids = np.zeros((len(ids), length), np.int64)
    mask = np.zeros((len(ids), length), np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, length - len(seq):] = seq
        mask[row, length - len(seq):] = 1
    return input_ids, mask


def logits_error(reference, ours, texts, *, images=(), videos=()):
    """Largest |ours - reference| logit over real tokens, relative to the largest reference logit,
    for chat ``texts`` with ``<|image_pad|>``/``<|video_pad|>`` placeholders; also the processor outputs."""
    inputs = {}
    if images:
        inputs.update(IMAGES(list(images)))
    if videos:
        inputs.update(VIDEOS(list(videos)))
    texts = expand_placeholders(texts, inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
    input_ids, mask = encode_left_padded(texts)
    # what Qwen2_5_VLProcessor returns next to the ids: 1 at image pads, 2 at video pads
    token_types = (input_ids == TOKEN_IDS["image_token_id"]) + 2 * (input_ids == TOKEN_IDS["video_token_id"])
    with torch.no_grad():
        ref = reference(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                        mm_token_type_ids=torch.from_numpy(token_types),
                        **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.float().numpy()
    out = ours(input_ids, attention_mask=mask if mask.min() == 0 else None, **inputs).logits
    real = mask.astype(bool)
    return float(np.abs(np.asarray(out)[real] - ref[real]).max() / np.abs(ref[real]).max()), inputs
