"""The launchers in launch/: exact --dry-run commands, argument errors and help text.

Nothing here needs gcloud, ssh or SLURM, and no real launcher command is run: the launchers are
imported by file path and called with --dry-run, while `subprocess` is replaced by a guard that
fails the test if anything tries to start a process. The two tests of the non-dry paths (sbatch
submission, ssh streaming) swap in a fake `sbatch` result and a fake ssh client.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tpu_pod = _load("tpu_pod")
gpu_slurm = _load("gpu_slurm")
gpu_ssh = _load("gpu_ssh")
common = sys.modules["common"]


@pytest.fixture(autouse=True)
def no_processes(monkeypatch):
    """Any attempt to start a process fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to run a command: {args[0] if args else kwargs}")
    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)


def dry(module, argv, capsys):
    """Runs a launcher's main with --dry-run; returns (comment lines, command token lists)."""
    assert module.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("#")]
    commands = [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]
    return notes, commands


def remote(argv):
    """The --command=... script of a gcloud ssh command, or the last argument of an ssh command."""
    commands = [a for a in argv if a.startswith("--command=")]
    return commands[0][len("--command="):] if commands else argv[-1]


def exec_argv(script):
    """Tokens of the `exec ...` step of a remote training script."""
    steps = script.split(" && ")
    assert steps[-1].startswith("exec ")
    return shlex.split(steps[-1])[1:]


OVERRIDES = ["--config.train.learning_rate=1e-4", "--config.data.system_prompt=hello world"]
TRAIN = ["--config", "infinitevl_4b", "--run-dir", "/gcs/bucket/runs/stage1", *OVERRIDES]


# --------------------------------------------------------------------------- TPU


def test_tpu_launch_plain_slice(capsys):
    notes, cmds = dry(tpu_pod, ["launch", "--name", "ivl", "--zone", "us-west4-a", "--project", "proj",
                                "--accelerator-type", "v5litepod-16", "--delete-on-exit", *TRAIN], capsys)
    scope = ["--zone=us-west4-a", "--project=proj"]
    gc = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert cmds[0] == [*gc, "describe", "ivl", *scope, "--format=value(state)"]
    assert cmds[1] == [*gc, "create", "ivl", *scope, "--accelerator-type=v5litepod-16",
                       "--version=v2-alpha-tpuv5-lite"]
    archive = cmds[2][5]
    assert archive.endswith("infinitevl_src_ivl.tar.gz")
    assert cmds[2] == [*gc, "scp", archive, "ivl:infinitevl_src.tar.gz", *scope, "--worker=all"]
    assert cmds[3][:9] == [*gc, "ssh", "ivl", *scope, "--worker=all"] and len(cmds[3]) == 10
    assert remote(cmds[3]) == ("rm -rf infinitevl_jax && mkdir -p infinitevl_jax && "
                               "tar -xzf infinitevl_src.tar.gz -C infinitevl_jax && rm -f infinitevl_src.tar.gz && "
                               "cd infinitevl_jax && python3 -m pip install -e '.[tpu]'")
    train = cmds[4]
    assert train[:9] == [*gc, "ssh", "ivl", *scope, "--worker=all"] and len(train) == 10
    script = remote(train)
    assert script.split(" && ")[:3] == ["cd infinitevl_jax", 'export PATH="$HOME/.local/bin:$PATH"',
                                        "echo $$ > .infinitevl_train.pid"]
    assert exec_argv(script) == ["infinitevl", "train", "--config", "infinitevl_4b", "--run-dir",
                                 "/gcs/bucket/runs/stage1", "--distributed", *OVERRIDES]
    assert "kill -TERM" in remote(cmds[5]) and "infinitevl_jax/.infinitevl_train.pid" in remote(cmds[5])
    assert cmds[5][:9] == [*gc, "ssh", "ivl", *scope, "--worker=all"]
    assert cmds[6] == [*gc, "delete", "ivl", *scope, "--quiet"]
    assert len(cmds) == 7
    assert any("on Ctrl-C" in n for n in notes)


