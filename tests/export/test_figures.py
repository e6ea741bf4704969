"""The report's figures say what they show: checked on the figure objects before saving.

A small synthetic sweep with two variants on different lr grids, fewer than 10 runs each, one
failed and one missing run, and per-run fits chosen so that the median curve's own fit and
the runs' fits disagree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deconcnn_cli.export import figures
from deconcnn_cli.export.dataset import collect
from deconcnn_cli.export.report import to_frame
from tests.conftest import REPO
from tests.export.synthetic import write_manifest, write_run

R2 = {0: 0.51, 1: 0.99, 2: 0.985, 3: 0.9}  # per-run R^2 of base: H1 counts 2 of 4


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("figsweep")
    runs = {}
    for seed in range(6):
        runs[f"base{seed}"] = {"variant": "base", "lr": 0.05 * (1 + seed % 2),
                               "weight_decay": 1e-4, "seed": seed}  # fmt: skip
    for seed in range(3):
        runs[f"adamw{seed}"] = {"variant": "adamw", "lr": 0.001, "weight_decay": 1e-2 * (1 + seed),
                                "seed": seed}  # fmt: skip
    write_manifest(root, runs)
    for i, run_id in enumerate(runs):
        if run_id == "base5":
            continue  # missing
        if run_id == "base4":
            write_run(root, run_id, state="failed", steps=200, steps_per_epoch=10, summary=None,
                      curvature_every=50)  # fmt: skip
            continue
        seed = runs[run_id]["seed"]
        alpha = 0.2 + 0.1 * seed
        summary = {"alpha_full": alpha, "alpha_early": alpha, "power_law_r2": R2.get(seed, 0.99),
                   "best_val_ce": 2 - alpha, "burn_in_step": 10,
                   "alpha_full_lr": alpha + 0.05, "power_law_r2_lr": 0.99,
                   "alpha_early_se": 0.01 * (1 + seed)}  # fmt: skip
        write_run(root, run_id, steps=200, steps_per_epoch=10, alpha=alpha, seed=i,
                  summary=summary, curvature_every=50,
                  sharpness=not run_id.startswith("adamw"))  # fmt: skip
    return root


@pytest.fixture(scope="module")
def frame(sweep: Path) -> Any:
    return to_frame(collect(sweep, verify=None))


@pytest.fixture(scope="module")
def series(sweep: Path, frame: Any) -> dict:
    return figures.read_series(sweep, list(frame["run_id"]))


@pytest.fixture()
def captured(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures as drawn, kept open instead of only saved."""
    figs: list = []
    save = figures._save

    def keep(fig: Any, path: Path) -> Path:
        figs.append(fig)
        fig.canvas.draw()
        return save(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    return figs


def _legend(ax: Any) -> str:
    return "\n".join(t.get_text() for t in ax.get_legend().get_texts())


def _axes(fig: Any) -> dict[str, Any]:
    return {ax.get_title().split(":")[0]: ax for ax in fig.axes if ax.get_visible()}


def test_loss_curves_show_the_per_run_fits_and_label_what_is_drawn(frame, series, captured,
                                                                     tmp_path):  # fmt: skip
    figures.loss_curves(frame, series, tmp_path / "l.png")
    base = _axes(captured[0])["base"]
    legend = _legend(base)
    done = frame[(frame["variant"] == "base") & (frame["status"] == "completed")]
    q1, med, q3 = np.percentile(done["alpha_full"].to_numpy(float), [25, 50, 75])
    assert f"median {med:.3f}, IQR [{q1:.3f}, {q3:.3f}] (n=4)" in legend
    assert "R² ≥ 0.98: 2/4" in legend  # the runs' own fits (0.51, 0.99, 0.985, 0.9)
    assert "pointwise median" in legend
    assert "min-max of 4 runs" in legend and "10-90%" not in legend  # 4 < 10 runs
    assert "power law α=" not in legend  # no fit to the median curve posing as the runs'
    title = base.get_title()
    assert "4 completed" in title and "1 failed" in title and "1 missing" in title


def test_a_band_over_ten_runs_is_10_to_90_percent_and_one_run_has_none():
    values = np.arange(12.0)[:, None] * np.ones((1, 3))
    med, lo, hi, label = figures._median_band(values)
    assert label == "10-90% of 12 runs" and lo[0] == pytest.approx(
        np.percentile(np.arange(12.0), 10)
    )
    med, lo, hi, label = figures._median_band(values[:4])
    assert label.startswith("min-max of 4 runs") and (lo[0], hi[0]) == (0.0, 3.0)
    assert figures._median_band(values[:1])[3] == ""


def test_lr_time_panel_uses_the_lr_fits(frame, series, captured, tmp_path):
    figures.loss_curves(frame, series, tmp_path / "lr.png", time_axis="lr")
    base = _axes(captured[0])["base"]
    assert "cumulative learning rate" in base.get_xlabel()
    assert "per-run alpha_full_lr: median 0.400" in _legend(base)  # 0.2..0.5 + 0.05
    x = base.get_lines()[0].get_xdata()
    assert x.max() == pytest.approx(0.1 * 200, rel=0.05)  # tau = 0.1 per step, 200 steps


def test_curvature_axes_have_units_and_the_trace_its_sem(frame, series, captured, tmp_path):
    figures.curvature(frame, series, tmp_path / "c.png")
    lam, trace = captured[0].axes[:2]
    assert "nats / param²" in lam.get_ylabel() and "nats / param²" in trace.get_ylabel()
    assert trace.containers, "no error bars on the trace"
    (_, _, (bars, *_)), *_ = trace.containers
    segments = bars.get_segments()
    assert segments and all(abs(s[1][1] - s[0][1]) == pytest.approx(80.0) for s in segments)
    edge = captured[0].axes[2]
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in edge.get_lines())  # y = 1
    labels = [line.get_label() for line in edge.get_lines()]
    assert "base (4 runs)" in labels and not any(lb.startswith("adamw") for lb in labels)
    assert "not defined, not drawn: adamw" in edge.texts[0].get_text()
    base = next(line for line in edge.get_lines() if line.get_label() == "base (4 runs)")
    lam = 50 + 200 * (1 - np.exp(-np.arange(0, 200, 50) / (200 / 3)))  # the synthetic λmax
    np.testing.assert_allclose(base.get_ydata(), (lam + 1e-4) * 0.1 / 3.8, rtol=1e-12)


