"""decon validate: broken profiles fail, a variant over its memory figure fails, streams and
dynamics are judged from a real short run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deconcnn_cli import contract
from deconcnn_cli.sweep import validate as v
from deconcnn_cli.sweep.grid import grid_run_count
from deconcnn_cli.sweep.profiles import load_grid, load_resources
from tests.conftest import REPO
from tests.export.synthetic import write_run
from tests.factories import tiny_grid

ONE_GRID = tiny_grid("one", lr=(0.05, 0.1), seed=(0,))


def _resources(figure_gb: float) -> str:
    return f'executor = "local"\n[host_memory_gb_per_run]\nbase = {figure_gb}\n'


@pytest.fixture
def profiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of profiles/ with a one-run grid and a tight and a roomy resource profile."""
    dest = tmp_path / "profiles"
    shutil.copytree(REPO / "profiles", dest)
    (dest / "grids" / "one.toml").write_text(ONE_GRID)
    (dest / "resources" / "tight.toml").write_text(_resources(0.05))
    (dest / "resources" / "roomy.toml").write_text(_resources(64.0))
    monkeypatch.setenv("DECON_PROFILES", str(dest))
    return dest


def test_shipped_profiles_load_and_expand_to_their_counts():
    checks = {c.name: c for c in v.check_profiles()}
    assert all(c.status == v.PASS for c in checks.values()), checks
    assert checks["grid loss_lin_slope"].detail.startswith("216 runs")
    assert grid_run_count(load_grid("loss_lin_slope")) == 216


def test_a_broken_profile_fails_and_names_its_file(profiles: Path):
    (profiles / "resources" / "broken.toml").write_text('executor = "slurm"\nruns_per_gpu = 0\n')
    (profiles / "grids" / "bad.toml").write_text(ONE_GRID.replace("lr = [0.05, 0.1]", "lr = [-1]"))
    checks = {c.name: c for c in v.check_profiles()}
    assert checks["resources broken"].status == v.FAIL
    assert "broken.toml" in checks["resources broken"].detail
    assert checks["grid bad"].status == v.FAIL and "lr" in checks["grid bad"].detail
    assert checks["grid one"].status == v.PASS and v.failed(list(checks.values()))


def test_cli_exits_non_zero_on_a_broken_profile(profiles: Path):
    (profiles / "resources" / "broken.toml").write_text("executor = [\n")  # malformed TOML
    env = {**os.environ, "DECON_PROFILES": str(profiles), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deconcnn_cli", "validate", "--grid", "one", "--resources",
         "broken", "--json"],  # fmt: skip
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    bad = [c for c in report["checks"] if c["status"] == "fail"]
    assert {c["name"] for c in bad} == {"resources broken", "short runs"}


def test_cpu_probes_keep_each_variants_width():
    """Reduced on a CPU by one factor, so narrow's probe is still half of base's (a cap at
    one width made the two probes the same model and the same numbers)."""
    from deconcnn_cli.training.models import stage_widths

    spec = load_grid("loss_lin_slope")
    cpu = {n: v.probe_config(spec, n, steps=8, gpu=False)["model"] for n in spec.variants}
    gpu = {n: v.probe_config(spec, n, steps=8, gpu=True)["model"] for n in spec.variants}
    for name in spec.variants:
        assert cpu[name]["width_mult"] == pytest.approx(gpu[name]["width_mult"] / 8)
    assert cpu["narrow"]["width_mult"] == pytest.approx(cpu["base"]["width_mult"] / 2)
    assert stage_widths(cpu["narrow"]["width_mult"]) != stage_widths(cpu["base"]["width_mult"])


@pytest.fixture
def probe(profiles: Path, tmp_path: Path) -> v.ProbeResult:
    """One real short run of the one-run grid's base variant (CPU, reduced size)."""
    cfg = v.probe_config(load_grid("one"), "base", steps=14, gpu=False)
    assert cfg["optim"]["lr"] == 0.1  # the largest lr of the variant's axes
    return v.run_probe(cfg, tmp_path / "probe" / "base", 14, timeout_s=600)


