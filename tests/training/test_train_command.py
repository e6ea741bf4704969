"""`decon train` exit codes at the edges: a precision refused on resume (2), a failure (1)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from deconcnn_cli.cli import app
from deconcnn_cli.config import load_run_config, prepare_run_dir
from deconcnn_cli.contract import read_attempts
from deconcnn_cli.fileio import read_json
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
