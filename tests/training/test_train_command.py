"""`decon train` exit codes at the edges: a precision refused on resume (2), a failure (1)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from deconcnn_cli.cli import app
from deconcnn_cli.config import load_run_config
from deconcnn_cli.contract import read_attempts
from deconcnn_cli.fileio import read_json
from deconcnn_cli.training.rundir import prepare_run_dir
from tests.conftest import run_cli


def _run_dir(tmp_path: Path) -> Path:
    cfg = load_run_config(variant="base", profiles=["smoke"], overrides=["data.image_size=8"])
    run = tmp_path / "run"
    prepare_run_dir(cfg, run)
    return run


def test_resume_in_a_precision_this_device_cannot_run_is_refused(tmp_path: Path):
    """A run that started in fp16 on a GPU, requeued onto a CPU-only node."""
    run = _run_dir(tmp_path)
    status = {"state": "interrupted", "step": 13, "precision": "fp16", "attempt": 1}
    (run / "status.json").write_text(json.dumps(status))
    proc = run_cli("train", "--run-dir", str(run), "-q")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "fp16" in proc.stderr and "hint: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert read_json(run / "status.json") == status  # nothing written
    assert not (run / "attempts.jsonl").exists()


def test_a_failing_run_exits_1_and_says_where_it_is_recorded(tmp_path: Path, mocker):
    run = _run_dir(tmp_path)
    mocker.patch(
        "deconcnn_cli.training.attempt.load_splits", side_effect=RuntimeError("NCCL went away")
    )
    res = CliRunner().invoke(app, ["train", "--run-dir", str(run), "-q", "--threads", "1"])
    assert res.exit_code == 1
    assert "error: run failed: RuntimeError: NCCL went away" in res.stderr
    assert "status.json" in res.stderr
    status = read_json(run / "status.json")
    assert status["state"] == "failed" and status["exception_type"] == "RuntimeError"
    assert read_attempts(run)[-1]["exit_code"] == 1


def test_quiet_prints_one_line_per_event_across_a_resume(tmp_path: Path):
    """--quiet in a job log: the resume point, each long evaluation's start and each epoch's
    end (it printed only the start and the end)."""
    from tests.conftest import TINY, run_cli

    root = tmp_path / "runs"
    first = run_cli("train", "-v", "base", *TINY, "--root", str(root), "--max-steps", "15")
    assert first.returncode == 3, first.stderr
    lines = first.stdout.splitlines()
    assert "curvature at step 0 ..." in lines
    assert any(ln.startswith("epoch 1 ended: step 13/39, loss ") for ln in lines), lines
    second = run_cli("train", "-v", "base", *TINY, "--root", str(root))
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    assert lines[1] == "resumed at step 15 (epoch 1.15)", lines
    ended = [ln.split(" ended:")[0] for ln in lines if " ended: step " in ln]
    assert ended == ["epoch 2", "epoch 3"]  # epoch 1 ended in the first attempt
    assert "curvature at step 20 ... (epoch 1.54)" in lines
    assert "gradient noise at epoch 2 ... (epoch 2.00)" in lines
