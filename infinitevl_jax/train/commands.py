"""``infinitevl train``: one stage (a run config) or a curriculum (a config with ``stages``)."""

from __future__ import annotations

import argparse
import os

import jax

from infinitevl_jax.config import load_config


def initialize_distributed(args) -> None:
    """``jax.distributed.initialize`` for multi-host runs: auto-detected (TPU VMs, SLURM) with
    ``--distributed``, or explicit with the coordinator flags."""
    explicit = (args.coordinator_address, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator-address, --num-processes and --process-id go together")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def default_run_dir(config_arg: str, arch: str | None = None) -> str:
    name = os.path.splitext(os.path.basename(config_arg))[0]
    return os.path.join("runs", name if arch is None else f"{name}-{arch}")


def cmd_train(args, overrides) -> int:
    from infinitevl_jax.train.curriculum import is_curriculum, run_curriculum
    from infinitevl_jax.train.loop import train

    initialize_distributed(args)
    config = load_config(args.config, overrides, arg=args.arch)
    run_dir = args.run_dir or default_run_dir(args.config, args.arch)
    if is_curriculum(config):
        results = run_curriculum(config, run_dir, progress=not args.no_progress)
        return 0 if len(results) == len(config.order) else 3
    result = train(config, run_dir, progress=not args.no_progress)
    where = f"{run_dir} at step {result.step}"
    print(f"stopped by a signal; checkpoint saved: {where} (run the same command to resume)" if result.preempted
          else f"done: {where}" + ("" if result.metrics is None else f", loss {result.metrics['loss']:.4f}"))
    return 0


def register(sub) -> None:
    """Adds the ``train`` subcommand to the ``infinitevl`` parser."""
    train = sub.add_parser(
        "train", help="train one stage (distill_layerwise, distill_e2e, sft, long_sft configs) or a curriculum "
                      "(configs/quickstart.py); an existing run directory is resumed",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", required=True,
                       help="config file (configs/quickstart.py, configs/sft.py, ...) or its preset name")
    train.add_argument("--arch", default=None,
                       help="argument of the config's get_config(), e.g. the quickstart's student architecture: "
                            "infinitevl (default) or linmu; the default run directory gets it as a suffix")
    train.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>); on several hosts, a path they all share "
                            "(NFS, or a bucket mounted with gcsfuse)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (log files, CI)")
    dist = train.add_argument_group("multi-host")
    dist.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() (auto-detected coordinator: TPU VMs, SLURM)")
    dist.add_argument("--coordinator-address", default=None, metavar="HOST:PORT")
    dist.add_argument("--num-processes", type=int, default=None)
    dist.add_argument("--process-id", type=int, default=None)
    train.set_defaults(run=cmd_train)
