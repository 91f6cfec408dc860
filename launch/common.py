"""Shared pieces of the launchers in this folder (tpu_pod.py, gpu_slurm.py, gpu_ssh.py).

What lives here, so that no launcher copies another:
- the training command every worker runs (`infinitevl train ...`) and the parsing of its
  `--config.a.b=value` overrides;
- shell quoting (`shlex.join`) and the small shell scripts the launchers send to remote hosts;
- a `Runner` that either prints commands (`--dry-run`) or runs them;
- streaming of several child processes' output with a prefix per process, optional per-process
  log files, and forwarding of Ctrl-C to a "stop" action instead of killing the children.

This folder is not part of the installed package and imports nothing from it (nor jax): a
launcher runs on a laptop or a login node that only has Python 3.10+ and gcloud / ssh / slurm.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

REPO_ROOT = Path(__file__).resolve().parent.parent

# The trainer writes its pid here (relative to the remote working directory) so that a stop
# can send SIGTERM to exactly that process; `exec` makes the shell's pid the trainer's pid.
PID_FILE = ".infinitevl_train.pid"

_OVERRIDE = re.compile(r"^--config\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(Exception):
    """A user-facing error: bad arguments or a failed step. `main` prints it and exits 2."""


# --------------------------------------------------------------------------- training command


@dataclass(frozen=True)
class TrainSpec:
    """What every worker trains: the parts of `infinitevl train` the user chooses.

    `overrides` are complete `--config.a.b=value` tokens, kept in the order given.
    """

    config: str
    run_dir: str
    overrides: tuple[str, ...] = ()
    executable: str = "infinitevl"


def add_train_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """Adds --config, --run-dir and --train-executable; overrides are taken by `split_overrides`.

    With `required=False` argparse accepts their absence and `train_spec` reports it instead
    (for launchers with a mode that trains nothing, such as gpu_ssh.py --stop).
    """
    group = parser.add_argument_group(
        "training command",
        "Every worker runs `infinitevl train --config CONFIG --run-dir RUN_DIR ...`. Config "
        "overrides are passed through as they are: add any number of `--config.a.b=value` "
        "arguments (one shell word each, `=` required; quote values with spaces).",
    )
    group.add_argument("--config", required=required, metavar="CONFIG",
                       help="config preset name (e.g. infinitevl_4b) or path to a config .py file, "
                            "as seen from the workers")
    group.add_argument("--run-dir", required=required, metavar="RUN_DIR",
                       help="run directory (config, metrics, checkpoints): a path every host shares (a bucket "
                            "mounted with gcsfuse at the same path on every TPU worker, NFS on GPU clusters)")
    group.add_argument("--train-executable", default="infinitevl", metavar="CMD",
                       help="the command that provides `train` on the workers (default: %(default)s)")


def split_overrides(extra: Sequence[str]) -> tuple[str, ...]:
    """Checks the arguments argparse did not recognise: each must be `--config.a.b=value`.

    Raises LaunchError naming the first offending argument, so a typo such as `--zon=x` is
    reported instead of being forwarded to the trainer.
    """
    bad = [token for token in extra if not _OVERRIDE.match(token)]
    if bad:
        raise LaunchError(
            f"unrecognised argument {bad[0]!r}: the only pass-through arguments are config "
            "overrides written as one word, --config.a.b=value")
    return tuple(extra)


def train_spec(args: argparse.Namespace, extra: Sequence[str]) -> TrainSpec:
    """Builds the TrainSpec from parsed arguments plus the leftover override tokens."""
    if args.config is None or not args.config.strip():
        raise LaunchError("--config is required and must not be empty")
    if args.run_dir is None or not args.run_dir.strip():
        raise LaunchError("--run-dir is required and must not be empty")
    return TrainSpec(args.config, args.run_dir, split_overrides(extra), args.train_executable)


def train_argv(spec: TrainSpec, *, distributed: bool = False, coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> list[str]:
    """The argv of one worker's training process.

    `distributed=True` gives `--distributed` (jax.distributed.initialize() auto-detects TPU
    pods and SLURM); the three explicit values give the manual form used over plain ssh.
    """
    argv = [spec.executable, "train", "--config", spec.config, "--run-dir", spec.run_dir]
    explicit = (coordinator_address, num_processes, process_id)
    if distributed and any(v is not None for v in explicit):
        raise ValueError("use either distributed=True or the explicit coordinator values, not both")
    if distributed:
        argv.append("--distributed")
    elif any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("coordinator_address, num_processes and process_id go together")
        argv += ["--coordinator-address", coordinator_address,
                 "--num-processes", str(num_processes), "--process-id", str(process_id)]
    return argv + list(spec.overrides)


# --------------------------------------------------------------------------- shell helpers


def join(argv: Sequence[str]) -> str:
    """One command line with POSIX shell quoting (`shlex.join`)."""
    return shlex.join([str(a) for a in argv])


def parse_env(items: Iterable[str]) -> list[tuple[str, str]]:
    """`KEY=VALUE` strings -> pairs, in order; LaunchError for a malformed one."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise LaunchError(f"--env expects KEY=VALUE with a shell variable name, got {item!r}")
        pairs.append((key, value))
    return pairs


