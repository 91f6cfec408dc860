"""LinMU stage 2: Local-Swin unfrozen; both branches and the mix train against the teacher.

    infinitevl train --config configs/linmu_local_swin.py --run-dir runs/linmu2 \
        --config.init.checkpoint=runs/linmu1 --config.teacher.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.tokenizer=/path/to/Qwen2.5-VL-3B-Instruct --config.data.path=/data/train.jsonl
"""

from infinitevl_jax.train.run_config import linmu_recipe


def get_config():
    config = linmu_recipe("linmu_local_swin")
    config.init.checkpoint = ""  # the stage-1 run directory
    config.teacher.checkpoint = ""  # the teacher
    return config
