"""CUDA MPS in the job: a fake ``nvidia-cuda-mps-control`` on PATH (the process boundary; no
GPU here) records every call and the pipe directory it was given; the job's real code starts
it, hands its directories to the runs and quits it on every way a job ends."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from deconcnn_cli import contract, runenv
from deconcnn_cli.runenv import child_env
from deconcnn_cli.sweep import job, mps
from deconcnn_cli.sweep.job import RunGroup
from tests.sweep.fakes import start_job_on_a_long_run

FAKE = """#!/bin/sh
# a fake MPS control program: -d "starts" a daemon (a marker in the pipe directory); commands
# come on stdin: get_server_list answers while it runs, quit stops it
log="{log}"
if [ "$1" = "-d" ]; then
  echo "-d pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" \
    "visible=$CUDA_VISIBLE_DEVICES" >> "$log"
  {start}
fi
read cmd
echo "$cmd pipe=$CUDA_MPS_PIPE_DIRECTORY" >> "$log"
[ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ] || exit 1
[ "$cmd" = quit ] && rm -f "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"""
STARTS = 'touch "$CUDA_MPS_PIPE_DIRECTORY/control"; exit 0'
# as the real daemon does: a background server that keeps the stdout it inherited open, here
# until it is quit (its control file gone)
BACKGROUNDS = (
    'touch "$CUDA_MPS_PIPE_DIRECTORY/control"; echo "daemon up"; '
    '(while [ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; do sleep 0.1; done) & exit 0'
)


def write_fake_mps(bin_dir: Path, start: str = STARTS) -> Path:
    """The fake control program in ``bin_dir``; returns its call log."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "mps.log"
    log.touch()
    script = bin_dir / mps.CONTROL
    script.write_text(FAKE.format(log=log, start=start))
    script.chmod(0o755)
    return log


def install_fake_mps(monkeypatch, bin_dir: Path, start: str = STARTS) -> Path:
    log = write_fake_mps(bin_dir, start)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(mps.PIPE_ENV, raising=False)
    return log


def calls(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()]


def test_the_daemon_is_private_to_the_job_and_quit_with_its_folder(tmp_path, monkeypatch):
    log = install_fake_mps(monkeypatch, tmp_path / "bin")
    daemon = mps.start_mps("1234-0", base=str(tmp_path))
    assert daemon.active, daemon.reason
    env = daemon.env()
    pipe = Path(env[mps.PIPE_ENV])
    assert pipe.is_dir() and (pipe.stat().st_mode & 0o777) == 0o700
    assert "decon-mps-1234-0-" in str(pipe) and env[mps.STATE_ENV] == "1"
    other = mps.start_mps("1234-0", base=str(tmp_path))  # a requeue of the same job
    assert other.env()[mps.PIPE_ENV] != str(pipe)  # never shares a folder
    other.stop()
    daemon.stop()
    assert calls(log)[:2] == ["-d", "get_server_list"] and calls(log)[-1] == "quit"
    assert f"pipe={pipe}" in log.read_text().splitlines()[0]
    assert not pipe.exists()  # pipe and log directories removed


def test_mps_that_cannot_start_says_why_and_the_job_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    missing = mps.start_mps("1", base=str(tmp_path))
    assert not missing.active and "not found" in missing.reason
    assert missing.env() == {mps.STATE_ENV: "0", mps.REASON_ENV: missing.reason}
    install_fake_mps(monkeypatch, tmp_path / "bin", start='echo "permission denied" >&2; exit 3')
    refused = mps.start_mps("2", base=str(tmp_path))
    assert not refused.active and "exited 3" in refused.reason and "permission" in refused.reason
    assert not list(tmp_path.glob("decon-mps-*"))  # nothing left behind
    install_fake_mps(monkeypatch, tmp_path / "bin2", start="exit 0")  # starts, never answers
    monkeypatch.setattr(mps, "CALL_TIMEOUT_S", 1.0)
    silent = mps.start_mps("3", base=str(tmp_path))
    assert not silent.active and "did not answer" in silent.reason
    monkeypatch.setenv(mps.PIPE_ENV, "/var/run/nvidia-mps")
    assert "not ours" in mps.start_mps("4", base=str(tmp_path)).reason


def test_a_job_hands_its_daemon_to_its_runs_and_quits_it(tmp_path, monkeypatch):
    """Completion and a run's failure: the children faked at the process boundary."""
    log = install_fake_mps(monkeypatch, tmp_path / "bin")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr(job, "_start", lambda d, t, share, **env: seen.append(env))
    monkeypatch.setattr(job, "_wait_children", lambda children, timeout: None)
    with pytest.raises(RuntimeError, match="runs not finished"):  # the fakes train nothing
        RunGroup([str(d) for d in dirs], max_attempts=3, mps=True, require_gpu=True)()
    assert [e["require_gpu"] for e in seen] == [True, True]
    pipes = {e["mps"][mps.PIPE_ENV] for e in seen}
    assert len(pipes) == 1 and calls(log)[-1] == "quit"  # one daemon, quit after the runs
    env = child_env(2, 2, require_gpu=True, mps=seen[0]["mps"])
    assert env[mps.PIPE_ENV] in pipes and env[runenv.REQUIRE_GPU_ENV] == "1"
    assert env[runenv.CUBLAS_ENV] == runenv.CUBLAS_WORKSPACE
    assert not Path(next(iter(pipes))).exists()


