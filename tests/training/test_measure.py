"""The loop's glue to the analysis core: empty vs nan cells, lr time, the run summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deconcnn_cli.config import load_run_config
from deconcnn_cli.contract import STREAMS, read_events, read_stream, read_summary
from deconcnn_cli.training import measure
from deconcnn_cli.training.writer import RunWriter
from tests.conftest import TINY, only_run, run_cli

SPE = 352
REL_TOL_EXPONENT = 0.03  # as in tests/analysis/test_powerlaw.py
KNEE_STEP_REL_TOL = 0.25  # the protocol's knee location tolerance
SUMMARY_KEYS = {
    "state",
    "steps_done",
    "epochs_done",
    "final_loss_train_nats",
    "final_acc_train",
    "final_loss_val_nats",
    "final_acc_val",
    "best_val_ce",
    "best_val_epoch",
    "burn_in_step",
    "burn_in_loss",
    "alpha_early",
    "alpha_early_r2",
    "alpha_full",
    "power_law_r2",
    "power_law_rmse",
    "alpha_early_lr",
    "alpha_full_lr",
    "power_law_r2_lr",
    "knee_epoch",
    "knee_censored",
    "precision",
    "attempts",
    "analysis_settings",
    "alpha_early_se",
    "alpha_full_se",
    "alpha_early_lr_se",
    "alpha_full_lr_se",
}


def _cfg(epochs: int = 50):
    return load_run_config(variant="base", flags={"schedule": {"epochs": epochs}})


def _protocol_curve(seed: int = 0, knee_step: int | None = None, clock: str = "lr") -> list[float]:
    """A power law (exponent 0.4) in lr time under the protocol's schedule, or in step time
    (``t = step + 1``), 10% noise; with ``knee_step``, the exponent turns to 0.9 there."""
    cfg = _cfg()
    tau = np.cumsum(measure.lr_per_step(cfg, SPE, 50 * SPE))
    tau = np.maximum(tau, tau[1]) if clock == "lr" else np.arange(1.0, tau.size + 1) / 200
    loss = 3.0 * tau**-0.4
    if knee_step is not None:
        after = np.arange(tau.size) >= knee_step
        loss[after] = 3.0 * tau[knee_step] ** -0.4 * (tau[after] / tau[knee_step]) ** -0.9
    noise = np.exp(0.1 * np.random.default_rng(seed).standard_normal(tau.size))
    return list(loss * noise)


def test_not_defined_yet_is_empty_and_failure_is_nan_with_reason(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    cfg = _cfg()
    early_curve = [2.3] * (3 * SPE)  # epoch 3, loss never near 1 nat: nothing is defined yet
    row = measure.guarded(writer, "shape", 3 * SPE - 1, measure.shape_row, early_curve, cfg, SPE)
    defined = {k for k, v in row.items() if v is not None}
    assert defined == set()  # no burn-in, no window: every cell "not defined yet"
    writer.streams["shape"].append([{**row, "step": 3 * SPE - 1, "epoch": 3}])
    # negative loss: the fit raises, the guard logs NaN + reason, training would continue
    bad = measure.guarded(writer, "shape", 4 * SPE - 1, measure.shape_row, [-1.0] * 10, cfg, SPE)
    writer.streams["shape"].append([{**bad, "step": 4 * SPE - 1, "epoch": 4}])
    first, second = read_stream(writer.streams["shape"].path)
    cols = [c for c in STREAMS["shape"] if c not in ("step", "epoch")]
    assert all(first[c] == "" for c in cols)
    assert all(second[c] == "nan" for c in cols)
    (event,) = read_events(tmp_path)
    assert event["step"] == 4 * SPE - 1 and "shape metrics failed" in event["message"]
    assert "loss must be >= 0" in event["message"]


def test_shape_row_fills_lr_time_and_knee_columns() -> None:
    cfg = _cfg()
    row = measure.shape_row(_protocol_curve(), cfg, SPE)
    assert set(row) == set(STREAMS["shape"]) - {"step", "epoch"}
    assert row["alpha_full_lr"] == pytest.approx(0.4, rel=REL_TOL_EXPONENT)
    assert row["alpha_early_lr"] == pytest.approx(0.4, rel=REL_TOL_EXPONENT)
    assert row["power_law_r2_lr"] > row["power_law_r2"]
    # a pure power law in lr time bends in step time: the (step-time) knee sees the schedule
    assert row["knee_censored"] == 0 and row["knee_epoch"] is not None


def test_lr_per_step_is_the_logged_schedule(tmp_path: Path) -> None:
    proc = run_cli("train", "--variant", "base", *TINY, "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    run = only_run(tmp_path)
    rows = read_stream(run / "metrics" / "step.csv")
    cfg = load_run_config(variant="base", profiles=["smoke"], overrides=["data.image_size=8"])
    spe = 13  # digits: 1617 training images / 128
    logged = np.array([float(r["lr"]) for r in rows])
    np.testing.assert_allclose(measure.lr_per_step(cfg, spe, len(rows)), logged, rtol=1e-12)
    summary = read_summary(run)
    assert set(summary) == SUMMARY_KEYS
    # the smoke profile's own windows, as the run used them
    assert summary["analysis_settings"]["alpha_early_epochs"] == list(
        cfg.analysis.alpha_early_epochs
    )
    assert summary["analysis_settings"]["burn_in_ce_nats"] == cfg.analysis.burn_in_ce_nats
    assert summary["final_acc_train"] == float(rows[-1]["acc_train"])
    assert summary["knee_censored"] in (None, True, False)
    # the edge of stability: lambda_max (+ coupled wd) x the step's scheduled lr / 2(1 + beta)
    curv = read_stream(run / "metrics" / "curvature.csv")
    assert curv and cfg.optim.name == "sgd" and not cfg.optim.nesterov
    lr_at = {int(r["step"]): float(r["lr"]) for r in rows}
    for r in curv:
        expected = (
            (float(r["lambda_max"]) + cfg.optim.weight_decay)
            * lr_at[int(r["step"])]
            / (2 * (1 + cfg.optim.momentum))
        )
        assert float(r["sharpness_norm"]) == pytest.approx(expected, rel=1e-12)
    assert any(lr_at[int(r["step"])] != cfg.optim.lr for r in curv)  # scheduled, not the peak
    # smoke: burn-in at 2 nats is reached within 3 epochs, alpha_full/_lr are defined
    shape = read_stream(run / "metrics" / "shape.csv")
    assert summary["burn_in_step"] == int(shape[-1]["burn_in_step"])
    assert summary["alpha_full_lr"] == pytest.approx(float(shape[-1]["alpha_full_lr"]))


def _write_synthetic_run(tmp_path: Path, losses: list[float], cfg) -> RunWriter:
    writer = RunWriter(tmp_path)
    writer.streams["step"].append(
        [
            {"step": s, "epoch": (s + 1) / SPE, "loss_train_nats": v, "acc_train": 0.5}
            for s, v in enumerate(losses)
        ]
    )
    val = [(e, 1.0 + (e - 30) ** 2 / 900) for e in range(1, 51)]  # best at epoch 30
    writer.streams["val"].append(
        [{"step": e * SPE - 1, "epoch": float(e), "loss_val_nats": v} for e, v in val]
    )
    return writer


def test_summary_of_a_synthetic_run_recovers_known_values(tmp_path: Path) -> None:
    cfg = _cfg()
    knee_step = 40 * SPE  # the late break, in a step-time power law
    losses = _protocol_curve(seed=3, knee_step=knee_step, clock="step")
    writer = _write_synthetic_run(tmp_path, losses, cfg)
    summary = measure.write_summary(writer, cfg, "completed", len(losses), SPE, losses)
    assert set(summary) == SUMMARY_KEYS
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["best_val_ce"] == 1.0 and summary["best_val_epoch"] == 30.0
    # each exponent with its standard error: positive, and far below the exponent itself
    for key in ("alpha_early", "alpha_full"):
        assert 0 < summary[f"{key}_se"] < 0.1 * summary[key]
    recorded = summary["analysis_settings"]  # what the fits above used, not the defaults' text
    assert recorded["alpha_early_epochs"] == list(cfg.analysis.alpha_early_epochs)
    assert recorded["burn_in_ce_nats"] == cfg.analysis.burn_in_ce_nats
    assert recorded["burn_in_smooth_window_steps"] == 89  # 352 // 4 = 88, made odd
    assert recorded["time_axes"] == ["step", "lr"]
    assert recorded["fit_bins"] == 20 and recorded["knee_min_bic_gain"] == 10.0
    assert summary["knee_censored"] is False
    assert summary["knee_epoch"] == pytest.approx(40, rel=KNEE_STEP_REL_TOL)
    assert summary["burn_in_loss"] <= cfg.analysis.burn_in_ce_nats
    assert isinstance(summary["burn_in_step"], int)
    assert summary["alpha_early"] == pytest.approx(0.4, rel=REL_TOL_EXPONENT)
    assert summary["alpha_full"] is not None and summary["alpha_full_lr"] is not None


def test_summary_of_a_diverged_run_uses_the_finite_curve(tmp_path: Path) -> None:
    cfg = _cfg()
    losses = _protocol_curve(seed=4)[: 20 * SPE] + [math.inf]
    writer = _write_synthetic_run(tmp_path, losses, cfg)
    summary = measure.write_summary(writer, cfg, "diverged", len(losses), SPE, losses)
    assert summary["alpha_full_lr"] == pytest.approx(0.4, rel=REL_TOL_EXPONENT)
    assert math.isnan(summary["final_loss_train_nats"])  # could not be computed: NaN, not null
    assert read_events(tmp_path) == []


def test_progress_says_what_runs_before_the_first_block(tmp_path: Path) -> None:
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    cfg = load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=["data.image_size=8", "cadence.flush_every_steps=4"],
    )
    prepare_run_dir(cfg, tmp_path / "r")
    seen = []
    train_run(cfg, tmp_path / "r", on_progress=seen.append, stop_after_steps=14)
    phases = [(p.steps_done, p.phase) for p in seen if p.phase]
    assert seen[0].phase.startswith("curvature at step 0: Lanczos ") and seen[0].total_steps == 39
    heads = [(n, phase.split(":")[0]) for n, phase in phases]  # without the progress counts
    assert heads[:2] == [(0, "curvature at step 0"), (0, "training ...")]
    assert (10, "curvature at step 10") in heads  # smoke: curvature every 10 steps
    assert (13, "gradient noise at epoch 1") in heads
    steps = [p for p in seen if not p.phase]
    assert steps[0].steps_done == 4 and all(math.isfinite(p.loss_train_nats) for p in steps)


def test_sharpness_is_not_defined_for_adamw_and_nan_when_lambda_failed() -> None:
    adamw = load_run_config(variant="adamw")
    assert adamw.optim.name == "adamw"
    assert measure.sharpness_cell(adamw, 120.0, 0.1) is None  # preconditioned: no threshold
    sgd = _cfg()
    assert math.isnan(measure.sharpness_cell(sgd, math.nan, 0.1))
    expected = (120.0 + sgd.optim.weight_decay) * 0.1 / (2 * (1 + sgd.optim.momentum))
    assert measure.sharpness_cell(sgd, 120.0, 0.1) == pytest.approx(expected, rel=1e-15)
