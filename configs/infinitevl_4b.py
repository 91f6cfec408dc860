"""InfiniteVL-4B text decoder (spec section 1): 36 layers, SWA (window 8192) at i % 4 == 0,
Gated DeltaNet elsewhere (16 heads, d_k 128, d_v 256), Qwen2.5-VL-3B dims, tied embeddings;
Qwen2.5-VL's 32-block ViT (spec section 1.2) and token ids."""

import ml_collections

from infinitevl_jax.models.config import hybrid_layer_types


def get_config():
    model = ml_collections.ConfigDict(dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        layer_types=hybrid_layer_types(36),
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=128,
        rope_theta=1e6,
        mrope_section=(16, 24, 24),
        sliding_window=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        gdn=dict(num_heads=16, head_k_dim=128, head_v_dim=256, conv_size=4, norm_eps=1e-5),
        dtype="bfloat16",
        param_dtype="float32",
        delta_rule_impl="auto",
        attention_impl="auto",
        remat="none",
    ))
    vision = ml_collections.ConfigDict(dict(
        depth=32,
        hidden_size=1280,
        num_heads=16,
        intermediate_size=3420,
        out_hidden_size=2048,
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        tokens_per_second=2.0,
        dtype="bfloat16",
        param_dtype="float32",
    ))
    tokens = ml_collections.ConfigDict(dict(image_token_id=151655, video_token_id=151656,
                                            vision_start_token_id=151652, vision_end_token_id=151653))
    return ml_collections.ConfigDict(dict(model=model, vision=vision, tokens=tokens, seed=0))