def test_val_heatmap_gives_each_variant_its_axes_and_one_scale_over_the_cells(
    frame, captured, tmp_path
):
    figures.val_loss_heatmap(frame, tmp_path / "v.png")
    panels = _axes(captured[0])
    adamw = panels["adamw"]
    assert [t.get_text() for t in adamw.get_xticklabels()] == ["0.001"]  # its own lr grid
    texts = [t.get_text() for ax in panels.values() for t in ax.texts]
    assert "—" not in texts  # no cell from another variant's grid
    shown = [float(t.split("\n")[0]) for t in texts if re.match(r"[0-9.]+\n", t)]
    image = adamw.get_images()[0]
    assert image.get_clim() == pytest.approx((min(shown), max(shown)), rel=1e-2)


def test_val_heatmap_medians_only_completed_runs_and_says_of_how_many(frame, captured, tmp_path):
    """base lr 0.05 holds base0, base2 (completed) and base4 (failed at its last validation,
    mid-training): the median is of the two completed runs, and the cell says n=2/3."""
    figures.val_loss_heatmap(frame, tmp_path / "v.png")
    base = _axes(captured[0])["base"]
    cells = {(t.get_position()[0], t.get_position()[1]): t.get_text() for t in base.texts}
    lrs = [float(t.get_text()) for t in base.get_xticklabels()]
    j = lrs.index(0.05)
    done = frame[(frame["variant"] == "base") & (frame["lr"] == 0.05)]
    failed = done[done["status"] == "failed"]["final_loss_val_nats"]
    assert len(failed) == 1 and np.isfinite(failed.iloc[0])  # a value that must stay out
    completed = done[done["status"] == "completed"]["final_loss_val_nats"]
    value, count = cells[(j, 0)].split("\n")
    assert float(value) == pytest.approx(float(np.median(completed)), rel=1e-2)
    assert count == "n=2/3"
    assert cells[(lrs.index(0.1), 0)].endswith("n=2/3")  # base5 is missing


