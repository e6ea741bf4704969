"""The job side without a scheduler: what it pickles, its attempt cap, its child command."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from deconcnn_cli.runenv import GPU_SHARE_ENV, child_env
from deconcnn_cli.sweep import job
from deconcnn_cli.sweep.job import RunGroup, needs_start, train_command
from tests.conftest import complete_words
from tests.sweep.fakes import start_job_on_a_long_run


def test_run_group_pickles_without_its_processes(tmp_path):
    group = RunGroup([str(tmp_path / "a"), str(tmp_path / "b")], max_attempts=3, grace_s=7.0)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    group._children = [proc]  # type: ignore[list-item]
    back = pickle.loads(pickle.dumps(group))
    proc.wait()
    assert back.run_dirs == group.run_dirs and back.max_attempts == 3 and back.grace_s == 7.0
    assert back._children == []


def test_a_job_restarted_past_the_cap_stops_with_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    with pytest.raises(RuntimeError, match="attempt cap reached: this job started 4 times"):
        RunGroup([str(tmp_path)], max_attempts=3)()


def test_child_command_and_start_rule(tmp_path):
    cmd = train_command(tmp_path / "r", 4)
    assert cmd[1:] == [
        "-m", "deconcnn_cli", "train", "--run-dir", str(tmp_path / "r"), "--quiet",
        "--threads", "4",
    ]  # fmt: skip
    assert needs_start(tmp_path) == "no config.json"


def test_the_runs_of_a_gpu_job_are_told_how_many_share_its_gpu(tmp_path, monkeypatch):
    """The children are faked at the process boundary (``_start``): no GPU here."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text("{}")
    started = []
    monkeypatch.setattr(job, "_start", lambda d, threads, share, **env: started.append((d, share)))
    monkeypatch.setattr(job, "_wait_children", lambda children, timeout: None)
    with pytest.raises(RuntimeError, match="runs not finished"):  # the fakes train nothing
        RunGroup([str(d) for d in dirs], max_attempts=3)()
    assert started == [(dirs[0], 2), (dirs[1], 2)]
    assert child_env(4, 2)[GPU_SHARE_ENV] == "2" and child_env(4)[GPU_SHARE_ENV] == "1"


def test_completes_grid_and_resource_names():
    assert complete_words("decon submit --grid ") == ["demo", "loss_lin_slope", "smoke"]
    assert complete_words("decon submit --resources r") == ["rtx8000", "rtx8000_singularity"]
    assert "submit" in complete_words("decon su")


def test_sigterm_saves_the_runs_and_the_job_exits_without_a_result(tmp_path):
    """What an external requeue or a cancel looks like to the job: SIGTERM. The run
    checkpoints, and the job exits 143 instead of returning or raising (a result would tell
    submitit the job is over while SLURM requeues it)."""
    import signal

    from deconcnn_cli import contract

    job, run_dir = start_job_on_a_long_run(tmp_path)
    job.send_signal(signal.SIGTERM)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 143, out
    assert "SIGTERM: the runs saved" in out and "Traceback" not in out
    view = contract.view_run(run_dir)
    assert view.state == "interrupted" and view.reason == "signal SIGTERM"
    assert view.status["last_checkpoint_step"] == view.steps_done > 0
