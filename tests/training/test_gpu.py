"""CUDA path: mixed precision chosen by the hardware, recorded, and resumable. Runs only
where a CUDA device is visible (deselected elsewhere, with a note; see conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY, only_run, run_cli

pytestmark = pytest.mark.gpu


def test_cuda_run_uses_amp_and_resumes(tmp_path: Path):
    expected = "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"  # native bf16
    args = ["train", "-v", "base", *TINY, "--device", "cuda"]
    stopped = run_cli(*args, "--root", str(tmp_path / "a"), "--max-steps", "20")
    assert stopped.returncode == 3, stopped.stderr
    run = only_run(tmp_path / "a")
    assert run_cli("train", "--run-dir", str(run), "-q").returncode == 0
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["precision"] == expected
    assert status["device"].startswith("cuda")
    assert status["device"] == "cuda:0" and status["optimizer_fused"] is True
    full = run_cli(*args, "--root", str(tmp_path / "b"))
    assert full.returncode == 0, full.stderr
    a = (run / "metrics" / "step.csv").read_text().splitlines()
    b = (only_run(tmp_path / "b") / "metrics" / "step.csv").read_text().splitlines()
    assert len(a) == len(b) == 40  # header + 39 steps, none doubled or missing after resume
    for name in ("step", "val", "curvature", "noise", "shape"):  # deterministic: exact replay
        resumed = (run / "metrics" / f"{name}.csv").read_bytes()
        assert resumed == (only_run(tmp_path / "b") / "metrics" / f"{name}.csv").read_bytes()


def test_two_runs_share_the_card_under_the_jobs_environment(tmp_path: Path):
    """DECON_GPU_SHARE=2 as a job sets it: the memory cap takes a device with its index."""
    env = {"DECON_GPU_SHARE": "2", "DECON_REQUIRE_GPU": "1"}
    args = ["train", "-v", "base", *TINY, "--root", str(tmp_path)]
    done = run_cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    events = (only_run(tmp_path) / "events.jsonl").read_text()
    assert "2 runs share this GPU" in events
