"""What a reader of the report must know beside the verdicts: the runs each hypothesis left
out and why, and when the sweep is too short or too small for a verdict to mean much.

Pure functions of the results table (the export's DataFrame); the report prints them on
screen, on the page and in report.json. The rule for which runs count is
:func:`stats.finished` plus a finite value in the hypothesis' columns (``stats._eligible``);
this module only says, for each run that does not count, which part of that rule it fails.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from deconcnn_cli.config import ScheduleConfig
from deconcnn_cli.export import stats

PROTOCOL_EPOCHS = ScheduleConfig().epochs  # the protocol's run length (METRICS.md)
H2_FEW_RUNS = 20  # below this a rank correlation's interval is wide (the report's own text)


def hypothesis_columns(df: Any) -> dict[str, tuple[str, ...]]:
    """Each hypothesis table's label and the columns a run needs to count in it (as
    ``report.hypothesis_tables`` builds them)."""
    out = {"H1 (step time)": ("r_squared",), "H2 (step time)": ("alpha_early", "best_val_ce")}
    if stats.has_values(df, "r_squared_lr"):
        out["H1 (lr time)"] = ("r_squared_lr",)
    if stats.has_values(df, "alpha_early_lr"):
        out["H2 (lr time)"] = ("alpha_early_lr", "best_val_ce")
    return out


def excluded_runs(df: Any, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """Every run that does not count in a table on ``columns``, with why (diverged runs
    too: they are counted apart, never in the share)."""
    done = stats.finished(df).to_numpy()
    out = []
    for i, row in enumerate(df.to_dict("records")):
        status = str(row.get("status"))
        if status == "diverged":
            why = "diverged (counted apart)"
        elif status != "completed":
            reason = row.get("failure_reason")
            why = status + (f": {reason}" if isinstance(reason, str) and reason else "")
        elif not done[i]:
            why = f"fails verification: {row.get('verify_problem')}"
        else:
            missing = [c for c in columns if not _finite(row.get(c))]
            if not missing:
                continue
            why = "no " + " and no ".join(missing) + _no_value_why(missing)
        out.append({"run_id": str(row["run_id"]), "variant": str(row["variant"]), "why": why})
    return out


def exclusions(df: Any) -> dict[str, list[dict[str, str]]]:
    """:func:`excluded_runs` for every hypothesis table of the report."""
    return {label: excluded_runs(df, cols) for label, cols in hypothesis_columns(df).items()}


def sweep_caveats(df: Any, h1: list[stats.H1Row], h2: list[stats.H2Row]) -> list[str]:
    """When the sweep is too short or too small for the verdicts to mean much, each said
    in a sentence (empty when neither)."""
    out = []
    done = df[df["status"] == "completed"]  # a run's full length: what its schedule asked
    epochs = done["epochs_done"].to_numpy(dtype=float, na_value=np.nan)
    epochs = epochs[np.isfinite(epochs)]
    if epochs.size and epochs.max() < PROTOCOL_EPOCHS:
        out.append(
            f"too short: the runs trained at most {epochs.max():.3g} epochs (the protocol: "
            f"{PROTOCOL_EPOCHS}); the power-law fits and alpha_early describe the start of a "
            "curve, so the verdicts do not test H1 and H2"
        )
    need = runs_for_h1_support()
    for row in h1:
        if row.group == "all" and row.n_runs < need:
            out.append(
                f"too small for H1 ({row.time_axis} time): {row.n_runs} runs count; even if all "
                f"fit a power law the 95% interval would not lie above {stats.H1_TARGET:.0%} "
                f"(that takes at least {need} runs), so H1 cannot be supported by this sweep"
            )
    for row in h2:
        if row.group == "all" and row.n_runs < H2_FEW_RUNS:
            out.append(
                f"too small for H2 ({row.time_axis} time): {row.n_runs} runs count; with fewer "
                f"than about {H2_FEW_RUNS} the interval of rho is too wide to read much into"
            )
    return out


def runs_for_h1_support() -> int:
    """The fewest runs whose exact interval can lie above H1's target (all of them fits)."""
    n = 1
    while stats.clopper_pearson(n, n)[0] <= stats.H1_TARGET:
        n += 1
    return n


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _no_value_why(missing: list[str]) -> str:
    if any(c.startswith("r_squared") or c.startswith("alpha") for c in missing):
        return " (no fit in the run's summary, e.g. its loss never fell below the burn-in)"
    return ""
