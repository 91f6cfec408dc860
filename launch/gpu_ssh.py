#!/usr/bin/env python3
"""Train infinitevl_jax on several GPU hosts over plain ssh (no SLURM, no torchrun).

Host i of the list runs
    infinitevl train ... --coordinator-address HOST0:PORT --num-processes N --process-id i
and each process drives all GPUs of its host. The launcher starts all N over ssh at once, prints
every host's output with a `[i:host]` prefix (and, with --log-dir, into one file per host), and
exits non-zero if any host fails. Ctrl-C sends SIGTERM to every remote trainer (the trainer
saves a checkpoint and exits) and waits for them; a second Ctrl-C closes the ssh sessions.
`--stop` only sends that SIGTERM (for trainers whose launcher is gone).

Every host needs the package installed (`pip install -e '.[gpu]'`), the same config file and a
shared --run-dir (NFS, or a bucket mounted with gcsfuse on every host); --workdir and --setup say where and how.

Example:
  python launch/gpu_ssh.py --hosts gpu-a,gpu-b --workdir /shared/infinitevl_jax \\
      --setup 'source .venv/bin/activate' --config distill_layerwise --run-dir /shared/runs/stage1
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (the launch/ folder is not a package)
from common import LaunchError, Runner  # noqa: E402

DEFAULT_SSH_OPTIONS = ("BatchMode=yes", "ServerAliveInterval=30")
_HOST = re.compile(r"^([A-Za-z0-9._-]+@)?[A-Za-z0-9._-]+$")


def read_hosts(hosts: str | None, hostfile: str | None) -> list[str]:
    """Hosts from --hosts (comma-separated) then --hostfile (one per line, `#` comments).

    Raises LaunchError for an empty result, a malformed entry or a duplicate.
    """
    entries: list[str] = []
    if hosts is not None and hosts.strip():
        entries += [h.strip() for h in hosts.split(",")]
        if any(not h for h in entries):
            raise LaunchError(f"--hosts {hosts!r} has an empty entry")
    if hostfile is not None:
        try:
            text = Path(hostfile).read_text()
        except OSError as exc:
            raise LaunchError(f"cannot read --hostfile {hostfile!r}: {exc.strerror}") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
    if not entries:
        raise LaunchError("the host list is empty: give --hosts h1,h2,... or a --hostfile with one host per line")
    for host in entries:
        if not _HOST.match(host):
            raise LaunchError(f"not a host name: {host!r}")
    seen = set()
    for host in entries:
        if host in seen:
            raise LaunchError(f"host {host!r} is listed twice (one process per host)")
        seen.add(host)
    return entries


def coordinator_host(first: str) -> str:
    """The address other hosts use to reach the first host: the ssh destination without `user@`."""
    return first.split("@", 1)[-1]


def ssh_argv(args: argparse.Namespace, host: str, command: str) -> list[str]:
    """`ssh [-o OPTION ...] HOST COMMAND` (the remote command is one argument)."""
    argv = [args.ssh]
    for option in (*DEFAULT_SSH_OPTIONS, *args.ssh_option):
        argv += ["-o", option]
    return [*argv, host, command]


def train_commands(args: argparse.Namespace, spec: common.TrainSpec, hosts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(label, ssh argv) for every host; host i gets --process-id i."""
    address = f"{args.coordinator_host or coordinator_host(hosts[0])}:{args.port}"
    env = common.parse_env(args.env)
    commands = []
    for index, host in enumerate(hosts):
        argv = common.train_argv(spec, coordinator_address=address, num_processes=len(hosts), process_id=index)
        script = common.remote_train_script(argv, workdir=args.workdir, setup=args.setup, env=env)
        commands.append((f"{index}:{host}", ssh_argv(args, host, script)))
    return commands


