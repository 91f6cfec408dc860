"""The quickstart main job (``infinitevl train --config configs/quickstart.py``): a teacher and the
four student stages, each evaluated on easy-VQA; with ``--arch linmu``, the teacher and LinMU's
three stages.

CI runs a shortened curriculum through the real command (every stage, its checkpoint links,
evaluation, the results table and the resume-skips-finished-stages path). The full-length run,
whose student must keep at least 90% of the teacher's accuracy, is marked ``slow``:
``python -m pytest -q -m slow tests`` (21 minutes on 2 CPU cores with 8 simulated devices; the LinMU
one 24 minutes).
"""

from __future__ import annotations

import json
import os

import pytest

from infinitevl_jax.cli import main
from infinitevl_jax.config import load_config
from infinitevl_jax.convert.pretrained import load_pretrained
from infinitevl_jax.train.curriculum import RESULTS_FILE, resolve_references

QUICKSTART = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "quickstart.py")
STAGES = ("teacher", "distill_layerwise", "distill_e2e", "sft", "long_sft")
LINMU_STAGES = ("teacher", "linmu_flex_ma", "linmu_local_swin", "linmu_lora")


def short_overrides(steps: int, stages=STAGES) -> list[str]:
    """Command-line overrides that shorten every stage and the evaluation."""
    overrides = ["--config.eval.limit=12", "--config.eval.batch_size=12"]
    for stage in stages:
        prefix = f"--config.stages.{stage}"
        overrides += [f"{prefix}.train.optim.total_steps={steps}", f"{prefix}.run.save_every={steps}",
                      f"{prefix}.data.batch_size=8", f"{prefix}.data.seq_len=128", f"{prefix}.data.max_patches=64"]
    return overrides


def test_quickstart_config_links_each_stage_to_the_one_before(tmp_path):
    config = load_config(QUICKSTART)
    assert tuple(config.order) == STAGES
    done = []
    for name in config.order:
        stage = resolve_references(config.stages[name], str(tmp_path), done)
        done.append(name)
        if name == "distill_layerwise":
            assert stage.init.checkpoint == str(tmp_path / "teacher") and stage.init.student.enabled
        if name == "distill_e2e":
            assert stage.teacher.checkpoint == str(tmp_path / "teacher")
    assert config.stages.long_sft.train.lora.rank > 0
    broken = load_config(QUICKSTART)
    broken.stages.teacher.init.checkpoint = "@sft"
    with pytest.raises(ValueError, match="does not run before"):
        resolve_references(broken.stages.teacher, str(tmp_path), [])


def test_short_quickstart_runs_every_stage_and_prints_the_table(tmp_path, capsys):
    run_dir = str(tmp_path / "quickstart")
    argv = ["train", "--config", QUICKSTART, "--run-dir", run_dir, "--no-progress", *short_overrides(4)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    with open(os.path.join(run_dir, RESULTS_FILE)) as f:
        saved = json.load(f)
    results = saved["stages"]
    assert saved["order"] == list(STAGES) and sorted(results) == sorted(STAGES)
    for name in STAGES:
        assert results[name]["steps"] == 4 and results[name]["eval"]["count"] == 12
        assert 0.0 <= results[name]["eval"]["accuracy"] <= 1.0
        assert f"{name:<20}" in out
    # the students have the InfiniteVL layout; the LoRA stage's directory loads merged
    student = load_pretrained(os.path.join(run_dir, "long_sft"))
    assert student.cfg.decoder.layer_types[:4] == ("sliding_attention",) + ("linear_attention",) * 3
    teacher = load_pretrained(os.path.join(run_dir, "teacher"))
    assert set(teacher.cfg.decoder.layer_types) == {"full_attention"}

    # a second start finds every stage finished: nothing retrains, evaluations come from the cache
    assert main(argv) == 0
    with open(os.path.join(run_dir, RESULTS_FILE)) as f:
        assert json.load(f)["stages"] == results


def test_linmu_quickstart_links_its_stages_and_runs_them(tmp_path, capsys):
    config = load_config(QUICKSTART, arg="linmu")
    assert tuple(config.order) == LINMU_STAGES
    flex_ma = resolve_references(config.stages.linmu_flex_ma, str(tmp_path), ["teacher"])
    assert flex_ma.init.student.enabled and flex_ma.init.student.arch == "linmu"
    assert flex_ma.init.checkpoint == str(tmp_path / "teacher")
    with pytest.raises(ValueError, match="unknown quickstart architecture"):
        load_config(QUICKSTART, arg="mamba")
    with pytest.raises(ValueError, match="takes no argument"):
        load_config("tiny", arg="linmu")

    run_dir = str(tmp_path / "quickstart-linmu")
    argv = ["train", "--config", QUICKSTART, "--arch", "linmu", "--run-dir", run_dir, "--no-progress",
            *short_overrides(3, LINMU_STAGES)]
    assert main(argv) == 0
    with open(os.path.join(run_dir, RESULTS_FILE)) as f:
        results = json.load(f)["stages"]
    assert sorted(results) == sorted(LINMU_STAGES) and all(results[n]["steps"] == 3 for n in LINMU_STAGES)
    out = capsys.readouterr().out
    assert "linmu_local_swin" in out and "hidden_kl" in out
    student = load_pretrained(os.path.join(run_dir, "linmu_lora"))  # the MLP adapters merged
    assert student.cfg.decoder.layer_types[:2] == ("mmate", "mmate_shifted")
    assert student.cfg.decoder.mmate.window == (2, 2, 2)


def _full_run(tmp_path, stages, arch=()):
    run_dir = str(tmp_path / "quickstart")
    assert main(["train", "--config", QUICKSTART, *arch, "--run-dir", run_dir, "--no-progress"]) == 0
    with open(os.path.join(run_dir, RESULTS_FILE)) as f:
        results = json.load(f)["stages"]
    teacher = results["teacher"]["eval"]["accuracy"]
    assert teacher > 0.5
    for name in stages[1:]:
        assert results[name]["eval"]["accuracy"] >= 0.9 * teacher, (name, results)


@pytest.mark.slow
def test_full_quickstart_student_keeps_90_percent_of_the_teacher_accuracy(tmp_path):
    _full_run(tmp_path, STAGES)


@pytest.mark.slow
def test_full_linmu_quickstart_student_keeps_90_percent_of_the_teacher_accuracy(tmp_path):
    _full_run(tmp_path, LINMU_STAGES, ("--arch", "linmu"))
