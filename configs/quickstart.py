"""The quickstart main job (``infinitevl train --config configs/quickstart.py``), on a CPU:

    teacher            the tiny preset with every layer full attention, trained from scratch on
                       easy-VQA (all parameters, cross-entropy on answers)
    distill_layerwise  its InfiniteVL student (SWA at layers 0 and 4, mimic-initialised GDN
                       elsewhere), each layer regressed on the teacher's (GDN mixers)
    distill_e2e        logit KL to the teacher (GDN mixers)
    sft                cross-entropy on answers (GDN mixers + SWA q/k/v/o)
    long_sft           LoRA on q/k/v/o at twice the packed length, with remat

then the easy-VQA test accuracy of each (greedy answers, exact match) in a table. Every stage
is an ordinary run config: the same loop runs them on a pod with the 4B preset.

``--arch linmu`` (``get_config("linmu")``) trains the same teacher, then LinMU's three stages
(docs/linmu.md): linmu_flex_ma (M-MATE student from the teacher's attention; Flex-MA + mix),
linmu_local_swin (+ Local-Swin), linmu_lora (+ LoRA on the MLPs), each against the teacher's
logits and hidden states.
"""

import ml_collections

from infinitevl_jax.train.run_config import run_config

TEACHER_LAYERS = ("full_attention",) * 8
EVAL = dict(data="easy_vqa", split="test", limit=400, batch_size=50, max_new_tokens=4)


def _stage(stage: str, steps: int, learning_rate: float, init: str = "", teacher: str = ""):
    config = run_config(stage, "tiny")
    config.model.layer_types = TEACHER_LAYERS
    config.model.sliding_window = 16
    config.train.dtype = "float32"
    config.train.optim.total_steps = steps
    config.train.optim.learning_rate = learning_rate
    config.train.optim.warmup_ratio = 0.05
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.data.max_patches = 128
    config.run.save_every = steps
    config.run.keep = 1
    config.run.log_every = 10
    config.init.checkpoint = init
    config.teacher.checkpoint = teacher
    return config


def _linmu(teacher):
    """The LinMU curriculum over the same teacher (docs/linmu.md)."""
    flex_ma = _stage("linmu_flex_ma", 150, 3e-3, init="@teacher")
    flex_ma.init.student.enabled = True
    flex_ma.init.student.arch = "linmu"
    flex_ma.init.student.mmate = dict(conv_size=4, window=(2, 2, 2), text_window=16)
    local_swin = _stage("linmu_local_swin", 150, 1e-3, init="@linmu_flex_ma", teacher="@teacher")
    lora = _stage("linmu_lora", 100, 1e-3, init="@linmu_local_swin", teacher="@teacher")
    return ml_collections.ConfigDict(dict(
        order=("teacher", "linmu_flex_ma", "linmu_local_swin", "linmu_lora"),
        stages=dict(teacher=teacher, linmu_flex_ma=flex_ma, linmu_local_swin=local_swin, linmu_lora=lora),
        eval=EVAL))


def get_config(arch: str = "infinitevl"):
    """The curriculum of the ``arch`` student: ``infinitevl`` or ``linmu`` (``--arch linmu``)."""
    if arch not in ("infinitevl", "linmu"):
        raise ValueError(f"unknown quickstart architecture {arch!r}; choose infinitevl or linmu")
    teacher = _stage("sft", 400, 3e-3)
    teacher.train.trainable = ("all",)
    if arch == "linmu":
        return _linmu(teacher)

    layerwise = _stage("distill_layerwise", 150, 3e-3, init="@teacher")
    layerwise.init.student.enabled = True
    layerwise.init.student.sliding_window = 16

    e2e = _stage("distill_e2e", 200, 1e-3, init="@distill_layerwise", teacher="@teacher")
    sft = _stage("sft", 150, 1e-3, init="@distill_e2e")

    long_sft = _stage("long_sft", 100, 1e-3, init="@sft")
    long_sft.data.seq_len = 512
    long_sft.data.batch_size = 4
    long_sft.data.max_patches = 256
    long_sft.train.lora.rank = 8
    long_sft.train.lora.alpha = 16.0

    return ml_collections.ConfigDict(dict(
        order=("teacher", "distill_layerwise", "distill_e2e", "sft", "long_sft"),
        stages=dict(teacher=teacher, distill_layerwise=layerwise, distill_e2e=e2e, sft=sft, long_sft=long_sft),
        eval=EVAL,
    ))
