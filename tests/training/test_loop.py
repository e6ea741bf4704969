"""A real 3-epoch CPU run of `decon train` and the exact contents of its run directory."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest

from deconcnn_cli.config import load_run_config, run_id
from deconcnn_cli.contract import read_attempts, read_stream
from deconcnn_cli.training.schedule import lr_factor, val_steps_in_epoch
from deconcnn_cli.training.signals import StopSignals
from tests.conftest import TINY, run_cli

SPE = 13  # digits: 1797 images, 180 held out -> 1617 train -> ceil(1617 / 128) = 13
EPOCHS = 3
TOTAL = SPE * EPOCHS
CURV_EVERY = 10  # smoke profile's scaled curvature cadence


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    args = ["train", "--variant", "base", *TINY, "--lr", "0.1", "--wd", "1e-3", "--seed", "0"]
    proc = run_cli(*args, "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    cfg = load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=["data.image_size=8"],
        flags={"optim": {"lr": 0.1, "weight_decay": 1e-3}, "seed": 0},
    )
    path = root / run_id(cfg)
    assert str(path) in proc.stdout  # the command says where its results are
    return path


def _col(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def test_every_step_logged_once_with_bits_and_schedule(run_dir: Path):
    rows = read_stream(run_dir / "metrics" / "step.csv")
    assert [int(r["step"]) for r in rows] == list(range(TOTAL))
    for r in rows:
        assert float(r["loss_train_bits"]) == pytest.approx(
            float(r["loss_train_nats"]) / math.log(2), rel=1e-12
        )
        assert 0.0 <= float(r["acc_train"]) <= 1.0
        assert float(r["wd"]) == 1e-3
    cfg_warmup = 1.0  # smoke profile: 1 warmup epoch
    warm = round(cfg_warmup * SPE)
    for r in rows:
        s = int(r["step"])
        if s < warm:
            expected = 0.1 * s / warm
        else:
            expected = 0.1 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (TOTAL - warm)))
        assert float(r["lr"]) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert float(rows[0]["lr"]) == 0.0  # warmup starts from 0


def test_validation_four_times_per_epoch_last_at_epoch_end(run_dir: Path):
    rows = read_stream(run_dir / "metrics" / "val.csv")
    expected = sorted(e * SPE + p for e in range(EPOCHS) for p in val_steps_in_epoch(SPE, 4))
    assert [int(r["step"]) for r in rows] == expected
    assert len(rows) == 4 * EPOCHS
    assert [float(r["epoch"]) for r in rows][3::4] == [1.0, 2.0, 3.0]
    assert all(math.isfinite(v) and v > 0 for v in _col(rows, "loss_val_nats"))
    assert all(v > 0 for v in _col(rows, "grad_norm")) and all(
        v > 0 for v in _col(rows, "weight_norm")
    )


def test_curvature_noise_shape_at_their_cadences(run_dir: Path):
    curv = read_stream(run_dir / "metrics" / "curvature.csv")
    assert [int(r["step"]) for r in curv] == list(range(0, TOTAL, CURV_EVERY))
    assert all(math.isfinite(v) for v in _col(curv, "lambda_max"))
    assert all(v > 0 for v in _col(curv, "hutch_trace_sem"))
    noise = read_stream(run_dir / "metrics" / "noise.csv")  # smoke: every epoch
    assert [int(r["step"]) for r in noise] == [SPE - 1, 2 * SPE - 1, 3 * SPE - 1]
    assert all(v > 0 for v in _col(noise, "grad_noise_trace"))
    shape = read_stream(run_dir / "metrics" / "shape.csv")
    assert [int(r["step"]) for r in shape] == [SPE - 1, 2 * SPE - 1, 3 * SPE - 1]
    # smoke: alpha_early over epochs [1, 3): defined once epoch 3 is complete
    assert shape[-1]["alpha_early"] not in ("", "nan") and shape[0]["alpha_early"] == ""


def test_status_summary_and_attempts(run_dir: Path):
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == TOTAL
    assert status["attempt"] == 1 and status["precision"] == "fp32"
    summary = json.loads((run_dir / "summary.json").read_text())
    val = read_stream(run_dir / "metrics" / "val.csv")
    best = min(val, key=lambda r: float(r["loss_val_nats"]))
    assert summary["best_val_ce"] == float(best["loss_val_nats"])
    assert summary["best_val_epoch"] == float(best["epoch"])
    assert summary["state"] == "completed" and summary["steps_done"] == TOTAL
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["run_id"] == run_dir.name
    start, end = read_attempts(run_dir)  # one attempt: its start line and its end line
    assert start["attempt"] == end["attempt"] == 1 and start["resumed_from_step"] == 0
    assert (end["event"], end["state"], end["steps_done"], end["exit_code"]) == (
        "end",
        "completed",
        TOTAL,
        0,
    )


def test_rerunning_a_completed_run_changes_nothing(run_dir: Path):
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli("train", "--run-dir", str(run_dir), "--quiet")
    assert proc.returncode == 0 and "already completed" in proc.stdout
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


def test_lr_factor_and_val_positions_units():
    assert lr_factor(0, warmup_steps=10, total_steps=100) == 0.0
    assert lr_factor(10, warmup_steps=10, total_steps=100) == 1.0
    assert lr_factor(55, warmup_steps=10, total_steps=100) == pytest.approx(0.5)
    assert lr_factor(5, warmup_steps=0, total_steps=10) == pytest.approx(0.5)
    assert val_steps_in_epoch(352, 4) == {87, 175, 263, 351}
    assert val_steps_in_epoch(13, 4) == {3, 6, 9, 12}


def test_train_command_on_cifar_format_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real torchvision CIFAR-10 loader, through `decon train`, on generated files."""
    from typer.testing import CliRunner

    from deconcnn_cli.cli import app
    from tests.training.cifar_fixture import patch_cifar10_checksums, write_cifar10_fixture

    data = write_cifar10_fixture(tmp_path / "data", n_per_batch=40)  # 200 train images
    patch_cifar10_checksums(monkeypatch, data)
    root = tmp_path / "runs"
    args = ["train", "-v", "base", "-p", "smoke", "--dataset", "cifar10", "--data-dir", str(data)]
    args += ["--epochs", "1", "--set", "schedule.warmup_epochs=0.5", "--root", str(root), "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (run,) = list(root.iterdir())
    steps = read_stream(run / "metrics" / "step.csv")
    assert len(steps) == 2  # 180 train images (20 held out) / batch 128 -> 2 steps
    assert json.loads((run / "config.json").read_text())["config"]["data"]["dataset"] == "cifar10"


def test_stop_signal_handlers_restored_or_kept_after_the_run():
    """``train_run`` restores the caller's handlers; ``decon train`` (keep) ignores the stop
    signals once the run has ended, so a SIGTERM while the process exits (interpreter
    shutdown included) cannot turn a completed run's exit 0 into -15."""
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        restored = StopSignals()
        with restored.installed():
            assert signal.getsignal(signal.SIGUSR2) is not previous
        assert signal.getsignal(signal.SIGUSR2) is previous
        kept = StopSignals()
        with kept.installed(keep=True):
            pass
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR2)  # the default action would end this process
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGUSR2, previous)