def test_short_run_memory_streams_and_dynamics(probe: v.ProbeResult, tmp_path: Path):
    assert probe.state == contract.INTERRUPTED and probe.steps_done == 14
    assert 0.05 < probe.peak_rss_gb < 8  # torch alone takes well over 50 MB
    over = v.check_memory(probe, load_resources("tight"), gpu=False)
    assert [(c.name, c.status) for c in over] == [("base: host memory", v.FAIL)]
    assert "> 0.05 GB" in over[0].detail
    fits = v.check_memory(probe, load_resources("roomy"), gpu=False)
    assert fits[0].status == v.PASS
    assert v.check_streams(probe.run_dir)[0] == v.PASS
    assert v.check_dynamics(probe.run_dir, probe.state)[0] == v.PASS
    # a stream in the wrong format fails
    path = contract.stream_path(probe.run_dir, "curvature")
    path.write_text(path.read_text().replace("lambda_max", "lmax", 1))
    status, detail = v.check_streams(probe.run_dir)
    assert status == v.FAIL and "curvature.csv header" in detail


def test_projection_of_a_protocol_run_from_the_short_runs_own_costs(probe: v.ProbeResult):
    """Recomputed here from status.json's timing and the streams' row counts."""
    got = v.project_protocol_run(probe.run_dir, probe.n_val)
    status = json.loads((probe.run_dir / "status.json").read_text())
    t = status["timing"]
    rows = {
        k: len(contract.read_stream(contract.stream_path(probe.run_dir, k)))
        for k in ("curvature", "noise", "shape", "val")
    }
    timed = sum(t[f"{k}_s"] for k in ("curvature", "noise", "shape", "validation", "checkpoint"))
    step = (t["wall_s"] - timed) / status["step"]
    assert probe.n_val and got["step_s"] == pytest.approx(step)
    assert got["validation_s"] == pytest.approx(
        t["validation_s"] / rows["val"] * 5000 / probe.n_val
    )
    metrics = (
        36 * t["curvature_s"] / rows["curvature"]
        + 25 * t["noise_s"] / rows["noise"]
        + 50 * t["shape_s"] / rows["shape"]
    )
    assert got["checkpoint_s"] == pytest.approx(t["checkpoint_s"] / t["checkpoints"])
    rest = 17_600 * step + 200 * got["validation_s"] + 6 * got["checkpoint_s"]
    assert got["metrics_share"] == pytest.approx(metrics / rest)
    assert got["projected_min"] == pytest.approx((rest + metrics) / 60)


@pytest.mark.parametrize(
    "timing",
    [None, "abc", [], {"wall_s": "12.5"}, {"wall_s": float("nan")}, {"wall_s": True}],
)
def test_a_damaged_timing_gives_no_projection(tmp_path: Path, timing: object):
    """A status.json whose timing has the wrong types: no projection, never a traceback."""
    (tmp_path / "status.json").write_text(json.dumps({"step": 14, "timing": timing}))
    assert v.project_protocol_run(tmp_path, 100) is None


def test_wrong_typed_action_times_count_as_zero(probe: v.ProbeResult):
    path = probe.run_dir / "status.json"
    status = json.loads(path.read_text())
    good = v.project_protocol_run(probe.run_dir, probe.n_val)
    status["timing"]["noise_s"] = "fast"
    status["timing"]["checkpoints"] = None
    path.write_text(json.dumps(status))
    got = v.project_protocol_run(probe.run_dir, probe.n_val)
    assert got["noise_s"] == 0.0 and got["checkpoint_s"] == 0.0
    assert got["step_s"] >= good["step_s"]  # the noise time is no longer subtracted


