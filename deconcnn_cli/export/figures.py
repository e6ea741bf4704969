"""The report's figures (PNG, matplotlib Agg): one function per figure, data in, file out.

Each takes the results table (a DataFrame, docs/data-dictionary.md) and, for curves, the
per-run series read by :func:`read_series`; each returns the path it wrote. No statistics
are decided here (they are in :mod:`deconcnn_cli.export.stats`). One file over 500 lines on
purpose: the figures share their layout, colours and text-wrapping helpers, so the report
looks one way.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from deconcnn_cli import contract, fileio, streambound  # noqa: E402
from deconcnn_cli.export.stats import R2_THRESHOLD, finished  # noqa: E402
from deconcnn_cli.sweep.manifest import RUNS_DIR  # noqa: E402

DPI = 110
N_CURVE_BINS = 60  # log-uniform bins of t for the loss-curve figure
# every state a run can be in (contract.STATES and DERIVED_STATES), outcomes first
STATUS_ORDER = (
    contract.COMPLETED,
    contract.DIVERGED,
    contract.FAILED,
    contract.INTERRUPTED,
    contract.RUNNING,
    *contract.DERIVED_STATES,
)


def variant_colours(variants: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(sorted(variants))}


def _read_columns(path: Path, columns: tuple[str, ...], limit: int) -> dict[str, np.ndarray] | None:
    """Whole lines of a stream as float arrays (``""`` -> NaN); None when absent, empty, or
    over ``limit`` bytes (far longer than its run allows: the export's warnings say so)."""
    import pandas as pd

    try:
        data = fileio.read_regular(path, limit)
    except OSError:
        return None
    data = data[: data.rfind(b"\n") + 1]  # a live writer's partial last line is left out
    if data.count(b"\n") < 2:
        return None
    try:
        frame = pd.read_csv(io.BytesIO(data), usecols=list(columns), dtype="float64")
    except ValueError:  # a column is missing: an older or foreign stream
        return None
    return {c: frame[c].to_numpy() for c in columns}


def read_series(root: Path, run_ids: list[str]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{run_id: {"step": {...}, "curvature": {...}}}`` for the runs whose files exist.

    The step stream's ``lr`` (for lr time) and the curvature stream's ``hutch_trace_sem`` are
    read where the stream has them (older streams may not).
    """
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for run_id in run_ids:
        run_dir = root / RUNS_DIR / run_id
        n_rows = streambound.run_stream_rows(contract.view_run(run_dir).total_steps)
        step_path = contract.stream_path(run_dir, "step")
        step_limit = streambound.stream_byte_limit("step", n_rows)
        step = _read_columns(step_path, ("step", "epoch", "loss_train_nats", "lr"), step_limit)
        if step is None:
            step = _read_columns(step_path, ("step", "epoch", "loss_train_nats"), step_limit)
        curv_path = contract.stream_path(run_dir, "curvature")
        curv_limit = streambound.stream_byte_limit("curvature", n_rows)
        curv = None
        for extra in (("hutch_trace_sem", "sharpness_norm"), ("hutch_trace_sem",), ()):
            columns = ("step", "lambda_max", "hutch_trace", *extra)
            curv = _read_columns(curv_path, columns, curv_limit)
            if curv is not None:
                break
        out[run_id] = {k: v for k, v in (("step", step), ("curvature", curv)) if v is not None}
    return out


def _save(fig: Any, path: Path) -> Path:
    """Render to memory, then replace ``path`` atomically: a link (or anything else) already
    at ``path`` is replaced, never written through."""
    _wrap_labels(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # constrained layout: no second "tight" draw
    plt.close(fig)
    fileio.atomic_write_bytes(path, buf.getvalue())
    return path


def _wrap_labels(fig: Any) -> None:
    """Titles and axis labels (a colour bar's too) wrap at the figure's edge instead of
    running off the canvas: a panel may be narrower than its title (one variant)."""
    for ax in fig.axes:
        for text in (ax.title, ax.xaxis.label, ax.yaxis.label):
            text.set_wrap(True)


def _panels(n: int, width: float = 4.2, height: float = 3.4) -> tuple[Any, list[Any]]:
    """``n`` axes, two to a row when there are two or four (the four variants), else three."""
    cols = 2 if n in (2, 4) else min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained"
    )
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _binned(t: np.ndarray, y: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of ``y`` per log-uniform bin of ``t`` (NaN where a bin is empty)."""
    ok = np.isfinite(y)
    idx = np.clip(np.searchsorted(edges, t[ok], side="right") - 1, 0, len(edges) - 2)
    total = np.bincount(idx, weights=y[ok], minlength=len(edges) - 1)
    count = np.bincount(idx, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _label_2_and_5(value: float, _pos: int) -> str:
    """Minor log-axis labels at 2x and 5x a power of ten only (the rest stay unlabelled)."""
    mantissa = value / 10 ** math.floor(math.log10(value)) if value > 0 else 0
    return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""


MIN_RUNS_PERCENTILE_BAND = 10  # below this, a 10-90% band interpolates between few runs


def _median_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pointwise median over runs (axis 0, NaN ignored) and a band with its label: the
    10th-90th percentiles from 10 runs on, min-max below that, none for one run ("")."""
    n = values.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column stays NaN
        med = np.nanmedian(values, axis=0)
        if n >= MIN_RUNS_PERCENTILE_BAND:
            lo, hi = np.nanpercentile(values, [10, 90], axis=0)
            label = f"10-90% of {n} runs"
        else:
            lo, hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
            label = f"min-max of {n} runs (< {MIN_RUNS_PERCENTILE_BAND}: no percentiles)"
    return med, lo, hi, label if n > 1 else ""


def state_counts(df: Any, variant: str) -> str:
    """ "8 completed, 1 diverged, 1 missing": every state of the variant's runs, in order."""
    counts = df.loc[df["variant"] == variant, "status"].value_counts()
    return ", ".join(_ordered_counts(counts))


def _ordered_counts(counts: Any) -> list[str]:
    """``["8 completed", "1 unreadable"]``: each state counted, in STATUS_ORDER, then any
    state this module does not know (a newer writer's), so that no run goes uncounted."""
    order = list(STATUS_ORDER) + sorted(set(counts.index) - set(STATUS_ORDER))
    return [f"{counts[s]} {s}" for s in order if counts.get(s, 0)]


def per_run_fit_label(sub: Any, alpha_col: str, r2_col: str) -> str:
    """What H1/H2 use, from the runs' own fits: median alpha with its IQR, share R^2 >= 0.98."""
    alpha = sub[alpha_col].to_numpy(dtype=float, na_value=np.nan)
    alpha = alpha[np.isfinite(alpha)]
    r2 = sub[r2_col].to_numpy(dtype=float, na_value=np.nan)
    r2 = r2[np.isfinite(r2)]
    if not alpha.size:
        text = f"per-run {alpha_col}: none"
    else:
        q1, med, q3 = np.percentile(alpha, [25, 50, 75])
        text = f"per-run {alpha_col}: median {med:.3f}, IQR [{q1:.3f}, {q3:.3f}] (n={alpha.size})"
    share = f"{int((r2 >= R2_THRESHOLD).sum())}/{r2.size}" if r2.size else "no fits"
    return f"{text}\nper-run R² ≥ {R2_THRESHOLD}: {share}"


def _time_of(curve: dict[str, np.ndarray], time_axis: str) -> np.ndarray:
    """t = step + 1, or tau_t = cumulative lr (NaN where tau is not positive or not logged)."""
    if time_axis == "step":
        return curve["step"] + 1
    if "lr" not in curve:
        return np.full(len(curve["step"]), np.nan)
    tau = np.cumsum(np.nan_to_num(curve["lr"]))
    return np.where(tau > 0, tau, np.nan)


def _at_step(curve: dict[str, np.ndarray], x: np.ndarray, step: float) -> float:
    """The run's time ``x`` at ``step`` (NaN where the run does not reach it)."""
    i = int(np.searchsorted(curve["step"], step))
    return float(x[i]) if i < len(x) else math.nan


_FITS = {"step": ("alpha_full", "r_squared"), "lr": ("alpha_full_lr", "r_squared_lr")}
_TIME_LABEL = {"step": "optimizer step t (step + 1)", "lr": "cumulative learning rate τ = Σ lr"}


def loss_curves(df: Any, series: dict, path: Path, time_axis: str = "step") -> Path:
    """Train loss vs step (or cumulative lr), log-log, per variant: the pointwise median of the
    completed, verified runs (:func:`finished`: the runs H1 and H2 count), a band (10-90%
    from 10 runs, else min-max), the runs' own fits (median
    alpha_full with its IQR, share with R^2 >= 0.98), a guide of that median slope from the
    median burn-in on, and the median knee."""
    alpha_col, r2_col = _FITS[time_axis]
    variants = sorted(df["variant"].unique())
    fig, axes = _panels(len(variants), height=3.8)
    colours = variant_colours(variants)
    for ax, variant in zip(axes, variants, strict=True):
        sub = df[(df["variant"] == variant) & finished(df)]
        ids = [r for r in sub["run_id"] if "step" in series.get(r, {})]
        curves = [series[r]["step"] for r in ids]
        times = [_time_of(c, time_axis) for c in curves]
        ax.set_title(f"{variant}: {state_counts(df, variant)}\n"
                     f"curves: the {len(curves)} completed, verified run(s)",
                     fontsize=9)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(_TIME_LABEL[time_axis])
        ax.set_ylabel("train loss (nats)")
        finite_t = [t[np.isfinite(t)] for t in times]
        if not any(t.size for t in finite_t):
            ax.text(0.5, 0.5, "no completed, verified runs", ha="center", transform=ax.transAxes)
            continue
        t_min = min(float(t.min()) for t in finite_t if t.size)
        t_max = max(float(t.max()) for t in finite_t if t.size)
        edges = np.geomspace(t_min, t_max * (1 + 1e-9), N_CURVE_BINS + 1)
        binned = np.array(
            [_binned(t[np.isfinite(t)], c["loss_train_nats"][np.isfinite(t)], edges)
             for c, t in zip(curves, times, strict=True)]
        )  # fmt: skip
        centres = np.sqrt(edges[:-1] * edges[1:])
        keep = np.isfinite(binned).any(axis=0)
        med, lo, hi, band = _median_band(binned[:, keep])
        x = centres[keep]
        colour = colours[variant]
        if band:
            ax.fill_between(x, lo, hi, color=colour, alpha=0.25, lw=0, label=band)
        ax.plot(x, med, color=colour, lw=1.8, label="pointwise median of the runs")
        by_id = sub.set_index("run_id").reindex(ids)
        burn = by_id["burn_in_step"].to_numpy(dtype=float, na_value=np.nan)
        starts = [_at_step(c, t, b) for c, t, b in zip(curves, times, burn, strict=True)
                  if math.isfinite(b)]  # fmt: skip
        starts = [v for v in starts if math.isfinite(v)]
        alphas = sub[alpha_col].to_numpy(dtype=float, na_value=np.nan)
        alphas = alphas[np.isfinite(alphas)]
        if not starts:  # the protocol fits no power law before burn-in
            ax.plot([], [], " ", label="no run reached burn-in: no power-law fit")
        elif alphas.size:
            start = float(np.median(starts))
            window = (x >= start) & np.isfinite(med)
            if window.any():
                x0 = x[window][0]
                guide = med[window][0] * (x[window] / x0) ** -float(np.median(alphas))
                ax.plot(x[window], guide, "k--", lw=1.2, label="slope: median per-run α")
            ax.axvline(start, color="grey", lw=0.8, ls=":", label="median burn-in")
        ax.plot([], [], " ", label=per_run_fit_label(sub, alpha_col, r2_col))
        knees = by_id["knee_epoch"].to_numpy(dtype=float, na_value=np.nan)
        spe = _steps_per_epoch(curves[0])
        knee_x = [_at_step(c, t, k * spe) for c, t, k in zip(curves, times, knees, strict=True)
                  if spe and math.isfinite(k)]  # fmt: skip
        knee_x = [v for v in knee_x if math.isfinite(v)]
        if knee_x:
            ax.axvline(float(np.median(knee_x)), color="crimson", lw=1.2,
                       label=f"median knee ({len(knee_x)} run(s))")  # fmt: skip
        ax.legend(fontsize=6.5, loc="lower left")
        ax.grid(True, which="both", alpha=0.25)
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        low, high = ax.get_ylim()
        within_decade = high / low < 10  # few major ticks: label every minor one
        ax.yaxis.set_minor_formatter(
            ticker.FormatStrFormatter("%g")
            if within_decade
            else ticker.FuncFormatter(_label_2_and_5)
        )
        ax.tick_params(axis="y", which="minor", labelsize=7)
    what = "step" if time_axis == "step" else "cumulative learning rate"
    fig.suptitle(f"Training loss vs {what}, log-log: pointwise median of the runs and the "
                 "runs' own power-law fits", fontsize=11, wrap=True)  # fmt: skip
    return _save(fig, path)


def _steps_per_epoch(curve: dict[str, np.ndarray]) -> float | None:
    """Steps per epoch from a step stream (``epoch`` counts steps done / spe)."""
    step, epoch = curve["step"], curve["epoch"]
    if len(step) and epoch[-1] > 0:
        return float((step[-1] + 1) / epoch[-1])
    return None


def alpha_vs_best_val(df: Any, path: Path, axes_cols: list[tuple[str, str]]) -> Path:
    """Scatter of alpha_early (and alpha_early_lr) against best_val_ce, coloured by variant:
    the runs H2 counts (completed, verified: :func:`finished`)."""
    fig, axes = _panels(len(axes_cols), width=5.0, height=4.0)
    variants = sorted(df["variant"].unique())
    colours = variant_colours(variants)
    done = df[finished(df)]  # the runs H1 and H2 count
    for ax, (col, label) in zip(axes, axes_cols, strict=True):
        se_col = f"{col}_se" if f"{col}_se" in df.columns else None
        for i, v in enumerate(variants):
            g = done[done["variant"] == v]
            if se_col is not None and np.isfinite(g[se_col].to_numpy(float, na_value=np.nan)).any():
                ax.errorbar(
                    g[col].to_numpy(dtype=float, na_value=np.nan),
                    g["best_val_ce"].to_numpy(dtype=float, na_value=np.nan),
                    xerr=g[se_col].to_numpy(dtype=float, na_value=np.nan),
                    fmt="none", ecolor=colours[v], elinewidth=0.8, alpha=0.6,
                )  # fmt: skip
            ax.scatter(
                g[col].to_numpy(dtype=float, na_value=np.nan),
                g["best_val_ce"].to_numpy(dtype=float, na_value=np.nan),
                color=colours[v],
                label=v,
                marker="osD^v<>p"[i % 8],  # shape as well as colour: overlaps stay visible
                s=30,
                alpha=0.75,
                edgecolors="none",
            )
        bars = "; bars: ± its OLS standard error" if se_col else ""
        ax.set_xlabel(f"{col} ({label}){bars}")
        ax.set_ylabel("best validation CE (nats)")
        ax.set_title(f"H2: {col} vs best_val_ce", fontsize=10)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8, title="variant", title_fontsize=8)
    return _save(fig, path)


def r2_histogram(df: Any, path: Path, cols: list[str]) -> Path:
    """Stacked histogram (by variant) of the power-law R² of the runs H1 counts (completed,
    verified: :func:`finished`)."""
    fig, axes = _panels(len(cols), width=5.0, height=3.6)
    variants = sorted(df["variant"].unique())
    colours = variant_colours(variants)
    done = df[finished(df)]  # the runs H1 and H2 count
    for ax, col in zip(axes, cols, strict=True):
        values = [
            done.loc[done["variant"] == v, col].to_numpy(dtype=float, na_value=np.nan)
            for v in variants
        ]
        values = [v[np.isfinite(v)] for v in values]
        allv = np.concatenate(values) if values else np.array([])
        lo = min(float(allv.min()) if allv.size else 0.9, 0.95)
        bins = np.linspace(lo, 1.0, 26)
        ax.hist(values, bins=bins, stacked=True, color=[colours[v] for v in variants],
                label=variants)  # fmt: skip
        ax.axvline(R2_THRESHOLD, color="k", ls="--", lw=1, label=f"H1 threshold {R2_THRESHOLD}")
        share = (allv >= R2_THRESHOLD).mean() if allv.size else math.nan
        ax.set_title(f"{col}: {share:.0%} of {allv.size} completed runs ≥ {R2_THRESHOLD}",
                     fontsize=10)  # fmt: skip
        ax.set_xlabel(f"{col} (log-space R² of the power-law fit)")
        ax.set_ylabel("runs")
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    return _save(fig, path)


CURVATURE_UNIT = "nats / param²"  # second derivative of the mean CE (nats) in the parameters


def curvature(df: Any, series: dict, path: Path) -> Path:
    """λmax, Hessian trace and normalised sharpness vs step: pointwise median over each
    variant's completed and diverged runs, a band (10-90% from 10 runs, else min-max); the
    trace with error bars of the median per-run standard error (``hutch_trace_sem``); the
    sharpness with the edge of stability at 1, no line for a variant without it (AdamW)."""
    variants = sorted(df["variant"].unique())
    colours = variant_colours(variants)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    bands: set[str] = set()
    undefined: list[str] = []  # variants with no sharpness_norm (AdamW): no line, said so
    for ax, col, label in (
        (axes[0], "lambda_max", f"λmax, top Hessian eigenvalue ({CURVATURE_UNIT})"),
        (axes[1], "hutch_trace", f"Hessian trace, Hutchinson ({CURVATURE_UNIT})"),
        (axes[2], "sharpness_norm", "(λmax + wd) · lr_t / (2 (1 + β)), dimensionless"),
    ):
        for v in variants:
            runs = df[(df["variant"] == v) & df["status"].isin(["completed", "diverged"])]
            curves = [series[r]["curvature"] for r in runs["run_id"]
                      if "curvature" in series.get(r, {})]  # fmt: skip
            if col == "sharpness_norm":
                curves = [c for c in curves if col in c and np.isfinite(c[col]).any()]
                if not curves:
                    undefined.append(v)
            if not curves:
                continue
            steps = np.unique(np.concatenate([c["step"] for c in curves]))
            grid = np.full((len(curves), len(steps)), np.nan)
            sem = np.full((len(curves), len(steps)), np.nan)
            for i, c in enumerate(curves):
                at = np.searchsorted(steps, c["step"])
                grid[i, at] = c[col]
                if "hutch_trace_sem" in c:
                    sem[i, at] = c["hutch_trace_sem"]
            med, lo, hi, band = _median_band(grid)
            if band:
                ax.fill_between(steps, lo, hi, color=colours[v], alpha=0.2, lw=0)
                bands.add(band.split(" of ")[0])
            ax.plot(steps, med, color=colours[v], marker="o", ms=3, lw=1.5,
                    label=f"{v} ({len(curves)} runs)")  # fmt: skip
            if col == "hutch_trace" and np.isfinite(sem).any():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    err = np.nanmedian(sem, axis=0)
                ax.errorbar(steps, med, yerr=err, fmt="none", ecolor=colours[v], elinewidth=1,
                            capsize=2)  # fmt: skip
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    edge = axes[2]
    edge.axhline(1.0, color="k", ls="--", lw=1, label="edge of stability (1)")
    edge.legend(fontsize=8)
    if undefined:
        edge.text(0.02, 0.98, f"not defined, not drawn: {', '.join(undefined)}\n"
                  "(AdamW: the threshold depends on its preconditioner)", fontsize=7,
                  va="top", transform=edge.transAxes)  # fmt: skip
    edge.set_title(
        "normalised sharpness (SGD): pointwise median\n"
        "lr_t = the step's scheduled lr; Nesterov: threshold / (1 + 2β)",
        fontsize=10,
    )
    band_text = " / ".join(sorted(bands)) or "none (one run)"
    axes[0].set_title(f"λmax: pointwise median, band {band_text} of runs", fontsize=10)
    axes[1].set_title(
        f"trace: pointwise median, band {band_text} of runs\n"
        "error bars: median per-run SEM (hutch_trace_sem)",
        fontsize=10,
    )
    return _save(fig, path)


def _axes_values(df: Any) -> tuple[list[float], list[float]]:
    return sorted(df["lr"].unique()), sorted(df["weight_decay"].unique())


def _cell_medians(sub: Any, lrs: list[float], wds: list[float]) -> tuple[np.ndarray, list]:
    """Median ``final_loss_val_nats`` over the completed, verified runs of each (wd, lr) cell
    of one variant, and each cell's text: the median and how many runs it is of."""
    grid = np.full((len(wds), len(lrs)), np.nan)
    texts = []
    done = sub[finished(sub)]
    for (i, wd), (j, lr) in ((a, b) for a in enumerate(wds) for b in enumerate(lrs)):
        cell = sub[(sub["lr"] == lr) & (sub["weight_decay"] == wd)]
        final = done[(done["lr"] == lr) & (done["weight_decay"] == wd)]
        vals = final["final_loss_val_nats"].to_numpy(dtype=float, na_value=np.nan)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            grid[i, j] = np.median(vals)
            text = f"{grid[i, j]:.3g}\nn={vals.size}/{len(cell)}"
        else:
            text = "—" if cell.empty else f"n/a\n0/{len(cell)}"
        texts.append((i, j, text))
    return grid, texts


def val_loss_heatmap(df: Any, path: Path) -> Path:
    """Median final validation loss over seeds, per (lr, weight decay) cell, per variant: each
    variant on its own lr and weight-decay axes, one colour scale over the medians shown."""
    variants = sorted(df["variant"].unique())
    fig, axes = _panels(len(variants), width=3.9, height=3.4)
    panels = []
    for v in variants:
        sub = df[df["variant"] == v]
        lrs, wds = _axes_values(sub)
        panels.append((v, lrs, wds, *_cell_medians(sub, lrs, wds)))
    shown = np.concatenate([g[np.isfinite(g)] for *_, g, _ in panels])
    vmin, vmax = (float(shown.min()), float(shown.max())) if shown.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + 1e-9
    image = None
    for ax, (v, lrs, wds, grid, texts) in zip(axes, panels, strict=True):
        for i, j, text in texts:
            dark = math.isfinite(grid[i, j]) and (grid[i, j] - vmin) > 0.55 * (vmax - vmin)
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")  # fmt: skip
        image = ax.imshow(grid, cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        _label_grid(ax, v, lrs, wds)
    if image is not None:
        fig.colorbar(image, ax=axes, label="median final validation CE (nats)")
    fig.suptitle(
        "Final validation loss by lr x weight decay: median of the completed runs\n"
        "(n = completed runs / all runs of the cell; 'n/a': none)",
        wrap=True,
    )
    return _save(fig, path)


def status_heatmap(df: Any, path: Path) -> Path:
    """Share of completed runs per (lr, weight decay) cell, with counts by status; a cell with
    no runs is hatched grey and says so (never a pale colour)."""
    variants = sorted(df["variant"].unique())
    fig, axes = _panels(len(variants), width=3.9, height=3.4)
    lrs, wds = _axes_values(df)
    cmap = ListedColormap(plt.get_cmap("RdYlGn")(np.linspace(0.1, 0.9, 256)))
    image = None
    for ax, v in zip(axes, variants, strict=True):
        grid = np.full((len(wds), len(lrs)), np.nan)
        for (i, wd), (j, lr) in ((a, b) for a in enumerate(wds) for b in enumerate(lrs)):
            cell = df[(df["variant"] == v) & (df["lr"] == lr) & (df["weight_decay"] == wd)]
            if cell.empty:
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        facecolor="#dddddd",
                        hatch="///",
                        edgecolor="#888888",
                        lw=0,
                        zorder=2,
                    )
                )
                ax.text(
                    j,
                    i,
                    "no runs",
                    ha="center",
                    va="center",
                    fontsize=8,
                    zorder=3,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
                )
                continue  # fmt: skip
            counts = cell["status"].value_counts()
            grid[i, j] = counts.get("completed", 0) / len(cell)
            lines = _ordered_counts(counts)
            ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8)
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        _label_grid(ax, v, lrs, wds)
    if image is not None:
        fig.colorbar(image, ax=axes, label="share of the cell's runs completed")
    fig.suptitle("Run status by lr x weight decay (runs per state; hatched: no runs)", wrap=True)
    return _save(fig, path)


def _label_grid(ax: Any, variant: str, lrs: list[float], wds: list[float]) -> None:
    ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
    ax.set_yticks(range(len(wds)), [f"{x:g}" for x in wds])
    ax.set_xlabel("peak lr")
    ax.set_ylabel("weight decay")
    ax.set_title(variant, fontsize=10)
