"""InfiniteVL stage 1a: layer-wise distillation of a mimic-initialised student from Qwen2.5-VL-3B
(spec 7.1-7.2): every student layer on the teacher's input to it, MSE to its output x 1000;
only the 27 GDN mixers train.

    infinitevl train --config configs/distill_layerwise.py --run-dir runs/stage1a \
        --config.init.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.tokenizer=/path/to/Qwen2.5-VL-3B-Instruct --config.data.path=/data/train.jsonl
"""

from infinitevl_jax.train.run_config import infinitevl_recipe


def get_config():
    config = infinitevl_recipe("distill_layerwise")
    config.init.checkpoint = ""  # the full-attention teacher (Hugging Face folder); the student is built from it
    config.init.student.enabled = True
    config.init.student.sliding_window = 8192
    return config
