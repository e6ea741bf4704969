"""decon report: H1/H2 equal scipy's numbers from the exported CSV; verdicts follow the data;
the HTML is one self-contained file; bad input is an error, not a traceback."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from deconcnn_cli.contract import read_attempts
from deconcnn_cli.export import caveats, stats
from deconcnn_cli.export.columns import SchemaError
from deconcnn_cli.export.files import read_results
from deconcnn_cli.export.outputs import export
from deconcnn_cli.export.report import build_report, hypothesis_tables
from tests.conftest import run_cli
from tests.export.synthetic import write_grid

TOL = 1e-9  # same data, same resamples: only float summation order may differ


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grid")
    write_grid(root, seeds=2, steps=200, steps_per_epoch=10, curvature_every=50)
    return root


@pytest.fixture(scope="module")
def built(grid: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_report(grid, tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def csv_rows(grid: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("export") / "results.csv"
    export(grid, out, timeseries=False)
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def _expected_h1(rows: list[dict[str, str]], variant: str | None) -> tuple[int, int, float, float]:
    sel = [r for r in rows if variant is None or r["variant"] == variant]
    r2 = [float(r["r_squared"]) for r in sel if r["status"] == "completed" and r["r_squared"]]
    k = sum(v >= 0.98 for v in r2)
    ci = sps.binomtest(k, len(r2)).proportion_ci(0.95, method="exact")
    return len(r2), k, ci.low, ci.high


def test_h1_equals_scipy_from_the_exported_csv(built, csv_rows):
    payload = json.loads(built.stats_json.read_text())
    h1 = {r["group"]: r for r in payload["h1"] if r["time_axis"] == "step"}
    assert set(h1) == {"all", "adamw", "base", "bn_off", "narrow"}
    for group, row in h1.items():
        n, k, low, high = _expected_h1(csv_rows, None if group == "all" else group)
        assert (row["n_runs"], row["n_power_law"]) == (n, k)
        assert row["ci_low"] == pytest.approx(low, abs=TOL)
        assert row["ci_high"] == pytest.approx(high, abs=TOL)
    assert h1["all"]["n_diverged"] == 6 and h1["all"]["n_excluded"] == 1  # bn_off lr 0.2; 1 missing


def test_h2_equals_scipy_from_the_exported_csv(built, csv_rows):
    payload = json.loads(built.stats_json.read_text())
    h2 = {r["group"]: r for r in payload["h2"] if r["time_axis"] == "step"}
    for group, row in h2.items():
        sel = [
            r
            for r in csv_rows
            if (group == "all" or r["variant"] == group)
            and r["status"] == "completed"
            and r["alpha_early"]
            and r["best_val_ce"]
        ]
        x = np.array([float(r["alpha_early"]) for r in sel])
        y = np.array([float(r["best_val_ce"]) for r in sel])
        ref = sps.spearmanr(x, y)
        assert row["n_runs"] == len(sel)
        assert row["rho"] == pytest.approx(ref.statistic, abs=TOL)
        assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-300)
        assert row["ci_method"] == "BCa"
        if group != "all":
            continue  # scipy's unvectorised bootstrap takes ~8 s a group: the overall one
        boot = sps.bootstrap(
            (x, y),
            lambda a, b: sps.spearmanr(a, b).statistic,
            paired=True,
            vectorized=False,
            n_resamples=stats.N_BOOTSTRAP,
            method="BCa",
            rng=np.random.default_rng(stats.BOOTSTRAP_SEED),
        )
        assert row["ci_low"] == pytest.approx(boot.confidence_interval.low, abs=1e-6)
        assert row["ci_high"] == pytest.approx(boot.confidence_interval.high, abs=1e-6)


def _frame(rows: list[dict[str, str]], tmp_path: Path, edit) -> object:
    rows = [dict(r) for r in rows]
    for i, r in enumerate(rows):
        edit(i, r)
    path = tmp_path / "edited.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return read_results(path)


def test_h1_verdict_flips_with_the_data(csv_rows, tmp_path: Path):
    good = _frame(csv_rows, tmp_path, lambda i, r: None)
    assert stats.h1_rows(good)[0].verdict == stats.SUPPORTED  # 65/65: CI low 0.945 > 0.90

    def poor_fits(i: int, r: dict[str, str]) -> None:
        if r["r_squared"] and i % 3 == 0:
            r["r_squared"] = "0.95"

    bad = _frame(csv_rows, tmp_path, poor_fits)
    row = stats.h1_rows(bad)[0]
    assert row.share < 0.75 and row.ci_high <= 0.9 and row.verdict == stats.NOT_SUPPORTED


def test_h2_verdict_flips_with_the_data(csv_rows, tmp_path: Path):
    strong = _frame(csv_rows, tmp_path, lambda i, r: None)
    row = stats.h2_rows(strong)[0]
    assert row.rho < -0.9 and row.verdict == stats.SUPPORTED
    rng = np.random.default_rng(3)

    def shuffle(i: int, r: dict[str, str]) -> None:
        if r["best_val_ce"]:
            r["best_val_ce"] = repr(float(rng.uniform(1.0, 2.0)))

    row = stats.h2_rows(_frame(csv_rows, tmp_path, shuffle))[0]
    assert abs(row.rho) < 0.3 and row.verdict == stats.NOT_SUPPORTED


def test_lr_time_rows_appear_only_where_the_columns_have_values(csv_rows, tmp_path: Path):
    df = _frame(csv_rows, tmp_path, lambda i, r: None)
    h1, h2 = hypothesis_tables(df)
    assert {r.time_axis for r in h1} == {"step"} and {r.time_axis for r in h2} == {"step"}

    def add_lr(i: int, r: dict[str, str]) -> None:
        if r["r_squared"]:
            r["r_squared_lr"] = "0.5"
            r["alpha_early_lr"] = repr(float(r["alpha_early"]) * 2) if r["alpha_early"] else ""

    h1, h2 = hypothesis_tables(_frame(csv_rows, tmp_path, add_lr))
    lr1 = [r for r in h1 if r.time_axis == "lr"]
    assert lr1[0].group == "all" and lr1[0].n_power_law == 0
    assert lr1[0].verdict == stats.NOT_SUPPORTED
    assert [r for r in h2 if r.time_axis == "lr"][0].rho < -0.9


def test_schema_check(csv_rows, tmp_path: Path):
    df = _frame(csv_rows, tmp_path, lambda i, r: None).drop(columns=["r_squared", "alpha_early"])
    with pytest.raises(SchemaError, match="^Missing required columns: r_squared"):
        hypothesis_tables(df)


def test_html_is_self_contained_with_every_figure(built):
    page = built.html.read_text()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing fetched
    images = re.findall(r'<img alt="([a-z0-9_]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [name for name, _ in images] == list(built.figures)
    assert len(images) == 6
    for name, data in images:
        png = base64.b64decode(data)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == built.figures[name].read_bytes()
    assert "supported" in page and "Clopper-Pearson" in page


def test_report_on_a_real_smoke_sweep_with_every_state(sweep: Path, tmp_path: Path):
    """The fixture's run directories are named `done`, `blown`... while their config.json
    holds the real run id, so `verify` calls them foreign: checked first (the report leaves
    a run that fails verification out of H1/H2, and says so), then read with --no-verify."""
    checked = tmp_path / "checked"
    proc = run_cli("report", "--root", str(sweep), "--out", str(checked))
    assert proc.returncode == 0, proc.stderr
    assert "warning: done fails verification: foreign" in proc.stderr
    payload = json.loads((checked / "report.json").read_text())
    assert any(w.startswith("done fails verification") for w in payload["warnings"])
    h1_all = payload["h1"][0]
    assert (h1_all["n_runs"], h1_all["n_excluded"], h1_all["n_diverged"]) == (0, 3, 1)
    # which runs each hypothesis left out, and why: on screen, in report.json, on the page
    why = {r["run_id"]: r["why"] for r in payload["excluded"]["H1 (step time)"]}
    assert why["done"].startswith("fails verification: foreign")
    assert why["blown"] == "diverged (counted apart)"
    assert why["broken"] == "failed: RuntimeError: boom" and why["absent"] == "missing"
    screen = proc.stdout.split("H2 (step time)")[0]  # under the H1 line
    assert "left out 4:" in screen and "broken: failed: RuntimeError: boom" in screen
    page = (checked / "report.html").read_text()
    assert "H1 (step time): 4 run(s) left out" in page and "RuntimeError: boom" in page
    # a 3-epoch sweep of 4 runs: the verdicts mean little, and the report says so
    notes = [ln for ln in proc.stdout.splitlines() if ln.startswith("note: ")]
    assert any(
        "too short: the runs trained at most 3 epochs (the protocol: 50)" in n for n in notes
    )
    assert any("too small for H1 (step time): 0 runs count" in n for n in notes)
    need = caveats.runs_for_h1_support()
    assert stats.clopper_pearson(need, need)[0] > stats.H1_TARGET  # 36 runs: the least
    assert stats.clopper_pearson(need - 1, need - 1)[0] <= stats.H1_TARGET
    assert "Read the verdicts with care" in page and f"that takes at least {need} runs" in page
    out = tmp_path / "rep"
    proc = run_cli("report", "--root", str(sweep), "--out", str(out), "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "fails verification" not in proc.stderr
    assert str(out / "report.html") in proc.stdout
    payload = json.loads((out / "report.json").read_text())
    assert payload["counts_by_status"] == {
        "completed": 1,
        "diverged": 1,
        "failed": 1,
        "missing": 1,
    }
    h2_all = payload["h2"][0]
    assert h2_all["verdict"] == stats.TOO_FEW and h2_all["rho"] is None
    assert math.isclose(payload["h1"][0]["n_runs"], 1)
    # the metrics' cost: the one completed run's recorded timing (the diverged one is left out)
    (timing,) = [a["timing"] for a in read_attempts(sweep / "runs" / "done") if "timing" in a]
    analysis = timing["curvature_s"] + timing["noise_s"] + timing["shape_s"]
    cost = payload["metrics_cost"]
    assert [(r["variant"], r["runs"]) for r in cost] == [("all", 1), ("base", 1)]
    assert cost[0]["overhead"] == pytest.approx(analysis / (timing["wall_s"] - analysis), 1e-9)
    assert cost[0]["analysis_h"] == pytest.approx(analysis / 3600, 1e-9)
    page = (out / "report.html").read_text()
    assert "Cost of the analysis metrics" in page and f"{cost[0]['overhead']:.2%}" in page


def test_a_sweep_without_recorded_timing_says_so(built):
    page = built.html.read_text()
    assert "No completed run has recorded its timing." in page
    payload = json.loads(built.stats_json.read_text())
    assert payload["metrics_cost"] == [
        {"variant": "all", "runs": 0, "analysis_h": 0.0, "rest_h": 0.0, "overhead": None}
    ]


def test_bad_root_is_an_error_not_a_traceback(tmp_path: Path):
    proc = run_cli("report", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cost_verdicts_follow_the_decided_budget():
    """METRICS.md: at most 10% of a run (the budget), a goal of 5%; ~7% is within budget."""
    from deconcnn_cli.export.report import budget_verdict

    assert [budget_verdict(x) for x in (0.03, 0.05, 0.0712, 0.10, 0.1001)] == [
        "on goal", "on goal", "within budget", "within budget", "over ceiling",
    ]  # fmt: skip
    assert budget_verdict(None) == "no data"


def test_report_replaces_links_and_never_writes_among_the_runs(grid: Path, tmp_path: Path):
    """A link where a figure goes is replaced, not written through (the file it points to
    stays as it was); --out among the runs or jobs is refused before anything is written,
    and a folder at the sweep root's top (the default <root>/report) is allowed."""
    out = tmp_path / "rep"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"VICTIM")
    (out / "curvature.png").symlink_to(victim)
    proc = run_cli("report", "--root", str(grid), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert victim.read_bytes() == b"VICTIM"
    link = out / "curvature.png"
    assert not link.is_symlink() and link.read_bytes().startswith(b"\x89PNG")
    before = sorted(p.name for p in (grid / "runs").iterdir())
    run_dir = grid / "runs" / before[0]
    for bad in (grid / "runs", run_dir, run_dir / "metrics", grid / "jobs", grid / "runs" / "x"):
        proc = run_cli("report", "--root", str(grid), "--out", str(bad))
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: ") and "never writes among" in proc.stderr
    assert sorted(p.name for p in (grid / "runs").iterdir()) == before
    assert not list(run_dir.glob("*.png")) and not (grid / "runs" / "x").exists()