def env_exports(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """`export KEY=VALUE` lines, values quoted."""
    return [f"export {key}={shlex.quote(value)}" for key, value in pairs]


def remote_train_script(argv: Sequence[str], *, workdir: str | None = None,
                        setup: Sequence[str] = (), env: Sequence[tuple[str, str]] = (),
                        path_prepend: str | None = None, pid_file: str = PID_FILE) -> str:
    """The shell command a remote host runs to start training.

    Steps joined with `&&` (a failing step stops the chain): `cd` into the working directory,
    the user's setup lines verbatim (e.g. activating a virtualenv), environment exports, the pid
    file, then `exec` of the trainer, so the pid file holds the trainer's own pid and SIGTERM
    reaches it directly. `path_prepend` is put in front of PATH with `$HOME` left to the remote
    shell (for `pip install --user` scripts in ~/.local/bin).
    """
    steps = []
    if workdir:
        steps.append(f"cd {shlex.quote(workdir)}")
    steps.extend(setup)
    if path_prepend:
        steps.append(f'export PATH="{path_prepend}:$PATH"')
    steps.extend(env_exports(env))
    steps.append(f"echo $$ > {shlex.quote(pid_file)}")
    steps.append("exec " + join(argv))
    return " && ".join(steps)


def remote_stop_script(*, workdir: str | None = None, pid_file: str = PID_FILE) -> str:
    """The shell command that sends SIGTERM to the trainer recorded in the pid file.

    It succeeds when there is nothing to stop (no pid file, or the process already exited), so
    that a stop of all workers is not reported as failed because one worker had finished.
    """
    path = shlex.quote(pid_file if not workdir else f"{workdir.rstrip('/')}/{pid_file}")
    return (f'if [ -f {path} ]; then pid="$(cat {path})"; '
            f'if kill -TERM "$pid" 2>/dev/null; then echo "sent SIGTERM to trainer $pid on $(hostname)"; '
            f'else echo "no running trainer on $(hostname)"; fi; '
            f'else echo "no trainer pid file on $(hostname)"; fi')


# --------------------------------------------------------------------------- running commands


@dataclass
class Runner:
    """Runs commands, or with `dry_run` prints them (one `shlex.join` line each) and runs nothing.

    Dry-run output: a line starting with `# ` is a note; every other line is a command exactly as
    it would be executed. `out` is where both go (stdout by default).
    """

    dry_run: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)

    def note(self, text: str) -> None:
        """A comment line; printed in dry runs and while running."""
        print(f"# {text}", file=self.out, flush=True)

    def show(self, argv: Sequence[str]) -> None:
        """Prints a command line: bare in dry runs, after `+ ` when it is really run."""
        prefix = "" if self.dry_run else "+ "
        print(prefix + join(argv), file=self.out, flush=True)

    def run(self, argv: Sequence[str], *, check: bool = True) -> int:
        """Runs a command to completion with inherited stdio; returns its exit status."""
        self.show(argv)
        if self.dry_run:
            return 0
        code = _call(argv)
        if check and code != 0:
            raise LaunchError(f"command failed with exit status {code}: {join(argv)}")
        return code

    def query(self, argv: Sequence[str], *, echo: bool = True) -> tuple[int, str]:
        """Runs a read-only command and returns (status, stripped stdout).

        Dry runs print it and return (1, ''), i.e. "not found". Its stderr goes to the terminal;
        `echo=False` prints neither the command nor its stderr (for polling loops).
        """
        if echo or self.dry_run:
            self.show(argv)
        if self.dry_run:
            return 1, ""
        try:
            proc = subprocess.run(list(argv), stdout=subprocess.PIPE, text=True,
                                  stderr=None if echo else subprocess.DEVNULL)
        except FileNotFoundError as exc:
            raise LaunchError(f"{argv[0]!r} not found on PATH") from exc
        return proc.returncode, proc.stdout.strip()


def _call(argv: Sequence[str]) -> int:
    try:
        return subprocess.call(list(argv))
    except FileNotFoundError as exc:
        raise LaunchError(f"{argv[0]!r} not found on PATH") from exc


# --------------------------------------------------------------------------- streaming


class Interrupts:
    """Turns Ctrl-C into a clean stop while child processes run.

    The children are started in their own sessions (see `stream`), so the terminal's SIGINT
    reaches only this process. The first Ctrl-C calls `on_first` (which asks the remote
    trainers to save and exit); a second one calls `on_second` (kill the local children).
    SIGTERM sent to the launcher is treated like the first Ctrl-C.
    """

    def __init__(self, on_first: Callable[[], None], on_second: Callable[[], None]):
        self._on_first, self._on_second = on_first, on_second
        self.count = 0
        self._saved: dict[int, object] = {}
        self._deferring = False

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.count += 1
        if not self._deferring:
            self._act(self.count)

    def _act(self, count: int) -> None:
        if count == 1:
            print("\n# stop requested: asking every trainer to save a checkpoint and exit "
                  "(Ctrl-C again to kill the local processes)", file=sys.stderr, flush=True)
            threading.Thread(target=self._on_first, daemon=True).start()
        else:
            print("\n# second interrupt: terminating the local processes", file=sys.stderr, flush=True)
            self._on_second()

    @contextlib.contextmanager
    def deferred(self):
        """Signals inside are counted but acted on only when the block ends (while the children
        are being started: a stop must reach every one of them, not only those already up)."""
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
            for count in range(1, min(self.count, 2) + 1):
                self._act(count)

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _pump(label: str, stream: TextIO, sink: TextIO, log: TextIO | None, lock: threading.Lock) -> None:
    prefix = f"[{label}] " if label else ""
    for line in iter(stream.readline, ""):
        with lock:
            sink.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            sink.flush()
        if log is not None:
            log.write(line)
            log.flush()
    stream.close()


