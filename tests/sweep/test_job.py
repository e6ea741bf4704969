"""The job side without a scheduler: what it pickles, its attempt cap, its child command."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from deconcnn_cli.sweep.job import RunGroup, needs_start, train_command
from tests.test_completion import _complete


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


def test_completes_grid_and_resource_names():
    assert _complete("decon submit --grid ") == ["loss_lin_slope", "smoke"]
    assert _complete("decon submit --resources r") == ["rtx8000"]
    assert "submit" in _complete("decon su")
