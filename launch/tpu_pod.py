#!/usr/bin/env python3
"""Train infinitevl_jax on a Cloud TPU slice (or several, multislice) with gcloud.

Subcommands (each prints every gcloud command it runs; `--dry-run` prints them and runs nothing):

  up       create the slice, or reuse it if it exists, then install the package on every worker
  install  copy this checkout (or clone --repo at --ref) to every worker and `pip install` it
  run      start `infinitevl train ... --distributed` on every worker and stream the output;
           Ctrl-C sends SIGTERM to the trainers (they save a checkpoint and exit)
  stop     send SIGTERM to the trainers (from another terminal, or after the launcher died)
  down     delete the slice (with --queued or --num-slices > 1: the queued resource and its nodes)
  launch   up + run; with --delete-on-exit the slice is deleted when training ends

Plain slices use `gcloud compute tpus tpu-vm create/describe/scp/ssh/delete`. With `--queued` the
slice is requested through `gcloud compute tpus queued-resources create` (waits in a queue for
capacity; `--spot`, `--reserved`, `--best-effort`, `--valid-until-duration`) and the launcher waits
until the request is ACTIVE. `--num-slices N` (N >= 2) asks for N slices in one queued resource
(`--node-count`, `--node-prefix`, nodes PREFIX-0 ... PREFIX-N-1) and talks to all of them through
`gcloud compute tpus queued-resources scp/ssh --node=all --worker=all`; the TPU runtime sets the
MEGASCALE_* environment on every worker, and `jax.distributed.initialize()` reads it.

Example:
  python launch/tpu_pod.py launch --name ivl-v5e --zone us-west4-a --accelerator-type v5litepod-16 \\
      --config distill_layerwise --run-dir /gcs/my-bucket/runs/stage1 --config.train.optim.learning_rate=1e-4
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the launch/ folder is not a package)
from common import LaunchError, Runner  # noqa: E402

# Software versions for JAX per TPU generation, from Cloud TPU's "TPU software versions" page.
RUNTIME_VERSIONS = (
    ("v6e", "v2-alpha-tpuv6e"),
    ("v5p", "v2-alpha-tpuv5"),
    ("v5litepod", "v2-alpha-tpuv5-lite"),
    ("v5e", "v2-alpha-tpuv5-lite"),
    ("v4", "tpu-ubuntu2204-base"),
    ("v3", "tpu-ubuntu2204-base"),
    ("v2", "tpu-ubuntu2204-base"),
)

SOURCE_ARCHIVE = "infinitevl_src.tar.gz"  # name of the uploaded tarball in each worker's home
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z0-9]+$")
_ACCELERATOR = re.compile(r"^v[0-9]+[a-z]*-[0-9]+$")
_QUEUE_FAILED = {"FAILED", "SUSPENDED", "SUSPENDING"}


def default_runtime_version(accelerator_type: str) -> str:
    """The JAX software version for an accelerator type such as v5litepod-16 or v6e-8."""
    family = accelerator_type.split("-", 1)[0]
    for prefix, version in RUNTIME_VERSIONS:
        if family == prefix:
            return version
    raise LaunchError(f"no default runtime version for {accelerator_type!r}: pass --runtime-version")


@dataclass(frozen=True)
class Slice:
    """Where the workers are, and how gcloud addresses them.

    `queued` means the slice belongs to a queued resource called `name`; with `num_slices > 1`
    there are several nodes (`node_prefix`-0, -1, ...) and every ssh/scp goes through the queued
    resource. A single queued slice's node is also called `name`, so it is reached like a plain
    slice.
    """

    name: str
    zone: str
    project: str | None = None
    queued: bool = False
    num_slices: int = 1
    node_prefix: str | None = None
    internal_ip: bool = False
    ssh_batch_size: int = 256

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    def scope(self) -> list[str]:
        """Zone and project flags, appended to every gcloud command."""
        flags = [f"--zone={self.zone}"]
        if self.project:
            flags.append(f"--project={self.project}")
        return flags

    def describe(self) -> list[str]:
        """The read-only command that tells whether the slice (or queued resource) exists."""
        if self.queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name,
                    *self.scope(), "--format=value(state.state)"]
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self.scope(),
                "--format=value(state)"]

    def delete(self) -> list[str]:
        """Deletes the slice; for a queued resource `--force` deletes its nodes first."""
        if self.queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self.scope(),
                    "--force", "--quiet"]
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self.scope(), "--quiet"]

    def _transport(self, verb: str) -> list[str]:
        if self.multislice:
            return ["gcloud", "compute", "tpus", "queued-resources", verb]
        return ["gcloud", "compute", "tpus", "tpu-vm", verb]

    def _all_workers(self) -> list[str]:
        flags = ["--node=all", "--worker=all"] if self.multislice else ["--worker=all"]
        if self.internal_ip:
            flags.append("--internal-ip")
        return flags

    def scp(self, local: str, remote: str) -> list[str]:
        """Copies a local file to `remote` (relative to the home directory) on every worker."""
        return [*self._transport("scp"), local, f"{self.name}:{remote}", *self.scope(), *self._all_workers()]

    def ssh(self, command: str, *, output_directory: str | None = None) -> list[str]:
        """Runs a shell command on every worker at once (all of them concurrently)."""
        argv = [*self._transport("ssh"), self.name, *self.scope(), *self._all_workers()]
        if self.multislice:
            # queued-resources ssh runs at most --batch-size sessions at a time; the trainers must
            # all run together, so the batch has to cover every worker of every slice.
            argv.append(f"--batch-size={self.ssh_batch_size}")
        argv.append(f"--command={command}")
        if output_directory:
            argv.append(f"--output-directory={output_directory}")
        return argv


def create_argv(tpu: Slice, args: argparse.Namespace) -> list[str]:
    """The gcloud command that creates the slice (plain) or requests it (queued)."""
    version = args.runtime_version or default_runtime_version(args.accelerator_type)
    if tpu.queued:
        base = ["gcloud", "alpha"] if args.best_effort else ["gcloud"]
        argv = [*base, "compute", "tpus", "queued-resources", "create", tpu.name, *tpu.scope(),
                f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}"]
        if tpu.multislice:
            argv += [f"--node-count={tpu.num_slices}", f"--node-prefix={tpu.node_prefix or tpu.name}"]
        else:
            argv.append(f"--node-id={tpu.name}")
        if args.spot:
            argv.append("--spot")
        if args.best_effort:
            argv.append("--best-effort")
        if args.reserved:
            argv.append("--reserved")
        if args.valid_until_duration:
            argv.append(f"--valid-until-duration={args.valid_until_duration}")
    else:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "create", tpu.name, *tpu.scope(),
                f"--accelerator-type={args.accelerator_type}", f"--version={version}"]
        if args.spot:
            argv.append("--spot")
        if args.reserved:
            argv.append("--reserved")
    for flag in ("network", "subnetwork", "service_account", "labels"):
        value = getattr(args, flag)
        if value:
            argv.append(f"--{flag.replace('_', '-')}={value}")
    if args.internal_ips:
        argv.append("--internal-ips")
    return argv


# --------------------------------------------------------------------------- remote scripts


def install_script(args: argparse.Namespace) -> str:
    """The shell command each worker runs to unpack (or clone) the source and pip-install it."""
    target = shlex.quote(args.remote_dir)
    pip = f"{shlex.quote(args.python)} -m pip install -e {shlex.quote(f'.[{args.pip_extra}]')}"
    if args.repo:
        steps = [f"rm -rf {target}", f"git clone {shlex.quote(args.repo)} {target}", f"cd {target}"]
        if args.ref:
            steps.append(f"git checkout {shlex.quote(args.ref)}")
    else:
        steps = [f"rm -rf {target}", f"mkdir -p {target}",
                 f"tar -xzf {SOURCE_ARCHIVE} -C {target}", f"rm -f {SOURCE_ARCHIVE}", f"cd {target}"]
    return " && ".join([*steps, pip])


def train_script(args: argparse.Namespace, spec: common.TrainSpec) -> str:
    """The shell command each worker runs to start its training process."""
    argv = common.train_argv(spec, distributed=True)
    return common.remote_train_script(argv, workdir=args.remote_dir, env=common.parse_env(args.env),
                                      path_prepend="$HOME/.local/bin")


# --------------------------------------------------------------------------- steps


def slice_from_args(args: argparse.Namespace) -> Slice:
    """Validates the addressing arguments and builds the Slice."""
    if not _NAME.match(args.name):
        raise LaunchError(f"--name {args.name!r} is not a valid TPU name (lowercase letters, digits and "
                          "hyphens, starting with a letter, at most 63 characters)")
    if not _ZONE.match(args.zone):
        raise LaunchError(f"--zone {args.zone!r} does not look like a zone (e.g. us-central2-b)")
    if args.node_prefix and args.num_slices == 1:
        raise LaunchError("--node-prefix only applies with --num-slices >= 2")
    queued = args.queued or args.num_slices > 1
    return Slice(args.name, args.zone, args.project, queued, args.num_slices, args.node_prefix,
                 args.internal_ip, args.ssh_batch_size)


def check_create_args(args: argparse.Namespace, tpu: Slice) -> None:
    """Errors for creation flags that do not fit together."""
    if not args.accelerator_type:
        raise LaunchError("--accelerator-type is required to create a slice (e.g. v5litepod-16, v6e-8, v4-32)")
    if not _ACCELERATOR.match(args.accelerator_type):
        raise LaunchError(f"--accelerator-type {args.accelerator_type!r} does not look like TYPE-SIZE "
                          "(e.g. v5litepod-16, v6e-8, v5p-32, v4-32)")
    if not args.runtime_version:
        default_runtime_version(args.accelerator_type)  # raises for a generation without a default
    if not tpu.queued:
        for flag, value in (("--best-effort", args.best_effort), ("--valid-until-duration", args.valid_until_duration)):
            if value:
                raise LaunchError(f"{flag} needs a queued resource: add --queued")


def up(runner: Runner, tpu: Slice, args: argparse.Namespace) -> None:
    """Creates the slice unless it exists; for queued resources waits until it is ACTIVE."""
    check_create_args(args, tpu)
    kind = "queued resource" if tpu.queued else "TPU VM slice"
    runner.note(f"{kind} {tpu.name}: reuse it if it exists, otherwise create it")
    code, state = runner.query(tpu.describe())
    if code == 0:
        runner.note(f"{tpu.name} exists (state {state or 'unknown'}): reusing it")
        if state in {"PREEMPTED", "TERMINATED"} | _QUEUE_FAILED:
            raise LaunchError(f"{tpu.name} is {state}: delete it with `down` and create it again")
    else:
        runner.note(f"{tpu.name} not found: creating it" + (" (dry run: assumed)" if runner.dry_run else ""))
        runner.run(create_argv(tpu, args))
    if tpu.queued:
        wait_active(runner, tpu, args.wait_timeout, args.poll_interval)


def wait_active(runner: Runner, tpu: Slice, timeout: float, interval: float) -> None:
    """Polls the queued resource until ACTIVE (its nodes exist); fails on FAILED / SUSPENDED."""
    runner.note(f"waiting for queued resource {tpu.name} to become ACTIVE (polling every {interval:g}s)")
    if runner.dry_run:
        runner.show(tpu.describe())
        return
    start, last = time.monotonic(), None
    while True:
        code, state = runner.query(tpu.describe(), echo=False)
        if code == 0 and state != last:
            runner.note(f"{tpu.name}: {state}")
            last = state
        if state == "ACTIVE":
            return
        if state in _QUEUE_FAILED:
            raise LaunchError(f"queued resource {tpu.name} is {state}; see "
                              f"`gcloud compute tpus queued-resources describe {tpu.name} --zone={tpu.zone}`")
        if timeout and time.monotonic() - start > timeout:
            raise LaunchError(f"queued resource {tpu.name} not ACTIVE after {timeout:g}s (last state {state})")
        time.sleep(interval)


def install(runner: Runner, tpu: Slice, args: argparse.Namespace) -> None:
    """Puts the source on every worker (scp of a tarball, or git clone) and pip-installs it."""
    if args.repo:
        runner.note(f"cloning {args.repo}" + (f" at {args.ref}" if args.ref else "") +
                    f" into ~/{args.remote_dir} on every worker and installing it")
    else:
        archive = os.path.join(tempfile.gettempdir(), f"infinitevl_src_{tpu.name}.tar.gz")
        if runner.dry_run:
            runner.note(f"would pack the source files of {common.REPO_ROOT} into {archive}")
        else:
            count = common.make_source_tarball(archive)
            runner.note(f"packed {count} source files of {common.REPO_ROOT} into {archive}")
        runner.run(tpu.scp(archive, SOURCE_ARCHIVE))
    runner.run(tpu.ssh(install_script(args)))


def stop(runner: Runner, tpu: Slice, args: argparse.Namespace) -> int:
    """Sends SIGTERM to the trainer on every worker (the trainer saves a checkpoint and exits)."""
    runner.note("sending SIGTERM to the trainer on every worker")
    return runner.run(tpu.ssh(common.remote_stop_script(workdir=args.remote_dir)), check=False)


def down(runner: Runner, tpu: Slice) -> int:
    """Deletes the slice or queued resource."""
    runner.note(f"deleting {tpu.name}")
    return runner.run(tpu.delete(), check=False)


def check_run_args(args: argparse.Namespace, spec: common.TrainSpec) -> None:
    """Errors for a run that cannot work, raised before anything is created."""
    if "://" in spec.run_dir:
        raise LaunchError(f"--run-dir {spec.run_dir!r} is a URL: the trainer writes to a file system; mount the "
                          "bucket on every worker (gcsfuse, see launch/README.md) and pass the mounted path")
    if not spec.run_dir.startswith("/") and not args.allow_local_run_dir:
        raise LaunchError(f"--run-dir {spec.run_dir!r} is not an absolute path: every worker must write to the "
                          "same place (a bucket mounted at the same path on every worker, or an NFS mount), "
                          "or pass --allow-local-run-dir")
    common.parse_env(args.env)


def run(runner: Runner, tpu: Slice, args: argparse.Namespace, spec: common.TrainSpec) -> int:
    """Starts training on every worker, streams the output and stops cleanly on Ctrl-C."""
    runner.note(f"starting `{spec.executable} train --distributed` on every worker of {tpu.name}")
    argv = tpu.ssh(train_script(args, spec), output_directory=args.log_dir)
    runner.show(argv)
    if runner.dry_run:
        runner.note("on Ctrl-C the launcher runs:")
        runner.show(tpu.ssh(common.remote_stop_script(workdir=args.remote_dir)))
        return 0
    follower, stop_event = None, threading.Event()
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        follower = threading.Thread(target=common.follow_directory, args=(args.log_dir, stop_event), daemon=True)
        follower.start()
    try:
        codes = common.stream([("", argv)], on_interrupt=lambda: stop(runner, tpu, args),
                              stop_timeout=args.stop_timeout)
    finally:
        stop_event.set()
        if follower is not None:
            follower.join(timeout=10)
    code = codes[0]
    runner.note(f"training command exited with status {code}")
    return code


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subcommand per step, options grouped by what they affect."""
    where = argparse.ArgumentParser(add_help=False)
    g = where.add_argument_group("slice")
    g.add_argument("--name", required=True, help="TPU VM / queued resource name (lowercase, digits, hyphens)")
    g.add_argument("--zone", required=True, help="zone, e.g. us-central2-b (v4), us-west4-a (v5e), "
                                                 "us-east5-a (v5p, v6e); see launch/README.md")
    g.add_argument("--project", help="Google Cloud project (default: gcloud's configured project)")
    g.add_argument("--queued", action="store_true",
                   help="use a queued resource (gcloud compute tpus queued-resources) instead of creating "
                        "the slice directly; implied by --num-slices >= 2")
    g.add_argument("--num-slices", type=common.positive_int, default=1, metavar="N",
                   help="number of slices (multislice over DCN when N >= 2, through a queued resource; "
                        "default: %(default)s)")
    g.add_argument("--node-prefix", help="multislice node name prefix; nodes are PREFIX-0 ... PREFIX-(N-1) "
                                         "(default: --name)")
    g.add_argument("--internal-ip", action="store_true",
                   help="ssh/scp to the workers' internal IPs (launcher runs inside the VPC)")
    g.add_argument("--ssh-batch-size", type=common.positive_int, default=256, metavar="N",
                   help="multislice only: concurrent ssh sessions of queued-resources ssh; must be at least "
                        "the total number of workers (default: %(default)s)")
    g.add_argument("--remote-dir", default="infinitevl_jax", metavar="DIR",
                   help="source directory on each worker, relative to its home (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")

    create = argparse.ArgumentParser(add_help=False)
    c = create.add_argument_group("creating the slice (up, launch)")
    c.add_argument("--accelerator-type", metavar="TYPE", help="e.g. v4-32, v5litepod-16, v5p-8, v6e-8")
    c.add_argument("--runtime-version", metavar="VERSION",
                   help="TPU software version (default by generation: v6e v2-alpha-tpuv6e, v5p "
                        "v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older tpu-ubuntu2204-base)")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, can be preempted at any time")
    mode.add_argument("--reserved", action="store_true", help="use the project's reservation")
    mode.add_argument("--best-effort", action="store_true",
                      help="queued only: best-effort capacity (uses `gcloud alpha`; preemptible)")
    c.add_argument("--valid-until-duration", metavar="DURATION",
                   help="queued only: drop the request if not provisioned within DURATION (e.g. 6h)")
    c.add_argument("--network", help="VPC network (default: gcloud's default network)")
    c.add_argument("--subnetwork", help="VPC subnetwork")
    c.add_argument("--service-account", metavar="EMAIL",
                   help="service account of the workers (needs write access to the run dir's bucket)")
    c.add_argument("--labels", metavar="K=V,...", help="resource labels, e.g. team=vl,run=stage1")
    c.add_argument("--internal-ips", action="store_true", help="create the workers without external IPs")
    c.add_argument("--wait-timeout", type=float, default=0.0, metavar="SECONDS",
                   help="queued: give up waiting for ACTIVE after this long (default: wait forever)")
    c.add_argument("--poll-interval", type=float, default=30.0, metavar="SECONDS",
                   help="queued: seconds between state checks (default: %(default)s)")

    setup = argparse.ArgumentParser(add_help=False)
    s = setup.add_argument_group("installing the package (up, install, launch)")
    s.add_argument("--repo", metavar="URL",
                   help="git clone this repository on the workers instead of copying this checkout")
    s.add_argument("--ref", metavar="REF", help="branch, tag or commit to check out after cloning --repo")
    s.add_argument("--pip-extra", default="tpu", metavar="EXTRA",
                   help="extra of the package to install (default: %(default)s, i.e. pip install -e '.[tpu]')")
    s.add_argument("--python", default="python3", metavar="PY", help="python on the workers (default: %(default)s)")

    skip = argparse.ArgumentParser(add_help=False)
    skip.add_argument("--no-install", action="store_true",
                      help="skip the install step (the workers already have this version)")

    train = argparse.ArgumentParser(add_help=False)
    common.add_train_arguments(train)
    t = train.add_argument_group("running")
    t.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the trainers (repeatable)")
    t.add_argument("--log-dir", metavar="DIR",
                   help="write one log file per worker here (gcloud --output-directory) and stream them "
                        "with a [file] prefix; without it gcloud prints all workers' output as it comes")
    t.add_argument("--stop-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="after Ctrl-C, how long to wait for the trainers to save and exit before the local "
                        "ssh is terminated (default: %(default)s)")
    t.add_argument("--delete-on-exit", action="store_true",
                   help="delete the slice when training ends, fails or is stopped")
    t.add_argument("--allow-local-run-dir", action="store_true",
                   help="accept a relative --run-dir (each worker then writes its own copy: testing only)")

    parser = argparse.ArgumentParser(
        prog="tpu_pod.py", description=__doc__, allow_abbrev=False,
        epilog="Config overrides (--config.a.b=value) go after the other options of run / launch. "
               "See launch/README.md for zones, quotas, buckets and cost.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # allow_abbrev=False: a mistyped option (--zon=...) is an error, not silently taken as another one.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", allow_abbrev=False, parents=[where, create, setup, skip], help="create or reuse the slice, then install")
    sub.add_parser("install", allow_abbrev=False, parents=[where, setup], help="copy/clone the source to every worker and pip install")
    sub.add_parser("run", allow_abbrev=False, parents=[where, train], help="train on every worker; Ctrl-C stops cleanly")
    sub.add_parser("stop", allow_abbrev=False, parents=[where], help="SIGTERM the trainers (they save a checkpoint first)")
    sub.add_parser("down", allow_abbrev=False, parents=[where], help="delete the slice / queued resource")
    sub.add_parser("launch", allow_abbrev=False, parents=[where, create, setup, skip, train], help="up + run (+ down with --delete-on-exit)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)

    def body() -> int:
        if extra and args.command not in ("run", "launch"):
            raise LaunchError(f"unrecognised argument {extra[0]!r}")
        if getattr(args, "ref", None) and not args.repo:
            raise LaunchError("--ref needs --repo")
        remote = args.remote_dir.strip("/")
        if remote in ("", ".", "~") or ".." in remote.split("/"):
            raise LaunchError(f"--remote-dir {args.remote_dir!r} must name a directory below the home directory")
        tpu = slice_from_args(args)
        runner = Runner(dry_run=args.dry_run)
        if args.command == "up":
            up(runner, tpu, args)
            if not args.no_install:
                install(runner, tpu, args)
            return 0
        if args.command == "install":
            install(runner, tpu, args)
            return 0
        if args.command == "stop":
            return stop(runner, tpu, args)
        if args.command == "down":
            return down(runner, tpu)
        spec = common.train_spec(args, extra)
        check_run_args(args, spec)
        if args.command == "launch":
            check_create_args(args, tpu)
        try:
            if args.command == "launch":
                up(runner, tpu, args)
                if not args.no_install:
                    install(runner, tpu, args)
            return run(runner, tpu, args, spec)
        finally:
            if args.delete_on_exit:
                down(runner, tpu)

    return common.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
