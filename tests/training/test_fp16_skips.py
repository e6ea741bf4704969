"""fp16 + GradScaler tells the truth: every skipped step is recorded with the loss scale, and a
run whose steps are skipped without end stops as diverged. The real loop, in process, on the
CPU, with torch's GradScaler on the CPU (the same class the CUDA path uses) and inf gradients
injected into chosen steps by a hook."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from deconcnn_cli.config import load_run_config
from deconcnn_cli.contract import TENSORBOARD_DIR
from deconcnn_cli.fileio import read_json, read_jsonl
from deconcnn_cli.training import attempt, fp16, loop
from deconcnn_cli.training.device import Precision
from deconcnn_cli.training.rundir import prepare_run_dir
from deconcnn_cli.training.setup import build_optimizer
from tests.tensorboard_check import read_scalars


class ScaledFp32(Precision):
    """fp16's GradScaler path, its arithmetic in fp32: fp16 autocast on a CPU is emulated and
    slow, and what is tested here is the scaler's bookkeeping, not fp16 rounding."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _run(
    tmp_path: Path,
    monkeypatch,
    bad_steps: set[int] | None,
    every_from: int | None = None,
    stops: tuple[int | None, ...] = (None,),
    tamper: bool = False,
):
    cfg = load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=[
            "data.image_size=8",
            "schedule.epochs=2",
            "cadence.curvature_every_steps=0",  # the metrics are not what is tested here
            "cadence.noise_every_epochs=0",
            "cadence.shape_every_epochs=0",
        ],
        flags={"seed": 0},
    )
    monkeypatch.setattr(attempt, "resolve_precision", lambda *a, **k: ScaledFp32("fp16", "cpu"))
    current: dict[str, int | None] = {"step": None}
    real_batch, real_build = attempt.train_batch, attempt.build_model

    def batch(splits, *, step, **kw):
        current["step"] = step
        return real_batch(splits, step=step, **kw)

    def poisoned(step: int | None) -> bool:
        if step is None:
            return False
        return step in (bad_steps or set()) or (every_from is not None and step >= every_from)

    def build(*a, **kw):
        model = real_build(*a, **kw)
        model.fc.weight.register_hook(
            lambda g: g * float("inf") if poisoned(current["step"]) else g
        )
        return model

    monkeypatch.setattr(attempt, "train_batch", batch)
    monkeypatch.setattr(attempt, "build_model", build)
    run_dir = tmp_path / "run"
    prepare_run_dir(cfg, run_dir)
    for i, stop in enumerate(stops):  # each a new attempt, resumed from the last checkpoint
        if i and tamper:  # between attempts, someone edits status.json's counters
            status = read_json(run_dir / "status.json")
            status.update(skipped_steps="abc", skipped_in_a_row=[1], optimizer_fused="no")
            (run_dir / "status.json").write_text(json.dumps(status))
        result = loop.train_run(cfg, run_dir, threads=1, stop_after_steps=stop)
    return result, read_json(run_dir / "status.json"), read_jsonl(run_dir / "events.jsonl")


def test_skipped_steps_are_recorded_with_the_scale(tmp_path, monkeypatch):
    result, status, events = _run(tmp_path, monkeypatch, {3, 4})
    assert result.state == "completed"
    skips = [e for e in events if "skipped" in e.get("message", "")]
    assert [s for e in skips for s in e["steps"]] == [3, 4]
    assert skips[-1]["loss_scale"] == 65536.0 / 4  # halved at each of the two skips
    assert status["skipped_steps"] == 2 and status["skipped_in_a_row"] == 0
    assert status["loss_scale"] > 0
    curves = read_scalars(tmp_path / "run" / TENSORBOARD_DIR)  # the same, in TensorBoard
    assert curves["train/skipped_steps"][-1][1] == 2.0
    assert curves["train/loss_scale"][-1][1] == status["loss_scale"]
    steps = [s for s, _ in curves["train/loss_scale"]]  # one per block, at its last step
    assert steps == sorted(set(steps)) and steps[-1] == curves["train/lr"][-1][0]


def test_a_resume_counts_each_skipped_step_once(tmp_path, monkeypatch):
    """Stopped after step 9 (checkpoint at 10) and resumed: steps 3-4 are not replayed, and
    the counters come back from the checkpoint, not from a status.json someone can edit."""
    result, status, _ = _run(tmp_path, monkeypatch, {3, 4}, stops=(10, None), tamper=True)
    assert result.state == "completed"
    assert status["skipped_steps"] == 2 and status["skipped_in_a_row"] == 0


def test_clean_fp16_run_records_no_skip(tmp_path, monkeypatch):
    result, status, events = _run(tmp_path, monkeypatch, None)
    assert result.state == "completed"
    assert status["skipped_steps"] == 0
    assert not [e for e in events if "skipped" in e.get("message", "")]


def test_endless_skips_stop_the_run_as_diverged(tmp_path, monkeypatch):
    monkeypatch.setattr(fp16, "MAX_SKIPPED_IN_A_ROW", 6)
    result, status, _ = _run(tmp_path, monkeypatch, None, every_from=5)
    assert result.state == "diverged"
    assert "6 fp16 steps in a row skipped" in result.reason
    assert status["state"] == "diverged" and result.steps_done == 11  # steps 5..10 skipped


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_choice_is_kept_for_the_whole_run(fused):
    """build_optimizer honours ``fused`` (the CUDA path's choice, recorded in status.json)."""
    cfg = load_run_config(variant="base", profiles=["smoke"], flags={})
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, model, fused=fused)
    assert bool(opt.defaults.get("fused")) is fused
