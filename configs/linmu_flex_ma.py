"""LinMU stage 1: build the M-MATE student of the teacher (every attention -> M-MATE, Flex-MA from
W_q/W_k/W_v/W_o, Local-Swin a copy of the attention) and train Flex-MA and the branch mix
against the frozen teacher: KL of the logits at temperature 2 plus 100 x the mean squared error
of every layer's hidden state (docs/linmu.md).

    infinitevl train --config configs/linmu_flex_ma.py --run-dir runs/linmu1 \
        --config.init.checkpoint=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.data.tokenizer=/path/to/Qwen2.5-VL-3B-Instruct --config.data.path=/data/train.jsonl
"""

from infinitevl_jax.train.run_config import linmu_recipe


def get_config():
    config = linmu_recipe("linmu_flex_ma")
    config.init.checkpoint = ""  # the teacher (a Hugging Face Qwen2.5-VL folder)
    config.init.student.enabled = True
    return config
