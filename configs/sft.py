"""InfiniteVL stage 2: instruction SFT at 8K tokens, cross-entropy on assistant tokens; the GDN
mixers and the SWA q/k/v/o train (spec 7.3; add ``"mlps"`` to ``train.trainable`` for the
earlier variant that also trained the MLPs).

    infinitevl train --config configs/sft.py --run-dir runs/stage2 --config.init.checkpoint=runs/stage1b \
        --config.data.tokenizer=/path/to/Qwen2.5-VL-3B-Instruct --config.data.path=/data/sft.jsonl
"""

from infinitevl_jax.train.run_config import infinitevl_recipe


def get_config():
    config = infinitevl_recipe("sft")
    config.init.checkpoint = ""  # the stage-1b run directory
    return config
