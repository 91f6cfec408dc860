"""A curriculum: several training runs in order, each starting from an earlier one, with an
evaluation after each (the quickstart: a teacher, then the four InfiniteVL student stages).

A curriculum config holds

    order           the stage names in running order
    stages.<name>   one ``run_config`` per stage; a checkpoint field
                    (``init.checkpoint``, ``teacher.checkpoint``) that reads ``@<name>`` means
                    the run directory of that earlier stage
    eval            data (what ``evaluate.datasets.load`` takes: easy_vqa, ...), split, limit,
                    batch_size, max_new_tokens: the evaluation run on each stage's final model

``run_curriculum(config, run_dir)`` trains stage ``name`` in ``run_dir/name`` (resuming it if it
was interrupted, skipping it if it finished), evaluates it, and writes ``run_dir/results.json``:
per stage the steps, final loss and evaluation. A stage's evaluation is cached in its run
directory (``eval.json``) next to the step it measured. ``results.json`` holds ``order``,
``stages`` (name -> steps, final loss, evaluation) and the curriculum's ``seconds``.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections

from infinitevl_jax.convert.pretrained import load_pretrained
from infinitevl_jax.data.pipeline import make_tokenizer
from infinitevl_jax.evaluate.datasets import load as load_eval_samples
from infinitevl_jax.evaluate.vqa import evaluate
from infinitevl_jax.train.checkpoint import resolve_step, write_json_atomic
from infinitevl_jax.train.loop import train
from infinitevl_jax.train.observe import read_metrics

REFERENCE = "@"
RESULTS_FILE = "results.json"
EVAL_FILE = "eval.json"


def is_curriculum(config: ml_collections.ConfigDict) -> bool:
    return "stages" in config


def resolve_references(stage: ml_collections.ConfigDict, run_dir: str, done: list[str]) -> ml_collections.ConfigDict:
    """A copy of a stage config with ``@name`` checkpoints replaced by ``run_dir/name``."""
    stage = ml_collections.ConfigDict(stage.to_dict())
    for section in ("init", "teacher"):
        path = stage[section].checkpoint
        if path.startswith(REFERENCE):
            name = path[len(REFERENCE):]
            if name not in done:
                raise ValueError(f"{section}.checkpoint={path!r} names a stage that does not run before this one "
                                 f"(earlier stages: {done or 'none'})")
            stage[section].checkpoint = os.path.join(run_dir, name)
    return stage


def _evaluate_stage(stage_dir: str, data_section, eval_section, progress: bool) -> dict:
    """The stage's evaluation report (cached in ``eval.json`` for the step it measured)."""
    step = resolve_step(stage_dir, None)
    cache = os.path.join(stage_dir, EVAL_FILE)
    if os.path.isfile(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("step") == step:
            return cached
    model = load_pretrained(stage_dir)
    samples = load_eval_samples(eval_section.data, split=eval_section.split, limit=eval_section.limit)
    report = evaluate(model, make_tokenizer(data_section.tokenizer), samples, batch_size=eval_section.batch_size,
                      max_new_tokens=eval_section.max_new_tokens, progress=progress,
                      desc=f"eval {os.path.basename(stage_dir)}")
    result = {"step": step, "accuracy": report.accuracy, "anls": report.anls, "count": report.count,
              "seconds": report.seconds}
    write_json_atomic(cache, result)
    return result


def results_table(results: dict) -> str:
    """The per-stage table printed at the end (accuracy relative to the first stage)."""
    names = list(results)
    base = results[names[0]]["eval"]["accuracy"] if names else 0.0
    lines = [f"{'stage':<20} {'steps':>6} {'final loss':>11} {'accuracy':>9} {'vs ' + names[0]:>12}"]
    for name in names:
        r = results[name]
        relative = r["eval"]["accuracy"] / base if base else float("nan")
        loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
        lines.append(f"{name:<20} {r['steps']:>6} {loss:>11} {100 * r['eval']['accuracy']:>8.1f}% {relative:>11.2f}x")
    return "\n".join(lines)


def run_curriculum(config: ml_collections.ConfigDict, run_dir: str, *, progress: bool = True) -> dict:
    """Trains and evaluates every stage in order (module docstring); returns the results."""
    start = time.perf_counter()
    results, done = {}, []
    if sorted(config.order) != sorted(config.stages):
        raise ValueError(f"order {list(config.order)} must name each of the stages {sorted(config.stages)} once")
    for name in config.order:
        stage = resolve_references(config.stages[name], run_dir, done)
        stage_dir = os.path.join(run_dir, name)
        print(f"== stage {name} ({stage.train.stage}, {stage.train.loss}, trainable: "
              f"{', '.join(stage.train.trainable)}) -> {stage_dir}", flush=True)
        outcome = train(stage, stage_dir, progress=progress)
        if outcome.preempted:
            print(f"stopped by a signal during stage {name} at step {outcome.step}; run the same command to resume")
            return results
        evaluation = _evaluate_stage(stage_dir, stage.data, config.eval, progress)
        print(f"   {name}: {config.eval.data} accuracy {100 * evaluation['accuracy']:.1f}% "
              f"({evaluation['count']} questions)", flush=True)
        history = read_metrics(stage_dir)
        results[name] = {"steps": outcome.step, "loss": history[-1]["loss"] if history else None, "eval": evaluation}
        done.append(name)
    write_json_atomic(os.path.join(run_dir, RESULTS_FILE), {"order": list(config.order), "stages": results,
                                                            "seconds": time.perf_counter() - start})
    print(results_table(results))
    return results