def test_sigterm_quits_the_daemon_and_the_run_recorded_it_ran_under_mps(tmp_path, monkeypatch):
    """A real job process, a real `decon train` child: the child inherits the daemon's
    environment (status.json and the attempt's start line say mps), and the job's SIGTERM
    (a cancel, a requeue) quits the daemon."""

    log = install_fake_mps(monkeypatch, tmp_path / "bin")
    env = {"TMPDIR": str(tmp_path), "SLURM_JOB_ID": "777", mps.VISIBLE_ENV: "2"}
    proc, run_dir = start_job_on_a_long_run(tmp_path / "sweep", env, mps=True)
    assert calls(log) == ["-d", "get_server_list"]  # running: not quit yet
    (child,) = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
    assert b"CUDA_VISIBLE_DEVICES=0" in environ  # the server's numbering of the job's card 2
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    assert calls(log)[-1] == "quit" and "MPS control daemon stopped" in out
    status = json.loads((run_dir / "status.json").read_text())
    start = contract.read_attempts(run_dir)[0]
    assert status["mps"] is True and start["mps"] is True
    assert not list(tmp_path.glob("decon-mps-777-0-*"))


def test_a_daemon_that_keeps_its_output_open_starts_and_is_quit(tmp_path, monkeypatch):
    """The real daemon backgrounds a server holding the stdout it inherited: its output goes
    to a file, so the start neither waits for the server to end nor takes it for a failure."""
    log = install_fake_mps(monkeypatch, tmp_path / "bin", start=BACKGROUNDS)
    monkeypatch.setattr(mps, "CALL_TIMEOUT_S", 3.0)
    daemon = mps.start_mps("55-0", base=str(tmp_path))
    assert daemon.active, daemon.reason
    assert (daemon.root / mps.DAEMON_OUTPUT).read_text() == "daemon up\n"
    pipe = Path(daemon.env()[mps.PIPE_ENV])
    assert (pipe / "control").exists()  # the live daemon's folder is kept while it runs
    daemon.stop()
    assert calls(log)[-1] == "quit" and not pipe.exists()


@pytest.mark.parametrize(("visible", "clients"), [("2", "0"), ("1,3", "0,1"), ("GPU-8a1b", "0")])
def test_the_runs_see_the_jobs_card_as_the_server_numbers_it(
    tmp_path, monkeypatch, visible, clients
):
    """The daemon starts with SLURM's CUDA_VISIBLE_DEVICES; its clients get the server's
    numbering (from 0); without MPS the runs keep the job's value."""
    log = install_fake_mps(monkeypatch, tmp_path / "bin")
    monkeypatch.setenv(mps.VISIBLE_ENV, visible)
    daemon = mps.start_mps("9-0", base=str(tmp_path), thread_percentage=40)
    assert daemon.active, daemon.reason
    assert log.read_text().splitlines()[0].endswith(f"visible={visible}")
    env = child_env(2, 2, require_gpu=True, mps=daemon.env())
    assert env[mps.VISIBLE_ENV] == clients and env[mps.THREADS_ENV] == "40"
    daemon.stop()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    without = child_env(2, 2, require_gpu=True, mps=mps.start_mps("9-1", base=str(tmp_path)).env())
    assert without[mps.VISIBLE_ENV] == visible and mps.THREADS_ENV not in without


def test_the_profiles_thread_percentage_reaches_the_jobs_daemon(tmp_path, monkeypatch):
    """From the resource profile to the job (and its requeue), checked where it loads."""
    from deconcnn_cli.sweep.profiles import ResourceProfile

    base = {"name": "p", "executor": "slurm", "mps": True}
    assert ResourceProfile(**base, mps_active_thread_percentage=50).mps_active_thread_percentage
    for bad in ({"mps_active_thread_percentage": 0}, {"mps_active_thread_percentage": 101}):
        with pytest.raises(ValueError, match="mps_active_thread_percentage"):
            ResourceProfile(**base, **bad)
    with pytest.raises(ValueError, match="mps is false"):
        ResourceProfile(**{**base, "mps": False}, mps_active_thread_percentage=50)
    install_fake_mps(monkeypatch, tmp_path / "bin")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    seen = []
    monkeypatch.setattr(job, "_start", lambda d, t, share, **env: seen.append(env["mps"]))
    monkeypatch.setattr(job, "_wait_children", lambda children, timeout, **kw: [])
    group = RunGroup([str(tmp_path / "a")], 3, mps=True, mps_thread_percentage=30)
    with pytest.raises(RuntimeError, match="runs not finished"):
        group()
    assert seen[0][mps.THREADS_ENV] == "30"
    group._children = []  # the fakes started nothing
    requeued = group.checkpoint().function  # submitit's hook: the requeued job's group
    assert requeued.mps and requeued.mps_thread_percentage == 30
