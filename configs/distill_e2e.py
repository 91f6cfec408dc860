"""InfiniteVL stage 1b: end-to-end logit distillation, KL(teacher || student) at temperature 2
over all positions (spec 7.2; ``--config.train.kl_mask=labels`` keeps answer tokens only); the
GDN mixers train.

    infinitevl train --config configs/distill_e2e.py --run-dir runs/stage1b \
        --config.init.checkpoint=runs/stage1a --config.teacher.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.tokenizer=/path/to/Qwen2.5-VL-3B-Instruct --config.data.path=/data/train.jsonl
"""

from infinitevl_jax.train.run_config import infinitevl_recipe


def get_config():
    config = infinitevl_recipe("distill_e2e")
    config.init.checkpoint = ""  # the stage-1a run directory
    config.teacher.checkpoint = ""  # the full-attention teacher
    return config
