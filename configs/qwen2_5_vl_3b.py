"""The teacher, Qwen2.5-VL-3B's text decoder: InfiniteVL-4B's dims with every layer full attention."""

from infinitevl_jax.configs import infinitevl_4b


def get_config():
    config = infinitevl_4b.get_config()
    config.model.layer_types = ("full_attention",) * 36
    config.model.sliding_window = None  # no sliding layers (use_sliding_window=false upstream)
    return config
