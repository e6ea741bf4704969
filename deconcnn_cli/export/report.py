"""``decon report``: H1/H2 tables, figures and one self-contained ``report.html``.

The table is the export's (:func:`deconcnn_cli.export.dataset.collect`, the same rows
``decon export`` writes); the statistics are :mod:`deconcnn_cli.export.stats`, the figures
:mod:`deconcnn_cli.export.figures`. Outputs in ``--out``: ``report.html`` (figures embedded as
base64 data URIs: one file, no server), the PNGs, and ``report.json`` with every number of
the tables.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deconcnn_cli import contract, fileio, jsonout
from deconcnn_cli.errors import DeconError
from deconcnn_cli.export import caveats, stats
from deconcnn_cli.export.columns import COLUMN_NAMES, DTYPES, require_columns
from deconcnn_cli.export.dataset import Dataset, VerifyFn, collect, verify_problem
from deconcnn_cli.export.files import int64_or_none
from deconcnn_cli.export.publish import sweep_root_above as _sweep_root_above
from deconcnn_cli.sweep.manifest import JOBS_DIR, MANIFEST_FILE, RUNS_DIR
from deconcnn_cli.sweep.rootcheck import not_a_sweep_root

REPORT_FILE = "report.html"
STATS_FILE = "report.json"
# METRICS.md (decided 2026-12-03): curvature + noise must not exceed 10% of a 50-epoch run
# (the ceiling, the budget) and aim for 5% on the cluster's GPU (the goal)
GOAL, CEILING = 0.05, 0.10
ON_GOAL, WITHIN_BUDGET, OVER_CEILING = "on goal", "within budget", "over ceiling"


class ReportError(DeconError):
    """An output folder or sweep the report cannot use."""


@dataclass
class Report:
    out: Path
    html: Path
    stats_json: Path
    figures: dict[str, Path]
    h1: list[stats.H1Row]
    h2: list[stats.H2Row]
    warnings: list[str] = field(default_factory=list)
    excluded: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # by hypothesis
    caveats: list[str] = field(default_factory=list)  # too short, too small


def to_frame(data: Dataset) -> Any:
    """The dataset's rows as a DataFrame with the export's dtypes (what read_results gives)."""
    import pandas as pd

    cols: dict[str, Any] = {}
    for name in COLUMN_NAMES:
        values = [row.get(name) for row in data.rows]
        kind = DTYPES[name]
        if kind == "float":
            floats = [math.nan if v is None else float(v) for v in values]
            cols[name] = pd.Series(floats, dtype="float64")
        elif kind == "int":
            cols[name] = pd.Series(values, dtype="int64")
        elif kind == "Int64":
            cols[name] = pd.Series([int64_or_none(v) for v in values], dtype="Int64")
        else:
            strings = [None if v is None else str(v) for v in values]
            cols[name] = pd.Series(strings, dtype="string")
    return pd.DataFrame(cols)


def hypothesis_tables(df: Any) -> tuple[list[stats.H1Row], list[stats.H2Row]]:
    """H1 and H2 in step time, and in lr time where the table has lr-time fits."""
    require_columns(df.columns, ("run_id", "variant", "status"), "the results table")
    h1 = stats.h1_rows(df, "r_squared", "step")
    h2 = stats.h2_rows(df, "alpha_early", "step")
    if stats.has_values(df, "r_squared_lr"):
        h1 += stats.h1_rows(df, "r_squared_lr", "lr")
    if stats.has_values(df, "alpha_early_lr"):
        h2 += stats.h2_rows(df, "alpha_early_lr", "lr")
    return h1, h2


def metrics_cost(root: Path, df: Any) -> list[dict[str, Any]]:
    """The analysis metrics' cost over the completed runs, overall and per variant.

    From every attempt's end line (``timing``, docs/run-directory.md): ``overhead`` = the
    summed curvature + noise + shape seconds over the summed rest of the attempts' wall time
    (the benches' definition), ``runs`` = completed runs with timing. Runs from before the
    timing was recorded are left out; with none, the overall row has ``runs`` 0 and NaN.
    """
    sums: dict[str, list[float]] = {"all": [0, 0.0, 0.0]}
    for run_id, variant, status in zip(df["run_id"], df["variant"], df["status"], strict=True):
        if status != "completed" or not run_id:
            continue
        ends = contract.read_attempts(root / RUNS_DIR / str(run_id))
        timings = [a["timing"] for a in ends if isinstance(a.get("timing"), dict)]
        if not timings:
            continue
        parts = [contract.analysis_split(t) for t in timings]
        for key in ("all", str(variant)):
            acc = sums.setdefault(key, [0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += sum(analysis for analysis, _ in parts)
            acc[2] += sum(rest for _, rest in parts)
    return [
        {
            "variant": key,
            "runs": int(n),
            "analysis_h": analysis / 3600,
            "rest_h": rest / 3600,
            "overhead": analysis / rest if rest > 0 else math.nan,
        }
        for key, (n, analysis, rest) in sorted(sums.items(), key=lambda kv: kv[0] != "all")
    ]


def build_report(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    verify: VerifyFn | None = verify_problem,
) -> Report:
    """Read the sweep at ``root`` and write the report into ``out`` (created if needed).

    Runs are checked as ``decon export`` checks them (``verify``; None, the CLI's
    ``--no-verify``, skips it): a run that fails is named in the warnings and left out of H1
    and H2 (counted as excluded)."""
    from deconcnn_cli.export import figures

    root, out = Path(root), Path(out)
    if not (root / MANIFEST_FILE).is_file():  # the sweep first: its error says what --root is
        raise ReportError(*not_a_sweep_root(root))
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} exists and is not a folder", "give --out a folder")
    inside = _sweep_root_above(out)
    beside_runs = inside is not None and out.resolve().parent == inside
    if inside is not None and not (beside_runs and out.name not in (RUNS_DIR, JOBS_DIR)):
        raise ReportError(
            f"{out} lies inside the sweep root {inside}: the report never writes among a "
            "sweep's runs and jobs",
            f"write it outside the sweep root, or into a folder of its own at its top "
            f"(e.g. {inside / 'report'})",
        )
    data = collect(root, verify=verify)
    df = to_frame(data)
    h1, h2 = hypothesis_tables(df)
    out.mkdir(parents=True, exist_ok=True)
    series = figures.read_series(root, [r for r in df["run_id"] if r])
    alpha_cols = [("alpha_early", "step time")]
    r2_cols = ["r_squared"]
    if stats.has_values(df, "alpha_early_lr"):
        alpha_cols.append(("alpha_early_lr", "lr time"))
    if stats.has_values(df, "r_squared_lr"):
        r2_cols.append("r_squared_lr")
    figs = {"loss_curves": figures.loss_curves(df, series, out / "loss_curves.png")}
    if stats.has_values(df, "alpha_full_lr") or stats.has_values(df, "r_squared_lr"):
        figs["loss_curves_lr"] = figures.loss_curves(
            df, series, out / "loss_curves_lr.png", time_axis="lr"
        )
    figs |= {
        "alpha_vs_best_val": figures.alpha_vs_best_val(
            df, out / "alpha_vs_best_val.png", alpha_cols
        ),
        "r2_histogram": figures.r2_histogram(df, out / "r2_histogram.png", r2_cols),
        "curvature": figures.curvature(df, series, out / "curvature.png"),
        "val_loss_heatmap": figures.val_loss_heatmap(df, out / "val_loss_heatmap.png"),
        "status_heatmap": figures.status_heatmap(df, out / "status_heatmap.png"),
    }
    payload = {
        "source_root": str(root.resolve()),
        "grid": data.manifest.get("grid"),
        "grid_hash": data.manifest.get("grid_hash"),
        "generated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "counts_by_status": data.counts_by_status(),
        "analysis_settings": data.settings_groups(),
        "h1": [stats.as_dict(r) for r in h1],
        "h2": [stats.as_dict(r) for r in h2],
        "metrics_cost": metrics_cost(root, df),
        "warnings": data.warnings,
        "caveats": caveats.sweep_caveats(df, h1, h2),
        "excluded": caveats.exclusions(df),
    }
    stats_json = out / STATS_FILE
    fileio.atomic_write_bytes(
        stats_json, (json.dumps(jsonout.json_safe(payload), indent=2) + "\n").encode()
    )
    page = render_html(payload, figs)
    html_path = out / REPORT_FILE
    fileio.atomic_write_bytes(html_path, page.encode())
    return Report(
        out,
        html_path,
        stats_json,
        figs,
        h1,
        h2,
        list(data.warnings),
        payload["excluded"],
        payload["caveats"],
    )


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.supported { background: #d9f2d9; } .not-supported { background: #f8d7d7; }
.inconclusive { background: #fff3cd; } .too-few-runs { background: #eee; }
.on-goal { background: #d9f2d9; } .within-budget { background: #eaf5d0; }
.over-ceiling { background: #f8d7d7; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; } code { background: #f5f5f5; padding: 0 0.2em; }
.warn { color: #8a5300; }
.caveats { background: #fff3cd; border: 1px solid #e0c060; padding: 0.5em 1em; }
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table; the first two columns left-aligned, the last (the verdict) classed by
    its value for its colour."""
    head = "".join(f'<th class="{"l" if i < 2 else ""}">{h}</th>' for i, h in enumerate(headers))
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = "l" if i < 2 else ""
            if i == len(row) - 1:
                cls += " " + cell.replace(" ", "-")
            cells.append(f'<td class="{cls.strip()}">{cell}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _group(row: dict[str, Any]) -> str:
    """The group's name, with its settings id where the sweep's runs used several."""
    sid = row.get("analysis_settings")
    return _fmt(row["group"]) + (f" <code>[{html.escape(sid)}]</code>" if sid else "")


def _settings_section(groups: list[dict[str, Any]]) -> str:
    """The analysis settings the runs' fits used: one column per distinct set."""
    known = [g for g in groups if g["settings"] is not None]
    if not known:
        return "<p>No run recorded its analysis settings.</p>"
    keys = list(dict.fromkeys(k for g in known for k in g["settings"]))
    head = "".join(f"<th>{html.escape(g['id'])} ({g['runs']} runs)</th>" for g in known)
    body = []
    for key in keys:
        values = [g["settings"].get(key) for g in known]
        cells = "".join(f"<td>{html.escape(_setting_text(v))}</td>" for v in values)
        mark = ' class="warn"' if len({json.dumps(v) for v in values}) > 1 else ""
        body.append(f'<tr{mark}><td class="l"><code>{key}</code></td>{cells}</tr>')
    unknown = sum(g["runs"] for g in groups if g["settings"] is None)
    note = f"<p>{unknown} run(s) without a run directory have no settings.</p>" if unknown else ""
    if len(known) > 1:
        note += (
            '<p class="warn">The runs used different analysis settings (rows marked): H1 and '
            "H2 are computed per settings id, never pooled.</p>"
        )
    return f'<table><tr><th class="l">setting</th>{head}</tr>{"".join(body)}</table>{note}'


def _setting_text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _h1_table(rows: list[dict[str, Any]]) -> str:
    headers = ["group", "time", "runs", f"R² ≥ {stats.R2_THRESHOLD}", "share", "95% CI",
               "diverged", "excluded", "verdict"]  # fmt: skip
    body = [
        [
            _group(r),
            r["time_axis"],
            str(r["n_runs"]),
            str(r["n_power_law"]),
            _fmt(r["share"]),
            f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
            str(r["n_diverged"]),
            str(r["n_excluded"]),
            r["verdict"],
        ]  # fmt: skip
        for r in rows
    ]
    return _table(headers, body)


def _h2_table(rows: list[dict[str, Any]]) -> str:
    headers = ["group", "time", "runs", "Spearman ρ", "p-value", "95% CI", "CI method",
               "degenerate resamples redrawn", "diverged", "excluded", "verdict"]  # fmt: skip
    body = [
        [
            _group(r),
            r["time_axis"],
            str(r["n_runs"]),
            _fmt(r["rho"]),
            _fmt(r["p_value"], 4)
            if r["p_value"] is None or r["p_value"] >= 1e-4
            else f"{r['p_value']:.1e}",
            f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]",
            r["ci_method"] or "—",
            _degenerate_cell(r),
            str(r["n_diverged"]),
            str(r["n_excluded"]),
            r["verdict"],
        ]  # fmt: skip
        for r in rows
    ]
    return _table(headers, body)


def _degenerate_cell(row: dict[str, Any]) -> str:
    """How many bootstrap draws had rho undefined and were redrawn, of all draws made."""
    if not row["n_resamples"]:
        return "—"
    drawn = row["n_resamples"] + row["n_degenerate"]
    return f"{row['n_degenerate']} of {drawn}"


_CAPTIONS = {
    "loss_curves": "Training loss per step on log-log axes, per variant (the title counts "
    "its runs in every state): the pointwise median of the log-binned curves of the "
    "completed runs that pass verification (the runs H1 and H2 count), a band (10-90% of "
    "runs from 10 runs on, min-max below that, as labelled), and what H1 and H2 use: the "
    "runs' own fits, median alpha_full with its interquartile range and the share of runs "
    "with R² ≥ 0.98. The dashed guide has the median per-run slope from the median burn-in "
    "on; it is not a fit to the median curve. Red: the median knee.",
    "loss_curves_lr": "The same against cumulative learning rate τ = Σ lr (the lr-time fits: "
    "alpha_full_lr, r_squared_lr), which takes the warmup and the cosine anneal out of the "
    "curve's shape.",
    "alpha_vs_best_val": "H2: early power-law exponent against the best validation loss, "
    "one point per completed run that passes verification (the runs H2 counts), coloured by "
    "variant, with horizontal bars of ± the exponent's OLS standard error (conditional on the "
    "binned fit: a lower bound).",
    "r2_histogram": "H1: R² of the power-law fit (log space) of each completed run that passes "
    "verification (the runs H1 counts), stacked by variant; the dashed line is the 0.98 "
    "threshold.",
    "curvature": "Top Hessian eigenvalue and Hessian trace of the mean cross-entropy (nats "
    "per parameter²) on the fixed probe batch, over training: pointwise median over each "
    "variant's completed and diverged runs, a band (10-90% from 10 runs, else min-max), and "
    "on the trace error bars of the median per-run standard error of the Hutchinson estimate. "
    "Right: the normalised sharpness (λmax + wd) · lr_t / (2 (1 + β)) of SGD runs, lr_t the "
    "step's scheduled learning rate; above the dashed line at 1, gradient descent on the local "
    "quadratic would be unstable (the edge of stability). AdamW has no such threshold: no line.",
    "val_loss_heatmap": "Final validation loss, median over the completed runs that pass "
    "verification (failed, stalled or unfinished runs stopped mid-training and are left out), "
    "per learning rate and weight decay; each cell says how many of its runs the median is "
    "of. Each variant on its own grid, one colour scale over the medians shown.",
    "status_heatmap": "Run status per cell of the grid; colour is the share completed, a "
    "hatched grey cell has no runs.",
}


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cost_table(rows: list[dict[str, Any]]) -> str:
    if not rows or not rows[0]["runs"]:
        return "<p>No completed run has recorded its timing.</p>"
    body = [
        [
            html.escape(r["variant"]),
            str(r["runs"]),
            _fmt(r["rest_h"]),
            _fmt(r["analysis_h"]),
            "—" if r["overhead"] is None else f"{r['overhead']:.2%}",
            budget_verdict(r["overhead"]),
        ]
        for r in rows
    ]
    headers = ["variant", "runs", "rest h", "metrics h", "overhead", "verdict"]
    return _table(headers, body)


def budget_verdict(overhead: float | None) -> str:
    """The cost table's verdict on an overhead share (METRICS.md's goal and ceiling)."""
    if overhead is None:
        return "no data"
    if overhead <= GOAL:
        return ON_GOAL
    return WITHIN_BUDGET if overhead <= CEILING else OVER_CEILING


def _caveats_html(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    head = "<strong>Read the verdicts with care:</strong>"
    return f'<div class="caveats">{head}<ul>{items}</ul></div>'


def _excluded_html(excluded: dict[str, list[dict[str, str]]], hypothesis: str) -> str:
    """The runs each table of ``hypothesis`` left out, and why."""
    parts = []
    for label, runs in excluded.items():
        if not label.startswith(hypothesis):
            continue
        if not runs:
            parts.append(f"<p>{html.escape(label)}: every run counts.</p>")
            continue
        items = "".join(
            f"<li><code>{html.escape(r['run_id'])}</code>: {html.escape(r['why'])}</li>"
            for r in runs
        )
        parts.append(f"<p>{html.escape(label)}: {len(runs)} run(s) left out:</p><ul>{items}</ul>")
    return "".join(parts)


def render_html(payload: dict[str, Any], figs: dict[str, Path]) -> str:
    p = jsonout.json_safe(payload)
    counts = ", ".join(f"{n} {s}" for s, n in p["counts_by_status"].items())
    total = sum(p["counts_by_status"].values())
    warn = "".join(f'<li class="warn">{html.escape(w)}</li>' for w in p["warnings"])
    figures_html = "".join(
        f"<figure>{_img(path, name)}<figcaption>{_CAPTIONS.get(name, '')}</figcaption></figure>"
        for name, path in figs.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>decon report: {html.escape(str(p["grid"]))}</title><style>{_CSS}</style></head>
<body>
<h1>Sweep report: {html.escape(str(p["grid"]))}</h1>
<p>Source <code>{html.escape(p["source_root"])}</code>, grid hash
<code>{html.escape(str(p["grid_hash"]))}</code>, generated {p["generated_utc"]}.
{total} runs: {counts}.</p>
{f"<ul>{warn}</ul>" if warn else ""}
{_caveats_html(p.get("caveats", []))}
<h2>Analysis settings</h2>
<p>What every run's curve-shape fits used (<code>analysis_settings</code> in its
<code>summary.json</code>; for a run without one, its <code>config.json</code>): the
<code>alpha_early</code> window, burn-in threshold and smoothing, bins, knee settings and time
axes. Ids are the export's <code>analysis_settings</code> column.</p>
{_settings_section(p["analysis_settings"])}
<h2>H1: training loss follows a power law</h2>
<p>Share of completed runs whose power-law fit (log space, burn-in to end) has
R² ≥ {stats.R2_THRESHOLD}, with an exact (Clopper-Pearson) 95% interval. Target: more than
{stats.H1_TARGET:.0%}. Diverged runs are counted apart; failed, missing or unfinished runs,
and runs with no fit, are excluded. <em>supported</em>: the whole interval lies above the
target; <em>not supported</em>: the whole interval lies at or below it; otherwise
<em>inconclusive</em>. Runs that fail verification (a gap in a stream, a checksum, a foreign
config) are excluded too, and named in the warnings above. With a handful of runs the exact
interval is wide: a group of 1 or 2 runs can rarely be more than inconclusive.</p>
{_h1_table(p["h1"])}
{_excluded_html(p.get("excluded", {}), "H1")}
<h2>H2: the early exponent predicts the best validation loss</h2>
<p>Spearman ρ between <code>alpha_early</code> and <code>best_val_ce</code> over completed
runs, its p-value, and a 95% bootstrap interval ({stats.N_BOOTSTRAP} resamples of runs, BCa;
percentile where BCa cannot be formed). A resample on which ρ is undefined (one run drawn every
time, or only runs tied in one column) is redrawn: the interval is conditional on a defined ρ,
and the table counts the redrawn draws (with 4 or 5 runs some always are).
Target: |ρ| ≥ {stats.H2_TARGET}.
<em>supported</em>: the whole interval has |ρ| ≥ {stats.H2_TARGET} on one side;
<em>not supported</em>: the whole interval lies inside (−{stats.H2_TARGET}, {stats.H2_TARGET});
otherwise <em>inconclusive</em>. Rows with time <em>lr</em> use the fits against cumulative
learning rate. <strong>Small samples:</strong> with fewer than about 20 runs a rank
correlation's interval is wide, an end may sit at ±1 (the edge of ρ's range), and the ends
move with the resampling seed (fixed here at 0, the runs resampled in run-id order, so the
report is reproducible whatever the order of the table's rows); read the
verdict, and treat the digits of the interval as approximate.</p>
{_h2_table(p["h2"])}
{_excluded_html(p.get("excluded", {}), "H2")}
<h2>Cost of the analysis metrics</h2>
<p>Curvature, gradient noise and curve shape as a share of the rest of the completed runs'
time (training steps, validation, checkpoints: <em>rest h</em>), summed over every attempt's
recorded timing, on the hardware the runs ran on. Budget
(METRICS.md): never over {CEILING:.0%} of a 50-epoch run (<em>within budget</em>), with a goal of
{GOAL:.0%} on the cluster's GPU (<em>on goal</em>); above {CEILING:.0%}, <em>over ceiling</em>.
A short run weighs its cold curvature evaluation at step 0 far more than a 50-epoch run does.</p>
{_cost_table(p["metrics_cost"])}
<h2>Figures</h2>
{figures_html}
</body></html>
"""
