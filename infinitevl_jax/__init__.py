"""InfiniteVL in JAX/Flax: a hybrid sliding-window attention + Gated DeltaNet vision-language model.

The public entry points are importable from here (loaded on first use, so ``import
infinitevl_jax`` stays cheap):

    load_pretrained(path, *, dtype=None, param_dtype=None, mesh=None)  Hugging Face folder or run dir -> model
    export_pytorch(model, out_dir, *, dtype="bfloat16", ...)           model -> official PyTorch layout
    student_from_teacher(teacher, cfg=None, *, seed=0)                 Qwen2.5-VL teacher -> InfiniteVL student
    VisionLanguageModel, VisionLanguageConfig                          the model and its config
"""

import importlib

_EXPORTS = {
    "load_pretrained": "infinitevl_jax.convert.pretrained",
    "export_pytorch": "infinitevl_jax.convert.export",
    "student_from_teacher": "infinitevl_jax.convert.student",
    "VisionLanguageModel": "infinitevl_jax.models.vlm",
    "VisionLanguageConfig": "infinitevl_jax.models.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'infinitevl_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
