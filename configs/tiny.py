"""Tiny hybrid model for tests and the CPU quickstart: 8 layers = 2 blocks of [SWA, GDN, GDN, GDN],
a 4-block ViT (width 32, 2x2-merged-token windows, full attention in blocks 1 and 3), and the
byte tokenizer's special-token ids."""

import ml_collections

from infinitevl_jax.data.tokenizer import ByteTokenizer
from infinitevl_jax.models.config import hybrid_layer_types


def get_config():
    model = ml_collections.ConfigDict(dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        layer_types=hybrid_layer_types(8),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1e6,
        mrope_section=(2, 3, 3),
        sliding_window=16,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        gdn=dict(num_heads=2, head_k_dim=16, head_v_dim=32, conv_size=4, norm_eps=1e-5),
        dtype="float32",
        param_dtype="float32",
        delta_rule_impl="auto",
        attention_impl="auto",
        remat="none",
    ))
    vision = ml_collections.ConfigDict(dict(
        depth=4,
        hidden_size=32,
        num_heads=2,
        intermediate_size=64,
        out_hidden_size=64,
        window_size=56,
        fullatt_block_indexes=(1, 3),
        dtype="float32",
        param_dtype="float32",
    ))
    special = ByteTokenizer().special_ids
    tokens = ml_collections.ConfigDict(dict(
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"]))
    return ml_collections.ConfigDict(dict(model=model, vision=vision, tokens=tokens, seed=0))
