"""The GPU figures of `decon validate` and bench/gpu_check.py: the job's card found through
CUDA_VISIBLE_DEVICES (NVML faked at its Python module, the library boundary: no GPU here),
figures counted after warm-up (a real short run on the CPU), and one verdict rule."""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path

import pytest

from deconcnn_cli import contract, fileio
from deconcnn_cli.config import load_run_config
from deconcnn_cli.sweep import gpu_figures as g
from deconcnn_cli.sweep import validate as v
from deconcnn_cli.training.rundir import prepare_run_dir

REPO = Path(__file__).resolve().parents[2]


def fake_nvml(utilization_by_card: list[int]) -> types.ModuleType:
    """``pynvml`` for a node of cards 0..n-1 whose UUIDs are GPU-000n-..., each busy at its
    own utilization (percent)."""
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: len(utilization_by_card)

    def by_index(i: int) -> tuple[str, int]:
        if not 0 <= i < len(utilization_by_card):
            raise RuntimeError(f"NVML: no card {i}")  # pynvml.NVMLError_InvalidArgument
        return ("card", i)

    nvml.nvmlDeviceGetHandleByIndex = by_index
    nvml.nvmlDeviceGetUUID = lambda h: f"GPU-000{h[1]}-aaaa-bbbb".encode()
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(
        gpu=utilization_by_card[h[1]]
    )
    return nvml


@pytest.mark.parametrize(
    ("visible", "card"),
    [(None, 0), ("2", 2), ("3,1", 3), ("GPU-0002-aaaa-bbbb", 2), ("GPU-0001", 1)],
)
def test_nvml_finds_the_card_cuda_visible_devices_names(visible, card):
    assert g.nvml_handle(fake_nvml([5, 6, 7, 8]), visible) == ("card", card)


@pytest.mark.parametrize("visible", ["", "GPU-9999"])
def test_a_value_naming_no_card_is_an_error(visible):
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        g.nvml_handle(fake_nvml([5, 6]), visible)


def test_the_sampler_measures_the_jobs_card_not_card_0(monkeypatch):
    """A job given card 2 of a node where card 0 is another job's, busy at 99%."""
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([99, 10, 60]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    with v.UtilizationSampler() as util:
        deadline = time.monotonic() + 30
        while len(util.samples) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert util.samples and util.mean == pytest.approx(0.60)


def test_no_sample_is_taken_before_every_run_is_warm(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([50]))
    with g.UtilizationSampler(gate=lambda: False) as util:
        time.sleep(0.5)
    assert util.mean is None and "no sample after warm-up" in util.error


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, dict, int]:
    """A real run on the CPU (curvature at step 0 and 12, validation 4x an epoch, a checkpoint
    every epoch) and its status.json as the watch saw it when past warm-up (at step 12)."""
    from deconcnn_cli.training.loop import train_run

    warmup = 12
    cfg = load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=[
            "data.image_size=8",
            "schedule.epochs=3",
            f"cadence.curvature_every_steps={warmup}",
            "cadence.flush_every_steps=4",
            "cadence.checkpoint_every_minutes=0",
        ],
        flags={"seed": 0},
    )
    run_dir = tmp_path_factory.mktemp("gpu") / "run"
    prepare_run_dir(cfg, run_dir)
    watch = g.WarmupWatch([run_dir], warmup)
    train_run(cfg, run_dir, threads=1, on_progress=lambda p: watch.poll())
    return run_dir, watch.snapshots[0], warmup


def test_figures_after_warm_up_leave_the_cold_start_out(short_run):
    """Recomputed from the two status.json: only what the run did after the snapshot."""
    run_dir, since, warmup = short_run
    assert since is not None and since["step"] == warmup
    end = fileio.read_json(run_dir / "status.json")
    t0, t1 = since["timing"], end["timing"]
    got = g.project_protocol_run(run_dir, 100, since)
    whole = g.project_protocol_run(run_dir, 100)
    assert got["from_step"] == warmup and whole["from_step"] == 0
    timed = ("curvature", "noise", "shape", "validation", "checkpoint")
    spent = sum(t1[f"{k}_s"] - t0[f"{k}_s"] for k in timed)
    step_s = (t1["wall_s"] - t0["wall_s"] - spent) / (end["step"] - warmup)
    assert got["step_s"] == pytest.approx(step_s)
    curvature = contract.read_stream(contract.stream_path(run_dir, "curvature"))
    warm = [r for r in curvature if int(r["step"]) >= warmup]
    assert 1 <= len(warm) < len(curvature)  # the step-0 evaluation is not among them
    assert got["curvature_s"] == pytest.approx((t1["curvature_s"] - t0["curvature_s"]) / len(warm))
    checkpoints = t1["checkpoints"] - t0["checkpoints"]
    assert checkpoints >= 1
    assert got["checkpoint_s"] == pytest.approx(
        (t1["checkpoint_s"] - t0["checkpoint_s"]) / checkpoints
    )


def test_a_snapshot_of_another_attempt_is_not_used(short_run):
    run_dir, since, _ = short_run
    later = {**since, "step": 10_000}  # not an earlier point of the run's last attempt
    assert g.project_protocol_run(run_dir, 100, later) == g.project_protocol_run(run_dir, 100)


def _gpu_check():
    """bench/gpu_check.py as a module (it puts the repo and bench/ on sys.path)."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.path[:] = path
    return module


@pytest.mark.parametrize(
    ("util", "share", "minutes", "held"),
    [(0.93, 0.04, 20.0, 10.0), (0.5, 0.07, 20.0, 10.0), (None, 0.12, 45.0, 30.0)],
)
def test_gpu_check_and_validate_give_the_same_verdicts(util, share, minutes, held):
    gc = _gpu_check()
    proj = {"steps_per_s": 9.0, "projected_min": minutes, "metrics_share": share}
    gc.RESULTS["variants"] = {
        "base": {
            "tag": "",
            "steps_per_s_two": 9.0,
            "utilization_two": util,
            "utilization_error": "",
            "held_gb_two": {"b": held, "c": held},
            "projection_two": proj,
            "events_c": [],
        }
    }
    gc.RESULTS["checks"] = []
    gc.verdicts()
    theirs = {c["criterion"]: c["verdict"].lower() for c in gc.RESULTS["checks"]}
    ours = dict(
        (f"base: {name}", verdict)
        for name, verdict, _ in g.judge(
            steps_per_s=[9.0, 9.0],
            utilization=util,
            memory_gb=[held, held],
            card_gb=48.0,
            projected_min=minutes,
            metrics_share=share,
        )
    )
    assert {k: theirs[k] for k in ours} == ours
    expected_util = "pass" if util and util > 0.8 else "warn"
    assert ours["base: GPU utilization"] == expected_util  # never FAIL in either tool
