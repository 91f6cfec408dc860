"""The training loop: checkpoints, a resume after SIGKILL and after SIGTERM continuing with the
identical loss sequence, a restore onto another mesh, the run directory's files, clear errors.

The runs are small (the tiny decoder without its vision tower, 8 rows of 64 tokens of text
conversations, 8 simulated devices) and the subprocess runs use the real ``infinitevl train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from infinitevl_jax.config import load_config
from infinitevl_jax.convert.pretrained import load_pretrained, save_run
from infinitevl_jax.models.config import VisionLanguageConfig
from infinitevl_jax.models.vlm import VisionLanguageModel
from infinitevl_jax.train import checkpoint as ckpt
from infinitevl_jax.train import loop
from infinitevl_jax.train.loop import train
from infinitevl_jax.train.step import stage_defaults
from infinitevl_jax.train.observe import TENSORBOARD_DIR, read_metrics

STEPS = 24
WORDS = ("red", "green", "blue", "circle", "square", "triangle", "yes", "no", "left", "right")


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> str:
    """64 short question / answer conversations as a LLaVA JSONL file."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(64):
            question = " ".join(rng.choice(WORDS, 3))
            f.write(json.dumps({"id": i, "conversations": [{"from": "human", "value": f"{question}?"},
                                                           {"from": "gpt", "value": str(rng.choice(WORDS))}]}) + "\n")
    return str(path)


def config_file(tmp_path, conversations: str, **fields) -> str:
    """A config .py for ``infinitevl train``: the tiny decoder (no vision), SFT of everything."""
    changes = "\n".join(f"    c.{k} = {v!r}" for k, v in fields.items())
    path = tmp_path / "stage.py"
    path.write_text(f'''from infinitevl_jax.train.run_config import run_config


def get_config():
    c = run_config("sft", "tiny")
    c.vision = None
    c.train.trainable = ("all",)
    c.train.dtype = "float32"
    c.train.optim.total_steps = {STEPS}
    c.train.optim.learning_rate = 3e-3
    c.train.optim.warmup_steps = 1
    c.data.source = "llava"
    c.data.path = {conversations!r}
    c.data.seq_len = 64
    c.data.batch_size = 8
    c.data.read_threads = 1
    c.run.save_every = 4
    c.run.keep = 2
    c.run.log_every = 1
{changes}
    return c
''')
    return str(path)


def losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, conversations):
    """An uninterrupted run: (its config file, run dir)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    path = config_file(folder, conversations)
    result = train(load_config(path), str(folder / "run"), progress=False)
    assert result.step == STEPS and not result.preempted
    return path, str(folder / "run")


def _wait_for(predicate, process, what: str, timeout: float = 240.0):
    start = time.monotonic()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before {what}:\n{process.stdout.read()}")
        if time.monotonic() - start > timeout:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _start(config: str, run_dir: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "infinitevl_jax.cli", "train", "--config", config, "--run-dir",
                             run_dir, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_sigkill_and_sigterm_continues_bit_identically(uninterrupted, tmp_path, conversations):
    _, reference_dir = uninterrupted
    run_dir = str(tmp_path / "run")
    config = config_file(tmp_path, conversations)
    checkpoints = os.path.join(run_dir, ckpt.CHECKPOINTS)

    def saved_steps():
        return sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) if os.path.isdir(checkpoints) else []

    # 1. SIGTERM once step 4 is saved: the run saves the step it is at and exits cleanly
    process = _start(config, run_dir)
    _wait_for(lambda: 4 in saved_steps(), process, "the step-4 checkpoint")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    assert "stopped by a signal" in output
    stopped = saved_steps()[-1]
    assert 4 <= stopped < STEPS

    # 2. killed without warning once a later step is saved: the next start resumes from there
    process = _start(config, run_dir)
    _wait_for(lambda: saved_steps()[-1] > stopped, process, "a later checkpoint")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert f"resumed from step {stopped}" in process.stdout.read()

    # 3. resumed to the end in this process
    result = train(load_config(config), run_dir, progress=False)
    assert result.step == STEPS
    assert losses(run_dir) == losses(reference_dir)  # bit-identical, step by step
    assert len(losses(run_dir)) == STEPS
    # the last checkpoint holds the same weights as the uninterrupted run's
    a, b = load_pretrained(run_dir), load_pretrained(reference_dir)
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_another_mesh(uninterrupted, tmp_path, conversations):
    _, reference_dir = uninterrupted
    run_dir = str(tmp_path / "run")
    config = load_config(config_file(tmp_path, conversations))
    config.run.num_steps = 3
    assert train(config, run_dir, progress=False).step == 3  # the last step is always saved
    # the same run continued on (data 2, fsdp 2, tensor 2) instead of (fsdp 8)
    config = load_config(config_file(tmp_path, conversations))
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    assert train(config, run_dir, progress=False).step == STEPS
    ours, reference = losses(run_dir), losses(reference_dir)
    assert ours[:3] == reference[:3]
    np.testing.assert_allclose(ours[3:], reference[3:], rtol=2e-5)


def _tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the tfevents files under ``folder``, read record by record (length, crc, Event)."""
    from tensorboardX.proto import event_pb2

    scalars: dict = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_run_directory_holds_config_metrics_tensorboard_and_checkpoints(uninterrupted):
    config_path, run_dir = uninterrupted
    saved = ckpt.read_run_config(run_dir)
    assert saved.train.stage == "sft" and saved.model.hidden_size == 64 and saved.vision is None
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    scalars = _tensorboard_scalars(os.path.join(run_dir, TENSORBOARD_DIR))
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in records], rtol=1e-6)
    assert "perf/tokens_per_second" in scalars
    assert sorted(int(s) for s in os.listdir(os.path.join(run_dir, ckpt.CHECKPOINTS))) == [STEPS - 4, STEPS]  # keep 2
    assert os.path.isfile(config_path)


