"""LinMU over Qwen2.5-VL-3B (docs/linmu.md): the teacher's dims with every decoder layer an M-MATE
mixer (odd layers shifted), 2 x 4 x 4 Local-Swin windows, a 128-token causal text window."""

from infinitevl_jax.configs import qwen2_5_vl_3b
from infinitevl_jax.models.config import mmate_layer_types


def get_config():
    config = qwen2_5_vl_3b.get_config()
    config.model.layer_types = mmate_layer_types(36)
    config.model.mmate = dict(conv_size=4, window=(2, 4, 4), text_window=128)
    return config
