"""Kill -9 and resume: bit-identical streams and weights; corrupt checkpoints; divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deconcnn_cli.training.checkpoint import list_checkpoints, load_latest_checkpoint
from tests.conftest import REPO, TINY, only_run, run_cli

ARGS = ["train", "--variant", "base", *TINY, "--seed", "3"]
STREAMS = ("step", "val", "curvature", "noise", "shape")


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    state, _ = load_latest_checkpoint(run)
    assert state is not None
    return state["model"]


def _start(root: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "deconcnn_cli", *ARGS, "--root", str(root)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    proc = run_cli(*ARGS, "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    return only_run(root)


def test_sigkill_then_resume_is_bit_identical(reference: Path, tmp_path: Path):
    proc = _start(tmp_path)

    # kill once a checkpoint exists and the run has logged steps past it (mid-epoch 2)
    def past_checkpoint() -> bool:
        runs = [p for p in tmp_path.iterdir() if p.is_dir()]
        if not runs or not list_checkpoints(runs[0]):
            return False
        status = json.loads((runs[0] / "status.json").read_text())
        return status.get("step", 0) > list_checkpoints(runs[0])[0][0]

    _wait_for(past_checkpoint, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(tmp_path)
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # died mid-run

    resumed = run_cli("train", "--run-dir", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name in STREAMS:
        got = (run / "metrics" / f"{name}.csv").read_text()
        assert got == (reference / "metrics" / f"{name}.csv").read_text(), name
    ref_w, got_w = _final_weights(reference), _final_weights(run)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["attempt"] == 2
    attempts = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert attempts[1]["resumed_from_step"] > 0


def test_sigterm_checkpoints_and_exits_resumably(reference: Path, tmp_path: Path):
    proc = _start(tmp_path)
    _wait_for(
        lambda: any(
            p.is_dir() and (p / "metrics" / "step.csv").exists() for p in tmp_path.iterdir()
        ),
        proc,
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    run = only_run(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and "SIGTERM" in status["reason"]
    assert list_checkpoints(run)[0][0] == status["step"]  # checkpoint at the stop step
    assert run_cli("train", "--run-dir", str(run), "--quiet").returncode == 0
    for name in STREAMS:
        assert (run / "metrics" / f"{name}.csv").read_text() == (
            reference / "metrics" / f"{name}.csv"
        ).read_text(), name


def test_corrupt_newest_checkpoint_falls_back(reference: Path, tmp_path: Path):
    proc = run_cli(*ARGS, "--root", str(tmp_path), "--max-steps", "30")
    assert proc.returncode == 3, proc.stderr  # stopped on request, resumable
    run = only_run(tmp_path)
    (newest_step, newest), (older_step, _) = list_checkpoints(run)[:2]
    assert newest_step == 30 and older_step == 26
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum no longer matches
    newest.write_bytes(bytes(data))
    state, skipped = load_latest_checkpoint(run)
    assert state["next_step"] == older_step and "checksum" in skipped[0]
    assert run_cli("train", "--run-dir", str(run), "--quiet").returncode == 0
    for name in STREAMS:
        assert (run / "metrics" / f"{name}.csv").read_text() == (
            reference / "metrics" / f"{name}.csv"
        ).read_text(), name
    events = (run / "events.jsonl").read_text()
    assert "skipped checkpoint" in events


def test_huge_lr_is_recorded_as_diverged(tmp_path: Path):
    proc = run_cli(*ARGS, "--root", str(tmp_path), "--lr", "1e6")
    assert proc.returncode == 0, proc.stderr  # a result, not an error
    assert "diverged" in proc.stdout
    run = only_run(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "diverged" and "non-finite" in status["reason"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["state"] == "diverged"
    rows = (run / "metrics" / "step.csv").read_text().splitlines()
    assert rows[-1].split(",")[2] in ("nan", "inf", "-inf")  # the diverging step is kept
    assert int(rows[-1].split(",")[0]) == status["step"] - 1
    again = run_cli("train", "--run-dir", str(run), "--quiet")  # never retried
    assert again.returncode == 0 and "already diverged" in again.stdout
