#!/usr/bin/env python3
"""Train infinitevl_jax on N SLURM nodes x G NVIDIA GPUs: write a batch script and submit it.

The script asks for one task per node with all of the node's GPUs and starts the trainer with
`srun ... infinitevl train ... --distributed`; under SLURM `jax.distributed.initialize()` finds
the coordinator, the number of processes and each process id from SLURM's environment, and each
process drives its node's G GPUs.

Stopping cleanly: `scancel --signal=TERM JOBID` sends SIGTERM to the trainers (not the batch
shell); the trainer saves a checkpoint and exits. The script also asks SLURM for a SIGTERM
--term-before seconds before the time limit, so a job that runs out of time saves first.

`--dry-run` prints the batch script and the sbatch command; without it the script is written to
--script (default: ./<job-name>.sbatch) and submitted with `sbatch --parsable`.

Example:
  python launch/gpu_slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 \\
      --setup 'source ~/venvs/ivl/bin/activate' --config distill_layerwise --run-dir /shared/runs/stage1
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the launch/ folder is not a package)
from common import LaunchError, Runner  # noqa: E402

# Environment every job gets unless --env sets the same variable: NCCL reports warnings (a
# failing link shows up in the job log) without its per-rank INFO chatter.
DEFAULT_ENV = (("NCCL_DEBUG", "WARN"),)
_TIME = re.compile(r"^(\d+-)?\d+(:\d{2}){0,2}$")
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def render_script(args: argparse.Namespace, spec: common.TrainSpec) -> str:
    """The sbatch script text (directives, environment, one `srun` of the trainer)."""
    directives = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={args.gpus_per_node}" if args.gpu_directive == "gpus-per-node"
        else f"--gres=gpu:{args.gpus_per_node}",
        f"--cpus-per-task={args.cpus_per_task}",
        f"--time={args.time}",
        f"--output={args.output}",
        f"--signal=TERM@{args.term_before}",
    ]
    for flag in ("partition", "account", "qos", "mem", "constraint"):
        value = getattr(args, flag)
        if value:
            directives.append(f"--{flag}={value}")
    if args.exclusive:
        directives.append("--exclusive")
    directives.extend(args.sbatch_option)

    env = dict(DEFAULT_ENV)
    env.update(common.parse_env(args.env))
    train = common.train_argv(spec, distributed=True)
    # --cpus-per-task is repeated because recent srun versions do not inherit it from sbatch.
    srun = ["srun", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={args.cpus_per_task}",
            "--kill-on-bad-exit=1", *train]

    lines = ["#!/bin/bash", "# Written by launch/gpu_slurm.py: infinitevl_jax multi-node training."]
    lines += [f"#SBATCH {d}" for d in directives]
    # No `set -u`: environment setup scripts (conda, modules) often read unset variables.
    lines += ["", "set -eo pipefail", f"cd {shlex.quote(args.workdir)}"]
    lines += list(args.setup)
    lines += common.env_exports(list(env.items()))
    lines += ['echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST)"',
              common.join(srun), ""]
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    """Clear errors for values SLURM would reject later (or accept with a surprising meaning)."""
    if not _TIME.match(args.time):
        raise LaunchError(f"--time {args.time!r} is not a SLURM time (MINUTES, HH:MM:SS or D-HH:MM:SS)")
    if not _JOB_NAME.match(args.job_name):
        raise LaunchError(f"--job-name {args.job_name!r}: use letters, digits, '_', '.' and '-' only")
    if args.term_before < 0:
        raise LaunchError("--term-before must be >= 0 seconds")
    for option in args.sbatch_option:
        if not option.startswith("--"):
            raise LaunchError(f"--sbatch-option {option!r}: give the long form, e.g. --sbatch-option=--mail-type=END")
    common.parse_env(args.env)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option is documented in --help."""
    parser = argparse.ArgumentParser(
        prog="gpu_slurm.py", description=__doc__, allow_abbrev=False,
        epilog="Config overrides (--config.a.b=value) may follow the options. See launch/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("allocation")
    g.add_argument("--nodes", type=common.positive_int, required=True, metavar="N", help="number of nodes (>= 1)")
    g.add_argument("--gpus-per-node", type=common.positive_int, default=8, metavar="G",
                   help="GPUs per node, all used by the node's single process (default: %(default)s)")
    g.add_argument("--gpu-directive", choices=("gpus-per-node", "gres"), default="gpus-per-node",
                   help="how to ask for GPUs: #SBATCH --gpus-per-node=G or --gres=gpu:G (default: %(default)s)")
    g.add_argument("--cpus-per-task", type=common.positive_int, default=16, metavar="C",
                   help="CPU cores for each node's process (data loading) (default: %(default)s)")
    g.add_argument("--mem", metavar="SIZE", help="memory per node, e.g. 0 (all) or 500G (default: cluster default)")
    g.add_argument("--time", default="24:00:00", help="time limit (default: %(default)s)")
    g.add_argument("--partition", help="partition (default: the cluster's default)")
    g.add_argument("--account", help="account to charge")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--constraint", help="node features, e.g. h100")
    g.add_argument("--exclusive", action="store_true", help="do not share the nodes with other jobs")
    g.add_argument("--job-name", default="infinitevl", help="job name (default: %(default)s)")
    g.add_argument("--output", default="slurm-%x-%j.out", metavar="PATTERN",
                   help="job log (all nodes' output), SLURM filename pattern (default: %(default)s)")
    g.add_argument("--term-before", type=int, default=300, metavar="SECONDS",
                   help="SIGTERM the trainers this long before the time limit so they checkpoint "
                        "(#SBATCH --signal=TERM@SECONDS) (default: %(default)s)")
    g.add_argument("--sbatch-option", action="append", default=[], metavar="--FLAG=VALUE",
                   help="extra #SBATCH directive, verbatim (repeatable), e.g. --sbatch-option=--mail-type=END")

    e = parser.add_argument_group("environment")
    e.add_argument("--workdir", default=str(common.REPO_ROOT),
                   help="directory the job starts in, on the shared filesystem (default: this checkout, %(default)s)")
    e.add_argument("--setup", action="append", default=[], metavar="SHELL",
                   help="shell line run before training, verbatim (repeatable), e.g. "
                        "'module load cuda/12.4' or 'source .venv/bin/activate'")
    e.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the trainers (repeatable); defaults: "
                        + ", ".join(f"{k}={v}" for k, v in DEFAULT_ENV)
                        + " (e.g. add NCCL_SOCKET_IFNAME=ib0 or NCCL_IB_HCA=mlx5)")

    common.add_train_arguments(parser)
    o = parser.add_argument_group("submission")
    o.add_argument("--script", metavar="PATH",
                   help="where to write the batch script (default: ./<job-name>.sbatch)")
    o.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; submit nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)

    def body() -> int:
        spec = common.train_spec(args, extra)
        check_args(args)
        script = render_script(args, spec)
        path = args.script or f"{args.job_name}.sbatch"
        runner = Runner(dry_run=args.dry_run)
        submit = ["sbatch", "--parsable", path]
        if args.dry_run:
            runner.note(f"batch script (would be written to {path}):")
            print(script, end="")
            runner.note("end of batch script")
            runner.show(submit)
            return 0
        Path(path).write_text(script)
        os.chmod(path, 0o755)
        runner.note(f"wrote {path}")
        code, out = runner.query(submit)
        if code != 0:
            raise LaunchError(f"sbatch failed with exit status {code}")
        job = out.split(";")[0]
        runner.note(f"submitted job {job}: follow with `squeue -j {job}` and the log {args.output}; "
                    f"stop cleanly with `scancel --signal=TERM {job}`")
        print(job)
        return 0

    return common.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
