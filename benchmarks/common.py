"""Shared benchmark plumbing: wall-clock medians of jitted calls, a printed table, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax


def median_ms(fn, *args, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time in ms of ``fn(*args)`` (outputs blocked on), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} ({platform.processor() or platform.machine()}, jax {jax.__version__})"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(_fmt(r[c]).ljust(w) for c, w in zip(columns, widths)))


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_json(path: str, payload: dict) -> None:
    """Writes atomically (temporary file, then rename): never a half-written result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path}")