def stop_commands(args: argparse.Namespace, hosts: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(label, ssh argv) that SIGTERM the trainer on every host."""
    script = common.remote_stop_script(workdir=args.workdir)
    return [(f"stop {i}:{host}", ssh_argv(args, host, script)) for i, host in enumerate(hosts)]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option is documented in --help."""
    parser = argparse.ArgumentParser(
        prog="gpu_ssh.py", description=__doc__, allow_abbrev=False,
        epilog="--config and --run-dir are required except with --stop. Config overrides "
               "(--config.a.b=value) may follow the options. See launch/README.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    h = parser.add_argument_group("hosts")
    h.add_argument("--hosts", metavar="H0,H1,...",
                   help="comma-separated ssh destinations ([user@]host); the first one is the coordinator")
    h.add_argument("--hostfile", metavar="FILE",
                   help="file with one ssh destination per line (# comments); appended after --hosts")
    h.add_argument("--coordinator-host", metavar="HOST",
                   help="address the other hosts use to reach host 0 (default: host 0's name without user@); "
                        "set it when the ssh name is an alias or a public address")
    h.add_argument("--port", type=common.port_number, default=12345,
                   help="coordinator port on host 0, reachable from every host (default: %(default)s)")
    h.add_argument("--ssh", default="ssh", metavar="CMD", help="ssh client (default: %(default)s)")
    h.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                   help="extra `ssh -o OPTION` (repeatable), e.g. IdentityFile=~/.ssh/id_ed25519; always set: "
                        + ", ".join(DEFAULT_SSH_OPTIONS))

    e = parser.add_argument_group("remote environment")
    e.add_argument("--workdir", metavar="DIR",
                   help="directory to cd into on every host (default: the remote home directory); "
                        "the trainer's pid file is kept there")
    e.add_argument("--setup", action="append", default=[], metavar="SHELL",
                   help="shell line run on every host before training, verbatim (repeatable), e.g. "
                        "'source .venv/bin/activate'")
    e.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the trainers (repeatable), e.g. NCCL_SOCKET_IFNAME=eth0")

    common.add_train_arguments(parser, required=False)
    r = parser.add_argument_group("running")
    r.add_argument("--log-dir", metavar="DIR", help="also write each host's output to DIR/<i>_<host>.log")
    r.add_argument("--stop-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="after Ctrl-C, how long to wait for the trainers to save and exit before the ssh "
                        "sessions are closed (default: %(default)s)")
    r.add_argument("--stop", action="store_true",
                   help="only send SIGTERM to the trainers on the hosts (no --config/--run-dir needed)")
    r.add_argument("--dry-run", action="store_true", help="print the ssh commands and run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status (non-zero when any host failed)."""
    args, extra = build_parser().parse_known_args(argv)

    def body() -> int:
        hosts = read_hosts(args.hosts, args.hostfile)
        runner = Runner(dry_run=args.dry_run)
        stops = stop_commands(args, hosts)
        if args.stop:
            if extra:
                raise LaunchError(f"unrecognised argument {extra[0]!r}")
            runner.note(f"sending SIGTERM to the trainer on {len(hosts)} host(s)")
            for _, argv_ in stops:
                runner.show(argv_)
            if args.dry_run:
                return 0
            codes = common.stream(stops)
            return 0 if all(c == 0 for c in codes) else 1
        spec = common.train_spec(args, extra)
        commands = train_commands(args, spec, hosts)
        address = f"{args.coordinator_host or coordinator_host(hosts[0])}:{args.port}"
        runner.note(f"{len(hosts)} process(es), coordinator {address}")
        for _, argv_ in commands:
            runner.show(argv_)
        if args.dry_run:
            runner.note("on Ctrl-C the launcher runs:")
            for _, argv_ in stops:
                runner.show(argv_)
            return 0

        def on_interrupt() -> None:
            common.stream(stops)

        codes = common.stream(commands, log_dir=args.log_dir, on_interrupt=on_interrupt,
                              stop_timeout=args.stop_timeout)
        failed = [(label, code) for (label, _), code in zip(commands, codes) if code != 0]
        for label, code in failed:
            print(f"# host {label} exited with status {code}", file=sys.stderr)
        if failed:
            return failed[0][1] if failed[0][1] > 0 else 1
        runner.note("all hosts finished")
        return 0

    return common.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
