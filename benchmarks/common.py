"""Shared benchmark plumbing: wall-clock medians of jitted calls, a printed table, JSON output, and
one worker process per model (its own device-memory peak)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


def device_memory_bytes(stat: str) -> int | None:
    """One of the first device's ``memory_stats()`` (e.g. ``peak_bytes_in_use``); None where the
    backend keeps none (CPU)."""
    return (jax.devices()[0].memory_stats() or {}).get(stat)


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


def run_worker_process(module: str, kind: str, worker_args: list[str], env: dict | None = None) -> dict:
    """Runs ``python -m module --worker kind --worker-out FILE *worker_args`` in a fresh process
    (its own memory peak, no leftovers; the device may use 95% of its memory unless
    ``XLA_PYTHON_CLIENT_MEM_FRACTION`` says otherwise; ``env`` adds variables) and returns the JSON
    it wrote, with ``process_s`` (the process's wall time) added. A failing worker raises."""
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"),
           **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, f"{kind}.json")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", module, "--worker", kind, "--worker-out", out, *worker_args],
                       check=True, env=env)
        with open(out) as f:
            result = json.load(f)
    result["process_s"] = time.perf_counter() - start
    return result


def model_worker_args(parser, argv, models, smoke_settings: dict):
    """Parses the command line of a benchmark that runs one process per model (``--worker KIND
    --worker-out FILE`` are added here, hidden); ``--smoke`` applies ``smoke_settings``."""
    parser.add_argument("--worker", choices=list(models), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in smoke_settings.items():
            setattr(args, name, value)
    return args


def run_if_worker(args, worker) -> bool:
    """In ``--worker`` mode: runs ``worker(args)``, writes its JSON to ``--worker-out``, returns True."""
    if not args.worker:
        return False
    result = worker(args)
    with open(args.worker_out, "w") as f:
        json.dump(result, f)
    return True


def add_out_argument(parser, name: str) -> None:
    """``--out FILE``: the JSON output (default ``benchmarks/results/{name}.json``; ``--smoke``: a temporary file)."""
    parser.add_argument("--out", default=None, help=f"JSON output (default benchmarks/results/{name}.json; "
                                                    "--smoke: a temporary file)")


def out_path(args, name: str) -> str:
    """Where ``add_out_argument``'s JSON goes for these parsed ``args`` (they have ``out`` and ``smoke``)."""
    if args.out:
        return args.out
    return os.path.join(tempfile.gettempdir(), f"{name}_smoke.json") if args.smoke else f"benchmarks/results/{name}.json"


def announce_device(smoke: bool) -> str:
    """``require_gpu(smoke)``, then prints and returns ``device_description()``."""
    require_gpu(smoke)
    device = device_description()
    print(f"device: {device}")
    return device


def require_gpu(smoke: bool) -> None:
    """Exits with a clear message unless on a GPU (or in ``--smoke`` mode)."""
    if not smoke and jax.default_backend() != "gpu":
        raise SystemExit(f"error: this benchmark needs a GPU (backend is {jax.default_backend()!r}); "
                         "use --smoke for a CPU run of the tiny presets")


def is_oom(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def rows_until_oom(kind: str, contexts, measure) -> list[dict]:
    """``dict(model=kind, **measure(context))`` per context in order (progress on stderr); out of
    memory is recorded as a row and ends the list; any other error re-raises."""
    rows = []
    for context in contexts:
        print(f"[{kind}] context {context} ...", file=sys.stderr, flush=True)
        try:
            rows.append(dict(model=kind, **measure(context)))
        except Exception as error:  # noqa: BLE001 -- only out-of-memory is expected; anything else re-raises
            if not is_oom(error):
                raise
            rows.append(dict(model=kind, context=context, oom=True, error=str(error).splitlines()[0][:300]))
            gc.collect()
            break
        print(f"[{kind}] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows
