"""LinMU stage 3: LoRA (rank 16, alpha 32) on the MLPs' gate/up/down maps, with both M-MATE
branches still training, against the teacher. Loading the run directory merges the adapters.

    infinitevl train --config configs/linmu_lora.py --run-dir runs/linmu3 \
        --config.init.checkpoint=runs/linmu2 --config.teacher.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.tokenizer=/path/to/Qwen2.5-VL-3B-Instruct --config.data.path=/data/train.jsonl
"""

from infinitevl_jax.train.run_config import linmu_recipe


def get_config():
    config = linmu_recipe("linmu_lora")
    config.init.checkpoint = ""  # the stage-2 run directory
    config.teacher.checkpoint = ""  # the teacher
    return config