def test_tpu_queued_multislice(capsys):
    _, cmds = dry(tpu_pod, ["launch", "--name", "ivl", "--zone", "us-east5-a", "--accelerator-type", "v6e-256",
                            "--num-slices", "2", "--spot", "--valid-until-duration", "6h",
                            "--repo", "https://github.com/o/r.git", "--ref", "v1", "--log-dir", "logs",
                            *TRAIN], capsys)
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert cmds[0] == [*qr, "describe", "ivl", "--zone=us-east5-a", "--format=value(state.state)"]
    assert cmds[1] == [*qr, "create", "ivl", "--zone=us-east5-a", "--accelerator-type=v6e-256",
                       "--runtime-version=v2-alpha-tpuv6e", "--node-count=2", "--node-prefix=ivl", "--spot",
                       "--valid-until-duration=6h"]
    assert cmds[2] == cmds[0]  # the wait for ACTIVE polls the same describe
    install = cmds[3]
    assert install[:10] == [*qr, "ssh", "ivl", "--zone=us-east5-a", "--node=all", "--worker=all",
                           "--batch-size=256"]
    assert remote(install) == ("rm -rf infinitevl_jax && git clone https://github.com/o/r.git infinitevl_jax && "
                               "cd infinitevl_jax && git checkout v1 && python3 -m pip install -e '.[tpu]'")
    train = cmds[4]
    assert train[:10] == install[:10] and train[-1] == "--output-directory=logs"
    assert exec_argv(remote(train))[-3:] == ["--distributed", *OVERRIDES]
    assert len(cmds) == 6  # + the stop command shown for Ctrl-C; no delete without --delete-on-exit


def test_tpu_queued_single_slice_best_effort_and_source_copy(capsys):
    _, cmds = dry(tpu_pod, ["up", "--name", "ivl", "--zone", "us-central1-a", "--queued", "--best-effort",
                            "--accelerator-type", "v5p-8", "--labels", "team=vl", "--internal-ips"], capsys)
    assert cmds[1] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create", "ivl",
                       "--zone=us-central1-a", "--accelerator-type=v5p-8", "--runtime-version=v2-alpha-tpuv5",
                       "--node-id=ivl", "--best-effort", "--labels=team=vl", "--internal-ips"]
    # a single queued slice's node has the same name: reached with tpu-vm scp/ssh
    assert cmds[3][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert cmds[4][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in cmds[4]


def test_tpu_stop_and_down(capsys):
    where = ["--name", "ivl", "--zone", "us-central2-b"]
    _, cmds = dry(tpu_pod, ["stop", *where, "--remote-dir", "work/ivl"], capsys)
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ivl", "--zone=us-central2-b", "--worker=all",
                     "--command=" + common.remote_stop_script(workdir="work/ivl")]]
    assert "kill -TERM" in cmds[0][-1] and "work/ivl/.infinitevl_train.pid" in cmds[0][-1]
    _, cmds = dry(tpu_pod, ["down", *where], capsys)
    assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "ivl", "--zone=us-central2-b", "--quiet"]]
    _, cmds = dry(tpu_pod, ["down", *where, "--num-slices", "4"], capsys)
    assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "ivl", "--zone=us-central2-b",
                     "--force", "--quiet"]]


