"""Evaluation: VQA / ANLS metrics, evaluation data sets, batched greedy evaluation, the
``infinitevl eval`` command and an lmms-eval model plugin (``lmms_plugin``, imported only by
lmms-eval itself).

    from infinitevl_jax.evaluate import datasets, evaluate
    report = evaluate(model, tokenizer, datasets.easy_vqa("test", limit=200), max_new_tokens=4)
    print(report.accuracy, report.anls)
"""

from infinitevl_jax.evaluate import datasets, metrics
from infinitevl_jax.evaluate.datasets import EvalSample
from infinitevl_jax.evaluate.metrics import anls_score, exact_match, normalize_answer, vqa_soft_score
from infinitevl_jax.evaluate.vqa import EvalReport, engine_for, evaluate

__all__ = [
    "EvalReport", "EvalSample", "anls_score", "datasets", "engine_for", "evaluate", "exact_match", "metrics",
    "normalize_answer", "vqa_soft_score",
]