def stream(commands: Sequence[tuple[str, Sequence[str]]], *, log_dir: str | None = None,
           on_interrupt: Callable[[], None] | None = None, stop_timeout: float = 600.0,
           sink: TextIO | None = None) -> list[int]:
    """Runs the commands in parallel, prefixing each output line with `[label] `; returns exit codes.

    - stdout and stderr of each command are merged and streamed line by line;
    - with `log_dir`, each command's raw output is also written to `log_dir/<label>.log`;
    - Ctrl-C runs `on_interrupt` once (it should make the remote processes exit cleanly), then
      waits up to `stop_timeout` seconds for the commands to end before terminating them; a
      second Ctrl-C terminates them at once.
    """
    sink = sink or sys.stdout
    lock = threading.Lock()
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    logs: list[TextIO] = []

    def kill_all() -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    interrupts = Interrupts(on_interrupt or kill_all, kill_all)
    try:
        with interrupts:  # from the first start on: a Ctrl-C while starting is a clean stop too
            with interrupts.deferred():
                for label, argv in commands:
                    try:
                        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                                start_new_session=True)
                    except FileNotFoundError as exc:
                        kill_all()
                        raise LaunchError(f"{argv[0]!r} not found on PATH") from exc
                    procs.append(proc)
                    log = None
                    if log_dir:
                        safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", label) or "output"
                        log = open(os.path.join(log_dir, f"{safe}.log"), "a", encoding="utf-8")
                        logs.append(log)
                    thread = threading.Thread(target=_pump, args=(label, proc.stdout, sink, log, lock), daemon=True)
                    thread.start()
                    threads.append(thread)
            deadline = None
            while any(proc.poll() is None for proc in procs):
                if interrupts.count == 1 and deadline is None:
                    deadline = time.monotonic() + stop_timeout
                if deadline is not None and time.monotonic() > deadline:
                    print(f"# processes still running {stop_timeout:.0f}s after the stop: terminating them",
                          file=sys.stderr, flush=True)
                    kill_all()
                    deadline = float("inf")
                time.sleep(0.2)
        for thread in threads:
            thread.join(timeout=5)
        return [proc.returncode for proc in procs]
    finally:
        for log in logs:
            log.close()


def follow_directory(directory: str, stop: threading.Event, sink: TextIO | None = None,
                     interval: float = 1.0) -> None:
    """Prints lines appended to the files of `directory` as `[file-stem] line` until `stop` is set.

    For tools that write one log file per worker instead of printing (gcloud's
    `--output-directory`); new files are picked up as they appear.
    """
    sink = sink or sys.stdout
    offsets: dict[str, int] = {}
    pending: dict[str, str] = {}
    while True:
        finished = stop.is_set()
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        for name in names:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                continue
            with open(path, "r", encoding="utf-8", errors="replace") as handle:
                handle.seek(offsets.get(name, 0))
                chunk = handle.read()
                offsets[name] = handle.tell()
            text = pending.pop(name, "") + chunk
            lines = text.split("\n")
            if not finished:
                pending[name] = lines.pop()  # keep a partial last line for the next round
            stem = Path(name).stem
            for line in lines:
                if line or not finished:
                    sink.write(f"[{stem}] {line}\n")
            sink.flush()
        if finished:
            return
        stop.wait(interval)


# --------------------------------------------------------------------------- source tarball


def source_files(root: Path = REPO_ROOT) -> list[str]:
    """Files to ship: git's tracked and untracked-but-not-ignored files (falls back to a walk)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             check=True).stdout
        files = [f for f in out.decode().split("\0") if f and (root / f).is_file()]
        if files:
            return sorted(set(files))
    except (OSError, subprocess.CalledProcessError):
        pass
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def make_source_tarball(out_path: str, root: Path = REPO_ROOT) -> int:
    """Writes a .tar.gz of the repository's source files; returns the number of files."""
    files = source_files(root)
    with tarfile.open(out_path, "w:gz") as tar:
        for name in files:
            tar.add(root / name, arcname=name, recursive=False)
    return len(files)


# --------------------------------------------------------------------------- argument helpers


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port 1..65535."""
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def run_main(body: Callable[[], int]) -> int:
    """Calls a launcher's body, printing a LaunchError as `error: ...` and returning 2."""
    try:
        return body()
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
