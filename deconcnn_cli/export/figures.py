"""The report's figures (PNG, matplotlib Agg): one function per figure, data in, file out.

Each takes the results table (a DataFrame, docs/data-dictionary.md) and, for curves, the
per-run series read by :func:`read_series`; each returns the path it wrote. No statistics
are decided here (they are in :mod:`deconcnn_cli.export.stats`).
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

from deconcnn_cli import contract  # noqa: E402
from deconcnn_cli.analysis.powerlaw import fit_power_law  # noqa: E402
from deconcnn_cli.export.stats import R2_THRESHOLD  # noqa: E402

DPI = 110
N_CURVE_BINS = 60  # log-uniform bins of t for the loss-curve figure
STATUS_ORDER = ("completed", "diverged", "failed", "interrupted", "running", "stalled", "missing")


def variant_colours(variants: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(sorted(variants))}


def _read_columns(path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """Whole lines of a stream as float arrays (``""`` -> NaN); None when absent or empty."""
    import pandas as pd

    try:
        data = path.read_bytes()
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
    """``{run_id: {"step": {...}, "curvature": {...}}}`` for the runs whose files exist."""
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for run_id in run_ids:
        run_dir = root / "runs" / run_id
        step = _read_columns(
            contract.stream_path(run_dir, "step"), ("step", "epoch", "loss_train_nats")
        )
        curv = _read_columns(
            contract.stream_path(run_dir, "curvature"), ("step", "lambda_max", "hutch_trace")
        )
        out[run_id] = {k: v for k, v in (("step", step), ("curvature", curv)) if v is not None}
    return out


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # constrained layout: no second "tight" draw
    plt.close(fig)
    return path


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


def _median_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median and 10th/90th percentiles over runs (axis 0), ignoring NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column stays NaN
        med = np.nanmedian(values, axis=0)
        lo, hi = np.nanpercentile(values, [10, 90], axis=0)
    return med, lo, hi


def loss_curves(df: Any, series: dict, path: Path) -> Path:
    """Train loss vs step (log-log) per variant: median of completed runs, 10-90% band, the
    power law fitted to the median from the median burn-in on, the median knee."""
    variants = sorted(df["variant"].unique())
    fig, axes = _panels(len(variants))
    colours = variant_colours(variants)
    for ax, variant in zip(axes, variants, strict=True):
        sub = df[(df["variant"] == variant) & (df["status"] == "completed")]
        curves = [series[r]["step"] for r in sub["run_id"] if "step" in series.get(r, {})]
        n_div = int(((df["variant"] == variant) & (df["status"] == "diverged")).sum())
        title = f"{variant}: {len(curves)} completed run(s)"
        title += f", {n_div} diverged (not shown)" if n_div else ""
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step t (step + 1)")
        ax.set_ylabel("train loss (nats)")
        if not curves:
            ax.text(0.5, 0.5, "no completed runs", ha="center", transform=ax.transAxes)
            continue
        t_max = max(float(c["step"].max()) + 1 for c in curves)
        edges = np.geomspace(1, t_max + 1, N_CURVE_BINS + 1)
        binned = np.array([_binned(c["step"] + 1, c["loss_train_nats"], edges) for c in curves])
        centres = np.sqrt(edges[:-1] * edges[1:])
        keep = np.isfinite(binned).any(axis=0)
        med, lo, hi = _median_band(binned[:, keep])
        x = centres[keep]
        colour = colours[variant]
        ax.fill_between(x, lo, hi, color=colour, alpha=0.25, lw=0, label="10-90% of runs")
        ax.plot(x, med, color=colour, lw=1.8, label="median run")
        burn = sub["burn_in_step"].to_numpy(dtype=float, na_value=np.nan)
        if not np.isfinite(burn).any():  # the protocol fits no power law before burn-in
            ax.plot([], [], " ", label="no run reached burn-in: no power-law fit")
            window = np.zeros_like(x, dtype=bool)
            start = 1.0
        else:
            start = float(np.nanmedian(burn)) + 1
            window = (x >= start) & np.isfinite(med)
        if window.sum() >= 3:
            fit = fit_power_law(x[window], med[window], n_bins=max(3, int(window.sum())))
            xs = x[window]
            ax.plot(
                xs,
                fit.prefactor * xs**-fit.exponent,
                "k--",
                lw=1.2,
                label=f"power law α={fit.exponent:.3f}, R²={fit.r2:.3f}",
            )
            if start > 1:
                ax.axvline(start, color="grey", lw=0.8, ls=":", label="median burn-in")
        knees = sub["knee_epoch"].to_numpy(dtype=float, na_value=np.nan)
        knees = knees[np.isfinite(knees)]
        spe = _steps_per_epoch(curves[0])
        if knees.size and spe:
            kt = float(np.median(knees)) * spe + 1
            ax.axvline(kt, color="crimson", lw=1.2, label=f"median knee ({knees.size} run(s))")
        ax.legend(fontsize=7, loc="lower left")
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
    fig.suptitle("Training loss vs step, log-log, with the fitted power law", fontsize=12)
    return _save(fig, path)


def _steps_per_epoch(curve: dict[str, np.ndarray]) -> float | None:
    """Steps per epoch from a step stream (``epoch`` counts steps done / spe)."""
    step, epoch = curve["step"], curve["epoch"]
    if len(step) and epoch[-1] > 0:
        return float((step[-1] + 1) / epoch[-1])
    return None


def alpha_vs_best_val(df: Any, path: Path, axes_cols: list[tuple[str, str]]) -> Path:
    """Scatter of alpha_early (and alpha_early_lr) against best_val_ce, coloured by variant."""
    fig, axes = _panels(len(axes_cols), width=5.0, height=4.0)
    variants = sorted(df["variant"].unique())
    colours = variant_colours(variants)
    done = df[df["status"] == "completed"]
    for ax, (col, label) in zip(axes, axes_cols, strict=True):
        for i, v in enumerate(variants):
            g = done[done["variant"] == v]
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
        ax.set_xlabel(f"{col} ({label})")
        ax.set_ylabel("best validation CE (nats)")
        ax.set_title(f"H2: {col} vs best_val_ce", fontsize=10)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=8, title="variant", title_fontsize=8)
    return _save(fig, path)


def r2_histogram(df: Any, path: Path, cols: list[str]) -> Path:
    """Stacked histogram (by variant) of the power-law R² of completed runs."""
    fig, axes = _panels(len(cols), width=5.0, height=3.6)
    variants = sorted(df["variant"].unique())
    colours = variant_colours(variants)
    done = df[df["status"] == "completed"]
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


def curvature(df: Any, series: dict, path: Path) -> Path:
    """λmax and Hessian trace vs step: median over each variant's runs, 10-90% band."""
    variants = sorted(df["variant"].unique())
    colours = variant_colours(variants)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for ax, col, label in (
        (axes[0], "lambda_max", "λmax (top Hessian eigenvalue)"),
        (axes[1], "hutch_trace", "Hessian trace (Hutchinson)"),
    ):
        for v in variants:
            runs = df[(df["variant"] == v) & df["status"].isin(["completed", "diverged"])]
            curves = [series[r]["curvature"] for r in runs["run_id"]
                      if "curvature" in series.get(r, {})]  # fmt: skip
            if not curves:
                continue
            steps = np.unique(np.concatenate([c["step"] for c in curves]))
            grid = np.full((len(curves), len(steps)), np.nan)
            for i, c in enumerate(curves):
                grid[i, np.searchsorted(steps, c["step"])] = c[col]
            med, lo, hi = _median_band(grid)
            ax.fill_between(steps, lo, hi, color=colours[v], alpha=0.2, lw=0)
            ax.plot(steps, med, color=colours[v], marker="o", ms=3, lw=1.5,
                    label=f"{v} ({len(curves)} runs)")  # fmt: skip
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} over training: median, 10-90% band", fontsize=10)
        ax.grid(True, alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _axes_values(df: Any) -> tuple[list[float], list[float]]:
    return sorted(df["lr"].unique()), sorted(df["weight_decay"].unique())


def val_loss_heatmap(df: Any, path: Path) -> Path:
    """Median final validation loss over seeds, per (lr, weight decay) cell, per variant."""
    variants = sorted(df["variant"].unique())
    fig, axes = _panels(len(variants), width=3.9, height=3.4)
    lrs, wds = _axes_values(df)
    finite = df["final_loss_val_nats"].to_numpy(dtype=float, na_value=np.nan)
    finite = finite[np.isfinite(finite)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = None
    for ax, v in zip(axes, variants, strict=True):
        grid = np.full((len(wds), len(lrs)), np.nan)
        for (i, wd), (j, lr) in ((a, b) for a in enumerate(wds) for b in enumerate(lrs)):
            cell = df[(df["variant"] == v) & (df["lr"] == lr) & (df["weight_decay"] == wd)]
            vals = cell["final_loss_val_nats"].to_numpy(dtype=float, na_value=np.nan)
            vals = vals[np.isfinite(vals)]
            if vals.size:
                grid[i, j] = np.median(vals)
            text = f"{grid[i, j]:.3g}" if vals.size else ("—" if cell.empty else "n/a")
            dark = vals.size and (grid[i, j] - vmin) > 0.55 * (vmax - vmin)  # viridis_r: dark
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")  # fmt: skip
        image = ax.imshow(grid, cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        _label_grid(ax, v, lrs, wds)
    if image is not None:
        fig.colorbar(image, ax=axes, label="final validation CE (nats), median over seeds")
    fig.suptitle("Final validation loss by lr x weight decay ('n/a': no finite value)")
    return _save(fig, path)


def status_heatmap(df: Any, path: Path) -> Path:
    """Share of completed runs per (lr, weight decay) cell, with counts by status."""
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
                continue
            counts = cell["status"].value_counts()
            grid[i, j] = counts.get("completed", 0) / len(cell)
            lines = [f"{counts[s]} {s}" for s in STATUS_ORDER if counts.get(s, 0)]
            ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8)
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        _label_grid(ax, v, lrs, wds)
    if image is not None:
        fig.colorbar(image, ax=axes, label="share of the cell's runs completed")
    fig.suptitle("Run status by lr x weight decay (runs per state in each cell)")
    return _save(fig, path)


def _label_grid(ax: Any, variant: str, lrs: list[float], wds: list[float]) -> None:
    ax.set_xticks(range(len(lrs)), [f"{x:g}" for x in lrs])
    ax.set_yticks(range(len(wds)), [f"{x:g}" for x in wds])
    ax.set_xlabel("peak lr")
    ax.set_ylabel("weight decay")
    ax.set_title(variant, fontsize=10)