@pytest.mark.parametrize("accelerator, version", [
    ("v6e-8", "v2-alpha-tpuv6e"), ("v5p-128", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_tpu_runtime_version_defaults(accelerator, version):
    assert tpu_pod.default_runtime_version(accelerator) == version


@pytest.mark.parametrize("argv, message", [
    (["up", "--name", "ivl", "--accelerator-type", "v4-8"], "the following arguments are required: --zone"),
    (["up", "--name", "ivl", "--zone", "us-central2-b", "--num-slices", "0"], "must be at least 1"),
    (["up", "--name", "ivl", "--zone", "us-central2-b", "--spot", "--best-effort"], "not allowed with"),
])
def test_tpu_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        tpu_pod.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["up", "--zone", "us-central2-b"], "--accelerator-type is required"),
    (["up", "--zone", "us-central2-b", "--accelerator-type", "big"], "does not look like TYPE-SIZE"),
    (["up", "--zone", "us-central2-b", "--accelerator-type", "v4-8", "--best-effort"], "add --queued"),
    (["up", "--zone", "us-central2-b", "--accelerator-type", "v9-8"], "pass --runtime-version"),
    (["up", "--zone", "central", "--accelerator-type", "v4-8"], "does not look like a zone"),
    (["down", "--zone", "us-central2-b", "--node-prefix", "p"], "--num-slices >= 2"),
    (["run", "--zone", "us-central2-b", "--config", "c", "--run-dir", "local/dir"], "not an absolute path"),
    (["run", "--zone", "us-central2-b", "--config", "c", "--run-dir", "gs://b/r"], "is a URL"),
    (["run", "--zone", "us-central2-b", "--config", "c", "--run-dir", "/gcs/b/r", "--zon=x"], "'--zon=x'"),
    (["run", "--zone", "us-central2-b", "--config", "c", "--run-dir", "/gcs/b/r", "--env", "1X=2"], "KEY=VALUE"),
    (["install", "--zone", "us-central2-b", "--ref", "main"], "--ref needs --repo"),
    (["install", "--zone", "us-central2-b", "--remote-dir", "../x"], "below the home directory"),
])
def test_tpu_launch_errors(argv, message, capsys):
    assert tpu_pod.main([argv[0], "--name", "ivl", *argv[1:], "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""  # nothing was printed as if it ran


def test_tpu_bad_name(capsys):
    assert tpu_pod.main(["down", "--name", "My_TPU", "--zone", "us-central2-b", "--dry-run"]) == 2
    assert "not a valid TPU name" in capsys.readouterr().err


# --------------------------------------------------------------------------- SLURM

SLURM = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "vl", "--time", "2-00:00:00",
         "--workdir", "/shared/infinitevl jax", "--setup", "source .venv/bin/activate",
         "--env", "NCCL_SOCKET_IFNAME=ib0", "--config", "infinitevl_4b", "--run-dir", "/shared/runs/stage 1",
         *OVERRIDES]


def test_slurm_dry_run_prints_script_and_sbatch(capsys):
    assert gpu_slurm.main([*SLURM, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "# batch script (would be written to infinitevl.sbatch):"
    end = out.index("# end of batch script")
    script = out[1:end]
    assert script[0] == "#!/bin/bash"
    assert [line for line in script if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=infinitevl", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=16", "#SBATCH --time=2-00:00:00",
        "#SBATCH --output=slurm-%x-%j.out", "#SBATCH --signal=TERM@300", "#SBATCH --partition=gpu",
        "#SBATCH --account=vl"]
    body = [line for line in script if line and not line.startswith("#")]
    assert body[:5] == ["set -eo pipefail", "cd '/shared/infinitevl jax'", "source .venv/bin/activate",
                        "export NCCL_DEBUG=WARN", "export NCCL_SOCKET_IFNAME=ib0"]
    assert shlex.split(body[-1]) == [
        "srun", "--nodes=4", "--ntasks-per-node=1", "--cpus-per-task=16", "--kill-on-bad-exit=1",
        "infinitevl", "train", "--config", "infinitevl_4b", "--run-dir", "/shared/runs/stage 1", "--distributed",
        *OVERRIDES]
    assert out[end + 1:] == ["sbatch --parsable infinitevl.sbatch"]


def test_slurm_options_gres_exclusive_and_env_override(capsys):
    assert gpu_slurm.main(["--nodes", "1", "--gpus-per-node", "4", "--gpu-directive", "gres", "--exclusive",
                           "--job-name", "ivl-s1", "--env", "NCCL_DEBUG=INFO", "--sbatch-option=--mail-type=END",
                           "--script", "/tmp/x/job.sbatch", "--config", "c", "--run-dir", "r", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --gres=gpu:4\n" in out and "--gpus-per-node" not in out
    assert "#SBATCH --exclusive\n#SBATCH --mail-type=END\n" in out
    assert "export NCCL_DEBUG=INFO\n" in out and "NCCL_DEBUG=WARN" not in out
    assert out.rstrip().splitlines()[-1] == "sbatch --parsable /tmp/x/job.sbatch"


def test_slurm_submits_written_script(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="4242;cluster\n")

    monkeypatch.setattr(common.subprocess, "run", fake_run)
    path = tmp_path / "job.sbatch"
    assert gpu_slurm.main(["--nodes", "2", "--config", "c", "--run-dir", "r", "--script", str(path)]) == 0
    assert calls == [["sbatch", "--parsable", str(path)]]
    assert path.read_text().startswith("#!/bin/bash\n") and "#SBATCH --nodes=2" in path.read_text()
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "4242" and "scancel --signal=TERM 4242" in out


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "must be at least 1"),
    (["--nodes", "two"], "expected an integer"),
    (["--nodes", "2", "--time", "soon"], "not a SLURM time"),
    (["--nodes", "2", "--env", "NOEQUALS"], "KEY=VALUE"),
    (["--nodes", "2", "--job-name", "a b"], "--job-name"),
    (["--nodes", "2", "--bogus"], "'--bogus'"),
])
def test_slurm_errors(argv, message, capsys):
    try:
        code = gpu_slurm.main([*argv, "--config", "c", "--run-dir", "r", "--dry-run"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


# --------------------------------------------------------------------------- plain ssh

SSH_TRAIN = ["--config", "infinitevl_4b", "--run-dir", "/shared/runs/s1", *OVERRIDES]


def test_ssh_dry_run_per_host_process_ids(capsys):
    _, cmds = dry(gpu_ssh, ["--hosts", "gpu-a, me@gpu-b,gpu-c", "--port", "2222", "--workdir", "/shared/ivl",
                            "--setup", "source .venv/bin/activate", "--env", "NCCL_SOCKET_IFNAME=eth0",
                            "--ssh-option", "IdentityFile=~/.ssh/k", *SSH_TRAIN], capsys)
    hosts = ["gpu-a", "me@gpu-b", "gpu-c"]
    train, stops = cmds[:3], cmds[3:]
    for index, (argv, host) in enumerate(zip(train, hosts)):
        assert argv[:-1] == ["ssh", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=30",
                             "-o", "IdentityFile=~/.ssh/k", host]
        script = argv[-1]
        assert script.split(" && ")[:4] == ["cd /shared/ivl", "source .venv/bin/activate",
                                            "export NCCL_SOCKET_IFNAME=eth0", "echo $$ > .infinitevl_train.pid"]
        assert exec_argv(script) == [
            "infinitevl", "train", "--config", "infinitevl_4b", "--run-dir", "/shared/runs/s1",
            "--coordinator-address", "gpu-a:2222", "--num-processes", "3", "--process-id", str(index), *OVERRIDES]
    assert [argv[-2] for argv in stops] == hosts
    assert all(argv[-1] == common.remote_stop_script(workdir="/shared/ivl") for argv in stops)


def test_ssh_hostfile_and_coordinator_override(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nroot@10.0.0.1   # head\n\n10.0.0.2\n")
    _, cmds = dry(gpu_ssh, ["--hostfile", str(hostfile), *SSH_TRAIN], capsys)
    assert [c[-2] for c in cmds[:2]] == ["root@10.0.0.1", "10.0.0.2"]
    assert "--coordinator-address 10.0.0.1:12345" in cmds[0][-1]  # user@ stripped, default port
    _, cmds = dry(gpu_ssh, ["--hostfile", str(hostfile), "--coordinator-host", "head.internal", *SSH_TRAIN], capsys)
    assert "--coordinator-address head.internal:12345" in cmds[1][-1]


def test_ssh_stop_only(capsys):
    _, cmds = dry(gpu_ssh, ["--hosts", "a,b", "--stop"], capsys)
    assert [c[-2] for c in cmds] == ["a", "b"] and all("kill -TERM" in c[-1] for c in cmds)


@pytest.mark.parametrize("argv, message", [
    (["--hosts", ""], "host list is empty"),
    ([], "host list is empty"),
    (["--hosts", "a,,b"], "empty entry"),
    (["--hosts", "a,a"], "listed twice"),
    (["--hosts", "a b"], "not a host name"),
    (["--hosts", "a", "--hostfile", "/nonexistent/hosts"], "cannot read --hostfile"),
    (["--hosts", "a", "--port", "70000"], "not a TCP port"),
])
def test_ssh_errors(argv, message, capsys):
    try:
        code = gpu_ssh.main([*argv, *SSH_TRAIN, "--dry-run"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


def test_ssh_missing_config_is_an_error(capsys):
    assert gpu_ssh.main(["--hosts", "a", "--run-dir", "r", "--dry-run"]) == 2
    assert "--config is required" in capsys.readouterr().err


def test_ssh_streams_prefixed_output_and_fails_if_any_host_fails(tmp_path, monkeypatch, capsys):
    """A fake ssh client (a Python script) stands in for ssh: host 'bad' exits 3."""
    monkeypatch.undo()  # this test starts the fake client as a real (local) process
    fake = tmp_path / "fake_ssh"
    fake.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        host, command = sys.argv[-2], sys.argv[-1]
        print("hello from", host)
        print("pid" if "echo $$" in command else "?", flush=True)
        sys.exit(3 if host == "bad" else 0)
        """))
    fake.chmod(0o755)
    logs = tmp_path / "logs"
    code = gpu_ssh.main(["--hosts", "good,bad", "--ssh", str(fake), "--log-dir", str(logs), *SSH_TRAIN])
    assert code == 3
    captured = capsys.readouterr()
    assert "[0:good] hello from good" in captured.out and "[1:bad] hello from bad" in captured.out
    assert "host 1:bad exited with status 3" in captured.err
    assert (logs / "0_good.log").read_text() == "hello from good\npid\n"
    assert (logs / "1_bad.log").read_text() == "hello from bad\npid\n"


# --------------------------------------------------------------------------- shared


def test_train_argv_forms():
    spec = common.TrainSpec("tiny", "gs://b/r", ("--config.a=1",))
    assert common.train_argv(spec) == ["infinitevl", "train", "--config", "tiny", "--run-dir", "gs://b/r",
                                       "--config.a=1"]
    with pytest.raises(ValueError):
        common.train_argv(spec, distributed=True, process_id=0, num_processes=1, coordinator_address="h:1")
    with pytest.raises(ValueError):
        common.train_argv(spec, process_id=0)


def test_overrides_must_be_config_assignments():
    assert common.split_overrides(["--config.model.sliding_window=32"]) == ("--config.model.sliding_window=32",)
    for bad in (["--config.model.x"], ["positional"], ["--config=tiny"], ["--other.x=1"]):
        with pytest.raises(common.LaunchError):
            common.split_overrides(bad)


@pytest.mark.parametrize("module", [tpu_pod, gpu_slurm, gpu_ssh])
def test_every_option_has_help(module):
    parser = module.build_parser()
    parsers = [parser]
    for action in parser._actions:  # noqa: SLF001 - walk the subcommands too
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:  # noqa: SLF001
            if action.option_strings:
                assert action.help, f"{p.prog}: {action.option_strings} has no help text"


@pytest.mark.parametrize("script, words", [
    ("tpu_pod.py", ["up", "install", "run", "stop", "down", "launch"]),
    ("gpu_slurm.py", ["--nodes", "--gpus-per-node", "--dry-run", "--config", "--run-dir"]),
    ("gpu_ssh.py", ["--hosts", "--hostfile", "--port", "--stop", "--dry-run"]),
])
def test_scripts_run_standalone_help(script, words, monkeypatch):
    monkeypatch.undo()  # runs `python launch/<script> --help`: no launcher command is executed
    out = subprocess.run([sys.executable, str(LAUNCH / script), "--help"], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    for word in words:
        assert word in out


# --------------------------------------------------------------------------- Ctrl-C end to end

FAKE_TRAINER = """#!/bin/bash
trap 'echo "SIGTERM: saving checkpoint"; echo saved; exit 0' TERM
echo "training $*"
while true; do sleep 0.1; done
"""
# Stand-ins for ssh and gcloud that run the remote command locally in a per-host directory.
FAKE_SSH = """#!/bin/bash
host="${@: -2:1}"; cmd="${@: -1}"
mkdir -p "$FAKE_HOME/$host" && cd "$FAKE_HOME/$host" && exec bash -c "$cmd"
"""
FAKE_GCLOUD = """#!/bin/bash
for arg in "$@"; do case "$arg" in --command=*) cmd="${arg#--command=}";; esac; done
mkdir -p "$FAKE_HOME/worker0" && cd "$FAKE_HOME/worker0" && exec bash -c "$cmd"
"""


def _interrupt_launcher(tmp_path, argv, env_extra):
    """Starts a launcher, waits for the trainers to print, sends SIGINT; returns (status, output)."""
    import os
    import signal
    import time

    env = {**os.environ, "FAKE_HOME": str(tmp_path / "remote"), **env_extra}
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines = []
    deadline = time.monotonic() + 30
    expected = 2 if "gpu_ssh.py" in argv[0] else 1
    while sum("training train" in line for line in lines) < expected and time.monotonic() < deadline:
        lines.append(proc.stdout.readline())
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    return proc.returncode, "".join(lines) + rest


def _script(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_interrupts_while_children_start_are_acted_on_once_all_have_started():
    """A Ctrl-C that lands while ``stream`` is still starting commands (the race a fast trainer's
    first line can open) is counted, and the stop runs once every command is up."""
    import signal
    import threading

    first_ran = threading.Event()
    seconds = []
    interrupts = common.Interrupts(first_ran.set, lambda: seconds.append(1))
    with interrupts.deferred():
        interrupts._handle(signal.SIGINT, None)
        assert interrupts.count == 1 and not first_ran.is_set()
    assert first_ran.wait(5) and seconds == []
    interrupts._handle(signal.SIGINT, None)  # a second one, not deferred, acts at once
    assert interrupts.count == 2 and seconds == [1]


def test_ctrl_c_forwards_sigterm_over_ssh(tmp_path, monkeypatch):
    monkeypatch.undo()  # local fakes only: no ssh, no real trainer
    trainer = _script(tmp_path / "trainer", FAKE_TRAINER)
    ssh = _script(tmp_path / "ssh", FAKE_SSH)
    code, out = _interrupt_launcher(tmp_path, [str(LAUNCH / "gpu_ssh.py"), "--hosts", "h0,h1", "--ssh", ssh,
                                               "--train-executable", trainer, "--config", "c", "--run-dir", "r"], {})
    assert code == 0, out
    for host in ("0:h0", "1:h1"):
        assert f"[{host}] SIGTERM: saving checkpoint" in out and f"[{host}] saved" in out
        assert f"[stop {host}] sent SIGTERM to trainer" in out


def test_ctrl_c_forwards_sigterm_on_tpu(tmp_path, monkeypatch):
    monkeypatch.undo()  # a fake gcloud on PATH runs the worker command locally
    import os

    trainer = _script(tmp_path / "trainer", FAKE_TRAINER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "gcloud", FAKE_GCLOUD)
    (tmp_path / "remote" / "worker0" / "infinitevl_jax").mkdir(parents=True)
    code, out = _interrupt_launcher(
        tmp_path, [str(LAUNCH / "tpu_pod.py"), "run", "--name", "ivl", "--zone", "us-central2-b",
                   "--train-executable", trainer, "--config", "c", "--run-dir", "/gcs/b/r"],
        {"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert code == 0, out
    assert "SIGTERM: saving checkpoint" in out and "saved" in out and "sent SIGTERM to trainer" in out