def test_status_heatmap_blank_cells_are_hatched_and_say_no_runs(frame, captured, tmp_path):
    figures.status_heatmap(frame, tmp_path / "s.png")
    adamw = _axes(captured[0])["adamw"]
    assert "no runs" in [t.get_text() for t in adamw.texts]  # adamw has no lr 0.05 runs
    assert any(p.get_hatch() for p in adamw.patches)


def test_every_figure_the_docs_list_is_written(sweep, tmp_path):
    from deconcnn_cli.export.report import build_report

    documented = re.findall(r"^\| `([a-z_0-9]+)\.png` \|", (REPO / "docs" / "report.md")
                            .read_text(), flags=re.M)  # fmt: skip
    report = build_report(sweep, tmp_path / "rep")
    assert sorted(report.figures) == sorted(documented)
    page = report.html.read_text()
    for name in documented:
        assert f'<img alt="{name}"' in page


def test_export_has_each_runs_last_and_largest_sharpness(frame):
    base = frame[(frame["variant"] == "base") & (frame["status"] == "completed")]
    lam = 50 + 200 * (1 - np.exp(-np.arange(0, 200, 50) / (200 / 3)))
    expected = (lam + 1e-4) * 0.1 / 3.8
    assert base["sharpness_norm_last"].to_numpy() == pytest.approx(expected[-1], rel=1e-12)
    assert base["sharpness_norm_max"].to_numpy() == pytest.approx(expected.max(), rel=1e-12)
    adamw = frame[frame["variant"] == "adamw"]
    assert adamw["sharpness_norm_last"].isna().all() and adamw["sharpness_norm_max"].isna().all()


def test_alpha_vs_best_val_draws_each_runs_standard_error(frame, captured, tmp_path):
    figures.alpha_vs_best_val(frame, tmp_path / "a.png", [("alpha_early", "step time")])
    ax = captured[0].axes[0]
    assert "standard error" in ax.get_xlabel()
    widths = sorted(
        round(abs(seg[1][0] - seg[0][0]) / 2, 12)
        for container in ax.containers
        for seg in container[2][0].get_segments()
    )
    assert widths == [0.01, 0.01, 0.02, 0.02, 0.03, 0.03, 0.04]  # adamw seeds 0-2, base 0-3


def _failing_verify(frame: Any, run_id: str) -> Any:
    """The table with ``run_id`` completed but failing verification (H1 and H2 leave it out)."""
    df = frame.copy()
    df.loc[df["run_id"] == run_id, "verify_problem"] = "metrics/step.csv: a gap in steps"
    return df


def test_h2_figure_shows_the_runs_the_h2_table_counts(frame, captured, tmp_path):
    from deconcnn_cli.export.stats import h2_rows

    df = _failing_verify(frame, "base1")
    figures.alpha_vs_best_val(df, tmp_path / "a.png", [("alpha_early", "step time")])
    ax = captured[0].axes[0]
    drawn = sum(len(c.get_offsets()) for c in ax.collections if c.get_label() in ("base", "adamw"))
    (overall,) = [r for r in h2_rows(df) if r.group == "all"]
    assert drawn == overall.n_runs == 6  # base0, base2, base3 and adamw0-2; base1 left out
    base = next(c for c in ax.collections if c.get_label() == "base")
    xs = sorted(round(float(x), 6) for x, _ in base.get_offsets())
    assert xs == [0.2, 0.4, 0.5]  # alpha of base seeds 0, 2, 3: not base1's 0.3