def test_gpu_criteria_pass_warn_and_fail(probe: v.ProbeResult):
    """The rules, on a real short run's files standing in for two runs on one card."""
    two = [dataclasses.replace(probe, cuda_peak_reserved_gb=10.0, cuda_context_gb=0.5)] * 2
    proj = v.project_protocol_run(probe.run_dir, probe.n_val)
    ok = {c.name.split(": ")[1]: c for c in v.gpu_criteria("base", two, 48.0, 0.93)}
    assert set(ok) == set(v.GPU_CRITERIA)
    assert ok["GPU utilization"].status == v.PASS and "93%" in ok["GPU utilization"].detail
    assert ok["peak memory per run and card"].status == v.PASS
    assert "21.00 GB of a 48.0 GB card" in ok["peak memory per run and card"].detail
    wall = v.PASS if proj["projected_min"] < 30 else v.FAIL  # a CPU run: likely FAIL
    assert ok["projected 50-epoch run"].status == wall
    low = {c.name.split(": ")[1]: c for c in v.gpu_criteria("base", two, 16.0, 0.5)}
    assert low["GPU utilization"].status == v.WARN
    assert low["peak memory per run and card"].status == v.FAIL
    none = {c.name.split(": ")[1]: c for c in v.gpu_criteria("base", two, 48.0, None)}
    assert none["GPU utilization"].status == v.WARN  # not measured is never a pass


def test_cli_fails_on_a_variant_over_its_memory_figure(profiles: Path):
    env = {**os.environ, "DECON_PROFILES": str(profiles), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "deconcnn_cli", "validate", "--grid", "one", "--resources",
         "tight", "--steps", "8"],  # fmt: skip
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "base: host memory" in proc.stdout and "FAIL: 1 failed" in proc.stdout
    # the protocol's GPU criteria are never judged without a GPU
    assert proc.stdout.count("skipped: no GPU") == len(v.GPU_CRITERIA)
    # not a terminal: a line per check, as it is decided (no table drawn at the end)
    lines = proc.stdout.splitlines()
    assert any(ln.startswith("fail  base: host memory: ") for ln in lines), proc.stdout
    assert any(ln.startswith("pass  variant base: ") for ln in lines)
    assert "│" not in proc.stdout


def test_each_check_is_given_as_soon_as_it_is_decided(profiles: Path, tmp_path: Path):
    """The first variant's checks arrive before the second variant's short run starts."""
    (profiles / "grids" / "two.toml").write_text(
        ONE_GRID.replace('"one"', '"two"').replace('["base"]', '["base", "narrow"]')
    )
    seen: list[tuple[str, list[str]]] = []

    def on_check(check: v.Check) -> None:
        probes = sorted(p.name for d in tmp_path.glob("decon-validate-*") for p in d.iterdir())
        seen.append((check.name, probes))

    checks = v.validate("two", "roomy", steps=2, work_dir=tmp_path, on_check=on_check)
    assert [name for name, _ in seen] == [c.name for c in checks]  # each once, in order
    (base_trains,) = [p for name, p in seen if name.startswith("base (lr")]
    assert "base" in base_trains and "narrow" not in base_trains


def test_divergence_and_stalls_are_flagged(tmp_path: Path):
    diverged = write_run(tmp_path, "d", state="diverged", steps=40)
    assert v.check_dynamics(diverged, contract.DIVERGED)[0] == v.WARN
    flat = write_run(tmp_path, "f", steps=40, alpha=0.0)  # loss does not fall
    status, detail = v.check_dynamics(flat, contract.COMPLETED)
    assert status == v.WARN and detail.startswith("stalls")
    falling = write_run(tmp_path, "ok", steps=40, alpha=0.5)
    assert v.check_dynamics(falling, contract.COMPLETED)[0] == v.PASS


@pytest.mark.gpu
def test_gpu_probe_reports_cuda_peak_and_two_runs_per_card(tmp_path: Path):
    spec = load_grid("loss_lin_slope")
    cfg = v.probe_config(spec, "base", steps=4, gpu=True)
    cfg["device"] = "cuda"
    result = v.run_probe(cfg, tmp_path / "base", 4, timeout_s=600)
    assert result.cuda_peak_allocated_gb and result.cuda_peak_allocated_gb > 0.05
    checks = v.check_memory(result, load_resources("rtx8000"), gpu=True)
    names = [c.name for c in checks]
    assert names == ["base: GPU memory", "base: 2 runs per card"]
