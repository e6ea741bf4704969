"""A stop inside an evaluation (issue 24): abandoned unwritten, checkpointed from before it,
repeated by the resume at the same step, streams identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deconcnn_cli.contract import read_events, read_json, read_stream
from deconcnn_cli.training.checkpoint import list_checkpoints, load_latest_checkpoint
from tests.conftest import REPO, TINY, only_run, run_cli, subprocess_env

STREAMS = ("step", "val", "curvature", "noise", "shape")
# one epoch of a half-width model at 8x8 pixels: its cold step-0 curvature (40 HVPs at most,
# a tolerance it does not reach) takes seconds on one CPU thread, its 13 steps about as long;
# no other curvature in the run
WIDE = [
    *TINY,
    "--set", "model.width_mult=0.5",
    "--set", "schedule.epochs=1",
    "--set", "cadence.curvature_every_steps=1000",
    "--set", "analysis.lanczos_tol=1e-6",
]  # fmt: skip
ARGS = ["train", "--variant", "base", "--seed", "3"]


def _streams(run: Path) -> dict[str, str]:
    return {
        name: (run / "metrics" / f"{name}.csv").read_text()
        for name in STREAMS
        if (run / "metrics" / f"{name}.csv").exists()
    }


def _wait_for_action(root: Path, proc: subprocess.Popen, action: str) -> Path:
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "timed out"
        runs = [p for p in root.iterdir() if p.is_dir()]
        if runs and (read_json(runs[0] / "status.json") or {}).get("action") == action:
            return runs[0]
        time.sleep(0.02)


@pytest.fixture(scope="module")
def wide_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wide")
    proc = run_cli(*ARGS, *WIDE, "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    return only_run(root)


def test_sigterm_inside_the_step0_curvature_then_resume_is_identical(
    wide_reference: Path, tmp_path: Path
):
    proc = subprocess.Popen(
        [sys.executable, "-m", "deconcnn_cli", *ARGS, *WIDE, "--root", str(tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    run = _wait_for_action(tmp_path, proc, "curvature")
    time.sleep(1.0)  # inside the graph build or a Hessian-vector product
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    status = read_json(run / "status.json")
    assert (status["state"], status["step"], status["last_checkpoint_step"]) == (
        "interrupted", 0, 0
    )  # fmt: skip
    assert status["action"] is None and "SIGTERM" in status["reason"]
    assert [s for s, _ in list_checkpoints(run)] == [0]
    assert read_stream(run / "metrics" / "curvature.csv") == []  # nothing of it written
    cut = [e for e in read_events(run) if "cut short" in e["message"]]
    assert [(e["action"], e["at_step"]) for e in cut] == [("curvature", 0)]

    resumed = run_cli("train", "--run-dir", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert _streams(run) == _streams(wide_reference)
    assert len(read_stream(run / "metrics" / "curvature.csv")) == 1  # repeated at step 0
    cut = [e for e in read_events(run) if "cut short" in e["message"]]
    assert len(cut) == 1  # kept by the resume that repeated the evaluation


# ---- in-process: the evaluations after a step, and the second Ctrl-C


def _cfg():
    from deconcnn_cli.config import load_run_config

    return load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=["data.image_size=8"],
        flags={"seed": 3},
    )


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    run = tmp_path_factory.mktemp("tiny") / "run"
    prepare_run_dir(_cfg(), run)
    assert train_run(_cfg(), run).state == "completed"
    return run


def _signal_self_during(mocker, target: str, *, at_call: int, signals: int = 1):
    """Patch ``_Run.<target>`` so that its ``at_call``-th call (from 1) gets a SIGTERM (or
    ``signals`` SIGINTs) from this process before it runs, as a user's would arrive."""
    from deconcnn_cli.training.attempt import Attempt as _Run

    original = getattr(_Run, target)
    calls = []

    def wrapped(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == at_call:
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGTERM if signals == 1 else signal.SIGINT)
                time.sleep(0.01)  # the handler runs at the next bytecode
        return original(self, *args, **kwargs)

    mocker.patch.object(_Run, target, wrapped)
    return calls


@pytest.mark.parametrize(
    ("target", "at_call", "pending"),
    [
        ("validate", 4, ["validation", "noise", "shape"]),  # the epoch end: all three follow
        ("measure_noise", 1, ["noise", "shape"]),  # the validation before it is kept
    ],
)
def test_a_stop_inside_an_after_step_evaluation_is_repeated_by_the_resume(
    tiny_reference: Path, tmp_path: Path, mocker, target: str, at_call: int, pending: list[str]
):
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    calls = _signal_self_during(mocker, target, at_call=at_call)
    cfg, run = _cfg(), tmp_path / "run"
    prepare_run_dir(cfg, run)
    result = train_run(cfg, run)
    step = calls[-1][0]
    assert step == 12  # the end of epoch 1 (13 steps an epoch)
    assert (result.state, result.steps_done, result.signal_number) == (
        "interrupted", step + 1, signal.SIGTERM
    )  # fmt: skip
    state, _ = load_latest_checkpoint(run)
    assert state is not None and state["next_step"] == step + 1
    assert state["pending"]["step"] == step and state["pending"]["actions"] == pending
    for name in ("noise", "shape"):  # the abandoned evaluations wrote nothing
        assert read_stream(run / "metrics" / f"{name}.csv") == []
    mocker.stopall()
    assert train_run(cfg, run).state == "completed"
    assert _streams(run) == _streams(tiny_reference)


def test_a_second_sigint_ends_the_run_at_once_without_a_checkpoint(
    tiny_reference: Path, tmp_path: Path, mocker
):
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    _signal_self_during(mocker, "train_step", at_call=6, signals=2)
    cfg, run = _cfg(), tmp_path / "run"
    prepare_run_dir(cfg, run)
    result = train_run(cfg, run)
    assert (result.state, result.exit_code) == ("interrupted", 128 + signal.SIGINT)
    status = read_json(run / "status.json")
    assert status["state"] == "interrupted" and "second SIGINT" in status["reason"]
    assert status["last_checkpoint_step"] is None and list_checkpoints(run) == []
    assert any("second SIGINT" in e["message"] for e in read_events(run))
    ends = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert ends[-1]["state"] == "interrupted" and ends[-1]["exit_code"] == 130
    mocker.stopall()
    assert train_run(cfg, run).state == "completed"  # from the start: streams cut back
    assert _streams(run) == _streams(tiny_reference)
