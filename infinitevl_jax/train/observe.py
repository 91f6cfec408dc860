"""What a run reports while it trains: a progress bar, TensorBoard scalars and ``metrics.jsonl``.

Per step the loop hands over the step's device metrics (loss, grad_norm, learning_rate,
normalizer) and the batch's token counts; they are fetched from the device only every
``log_every`` steps (one sync per interval, so logging never stalls the pipeline), then

    metrics.jsonl       one JSON line per step: step, loss, grad_norm, learning_rate,
                        normalizer, tokens (non-padding), seconds (the interval's mean step time)
    tensorboard/        the same scalars plus tokens_per_second and mfu (tensorboardX event file)
    progress bar        loss, tokens/s and MFU of the last interval

Throughput: tokens/s counts non-padding tokens; MFU = model FLOPs of the interval's padded
tokens (``flops.train_flops_per_token`` x B x T) / (seconds x devices x peak FLOP/s), shown when
the peak is known (``run.peak_flops_per_device`` or the device kind). Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunReporter:
    """Collects per-step metrics and reports them every ``log_every`` steps (module docstring)."""

    def __init__(self, run_dir: str, *, first_step: int, last_step: int, log_every: int,
                 flops_per_token: float | None, peak_flops: float | None, num_devices: int,
                 tensorboard: bool = True, progress: bool = True, desc: str = "train"):
        if log_every < 1:
            raise ValueError(f"run.log_every must be >= 1; got {log_every}")
        self.log_every, self.flops_per_token, self.num_devices = log_every, flops_per_token, num_devices
        self.peak_flops = peak_flops
        self.writer = jax.process_index() == 0
        self._pending: list[tuple[int, Mapping, int, int]] = []
        self._clock = time.perf_counter()
        self._metrics = open(os.path.join(run_dir, METRICS_FILE), "a") if self.writer else None
        self._board = None
        if tensorboard and self.writer:
            from tensorboardX import SummaryWriter
            self._board = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR))
        self._bar = tqdm(total=last_step, initial=first_step, desc=desc, unit="step", file=sys.stdout,
                         disable=not (progress and self.writer), dynamic_ncols=True)
        self.last: dict | None = None

    def add(self, step: int, metrics: Mapping, real_tokens: int, padded_tokens: int) -> None:
        """Records the metrics of optimiser step ``step`` (1-based: the update just made)."""
        self._pending.append((step, metrics, real_tokens, padded_tokens))
        if len(self._pending) >= self.log_every:
            self.flush()

    def restart_clock(self) -> None:
        """Excludes the time since the last report (compilation, a checkpoint wait) from the next interval."""
        self._clock = time.perf_counter()

    def flush(self) -> None:
        """Fetches the pending metrics and reports them."""
        if not self._pending:
            return
        fetched = jax.device_get([m for _, m, _, _ in self._pending])
        now = time.perf_counter()
        seconds = (now - self._clock) / len(self._pending)
        self._clock = now
        real = sum(r for _, _, r, _ in self._pending)
        padded = sum(p for _, _, _, p in self._pending)
        elapsed = seconds * len(self._pending)
        tokens_per_second = real / elapsed if elapsed > 0 else float("nan")
        mfu = None
        if self.flops_per_token and self.peak_flops and elapsed > 0:
            mfu = self.flops_per_token * padded / elapsed / (self.num_devices * self.peak_flops)
        for (step, _, tokens, _), values in zip(self._pending, fetched):
            record = {"step": step, **{k: float(np.asarray(v)) for k, v in values.items()},
                      "tokens": tokens, "seconds": seconds}
            if self._metrics:
                self._metrics.write(json.dumps(record) + "\n")
            if self._board:
                for key in ("loss", "grad_norm", "learning_rate"):
                    self._board.add_scalar(f"train/{key}", record[key], step)
            self.last = record
        step = self._pending[-1][0]
        if self._board:
            self._board.add_scalar("perf/tokens_per_second", tokens_per_second, step)
            if mfu is not None:
                self._board.add_scalar("perf/mfu", mfu, step)
        if self._metrics:
            self._metrics.flush()
        postfix = {"loss": f"{self.last['loss']:.4f}", "tok/s": f"{tokens_per_second:,.0f}"}
        if mfu is not None:
            postfix["mfu"] = f"{100 * mfu:.1f}%"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)
        self._pending.clear()

    def message(self, text: str) -> None:
        """A line printed above the progress bar (process 0)."""
        if self.writer:
            self._bar.write(text, file=sys.stdout)

    def close(self) -> None:
        self.flush()
        self._bar.close()
        if self._metrics:
            self._metrics.close()
        if self._board:
            self._board.close()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` by step. A resumed run appends to the file and
    repeats the steps after its last checkpoint; the latest record of each step is kept."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        records = {r["step"]: r for r in map(json.loads, filter(str.strip, f))}
    return [records[s] for s in sorted(records)]