def test_r2_histogram_and_loss_curves_count_the_runs_h1_counts(frame, series, captured,
                                                                tmp_path):  # fmt: skip
    from deconcnn_cli.export.stats import h1_rows

    df = _failing_verify(frame, "base1")
    figures.r2_histogram(df, tmp_path / "r.png", ["r_squared"])
    (overall,) = [r for r in h1_rows(df) if r.group == "all"]
    assert overall.n_runs == 6
    assert "of 6 completed runs" in captured[0].axes[0].get_title()
    figures.loss_curves(df, series, tmp_path / "l.png")
    base = _axes(captured[1])["base"]
    assert "curves: the 3 completed, verified run(s)" in base.get_title()
    assert "(n=3)" in _legend(base)


def test_status_heatmap_and_titles_count_unreadable_runs(frame, series, captured, tmp_path):
    from deconcnn_cli import contract

    assert set(figures.STATUS_ORDER) == {*contract.STATES, *contract.DERIVED_STATES}
    df = frame.copy()
    df.loc[df["run_id"] == "adamw1", "status"] = contract.UNREADABLE
    figures.status_heatmap(df, tmp_path / "s.png")
    adamw = _axes(captured[0])["adamw"]
    assert "1 unreadable" in [t.get_text() for t in adamw.texts]
    assert figures.state_counts(df, "adamw") == "2 completed, 1 unreadable"


def _drawn_texts(fig: Any) -> list[Any]:
    """Every text the figure draws: tick labels only of the ticks inside the axis' view."""
    import matplotlib.text

    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not low - 1e-12 * abs(low) <= tick.get_loc() <= high + 1e-12 * abs(high):
                    hidden.update((id(tick.label1), id(tick.label2)))
    return [t for t in fig.findobj(matplotlib.text.Text)
            if t.get_visible() and t.get_text().strip() and id(t) not in hidden
            and (t.axes is None or t.axes.get_visible())]  # fmt: skip


def _with_variants(frame: Any, series: dict, n: int) -> tuple[Any, dict]:
    """The table cut to base alone (n=1), as it is (2 variants), or with copies of adamw under
    new names (n=4, the demo's count), each copy's runs under new ids."""
    import pandas as pd

    if n == 1:
        return frame[frame["variant"] == "base"], series
    parts, series = [frame], dict(series)
    for k in range(n - 2):
        copy = frame[frame["variant"] == "adamw"].copy()
        copy["variant"] = f"adamw_copy{k}"
        copy["run_id"] = copy["run_id"] + f"_copy{k}"
        for rid in frame.loc[frame["variant"] == "adamw", "run_id"]:
            if rid in series:
                series[f"{rid}_copy{k}"] = series[rid]
        parts.append(copy)
    return pd.concat(parts, ignore_index=True), series


@pytest.mark.parametrize("n_variants", [1, 2, 4])
def test_no_figure_draws_text_outside_its_canvas(frame, series, tmp_path, monkeypatch,
                                                 n_variants):  # fmt: skip
    df, runs = _with_variants(frame, series, n_variants)
    outside: list[str] = []
    save = figures._save

    def check(fig: Any, path: Path) -> Path:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        written = save(fig, path)  # then drawn again as written: its layout, its wrapping
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        for text in _drawn_texts(fig):
            box = text.get_window_extent(renderer)
            if box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5:
                outside.append(f"{path.name}: {text.get_text()!r} at {box.extents.round()} "
                               f"on a {width:.0f}x{height:.0f} canvas")  # fmt: skip
        return written

    monkeypatch.setattr(figures, "_save", check)
    figures.loss_curves(df, runs, tmp_path / "l.png")
    figures.loss_curves(df, runs, tmp_path / "l_lr.png", time_axis="lr")
    both = [("alpha_early", "step time"), ("alpha_early_lr", "lr time")]
    figures.alpha_vs_best_val(df, tmp_path / "a.png", both)
    figures.r2_histogram(df, tmp_path / "r.png", ["r_squared", "r_squared_lr"])
    figures.curvature(df, runs, tmp_path / "c.png")
    figures.val_loss_heatmap(df, tmp_path / "v.png")
    figures.status_heatmap(df, tmp_path / "s.png")
    assert not outside, "\n".join(outside)