def test_resuming_with_another_model_or_stage_is_a_clear_error(uninterrupted, conversations, tmp_path):
    _, run_dir = uninterrupted
    config = load_config(config_file(tmp_path, conversations))
    config.model.intermediate_size = 256
    with pytest.raises(ValueError, match="model config differs"):
        train(config, run_dir, progress=False)
    config = load_config(config_file(tmp_path, conversations))
    config.train.optim.learning_rate = 1.0
    with pytest.raises(ValueError, match="train config differs"):
        train(config, run_dir, progress=False)


def test_bad_run_settings_are_clear_errors(tmp_path, conversations):
    config = load_config(config_file(tmp_path, conversations))
    config.run.num_steps = STEPS + 1
    with pytest.raises(ValueError, match="run.num_steps"):
        train(config, str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="mount it on every host"):
        train(load_config(config_file(tmp_path, conversations)), "gs://bucket/run", progress=False)
    config = load_config(config_file(tmp_path, conversations))
    config.train.loss = "logit_kl"
    with pytest.raises(ValueError, match="teacher.checkpoint"):
        train(config, str(tmp_path / "b"), progress=False)


def test_a_student_of_its_own_teacher_reads_the_checkpoint_once(tmp_path, conversations, monkeypatch):
    teacher_cfg = VisionLanguageConfig.from_config(load_config("tiny"))
    teacher_cfg = dataclasses.replace(teacher_cfg, vision=None, decoder=dataclasses.replace(
        teacher_cfg.decoder, layer_types=("full_attention",) * 8))
    save_run(VisionLanguageModel(teacher_cfg, rngs=nnx.Rngs(0)), str(tmp_path / "teacher"))
    reads = []
    monkeypatch.setattr(loop, "load_pretrained", lambda path, **kw: reads.append(path) or load_pretrained(path, **kw))
    config = load_config(config_file(tmp_path, conversations))
    config.train = stage_defaults("distill_e2e")
    config.train.dtype = "float32"
    config.init.checkpoint = str(tmp_path / "teacher")
    config.init.student.enabled = True
    config.init.student.sliding_window = 16
    config.run.num_steps = 1
    assert loop.train(config, str(tmp_path / "student"), progress=False).step == 1
    assert reads == [str(tmp_path / "teacher")]  # the teacher is the student's source
    config.train.param_dtype = "bfloat16"  # the source must match the student's master weights: a second read
    assert loop.train(config, str(tmp_path / "student_bf16"), progress=False).step == 1
    assert reads[1:] == [str(tmp_path / "teacher")] * 2
