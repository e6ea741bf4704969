"""The columns of ``results.csv``: name, dtype, unit and source, in one table. No torch.

``docs/data-dictionary.md`` describes every column at length; this table is what the code
writes, checks (:func:`require_columns`) and puts in ``results_metadata.json``. A test keeps the
two in step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from deconcnn_cli.errors import DeconError

SCHEMA_VERSION = 2  # 2: analysis_settings


class SchemaError(DeconError):
    """A results table that lacks columns the reader needs."""


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # "int" | "Int64" (an integer that may be empty) | "float" | "string"
    unit: str  # "" when dimensionless or not a quantity
    description: str


def _f(name: str, unit: str, description: str) -> Column:
    return Column(name, "float", unit, description)


def _i(name: str, unit: str, description: str) -> Column:
    """An integer count that can be empty (pandas' nullable ``Int64``)."""
    return Column(name, "Int64", unit, description)


def _s(name: str, description: str) -> Column:
    return Column(name, "string", "", description)


COLUMNS: tuple[Column, ...] = (
    _s("run_id", "run identifier (sweep.json `runs` key, run directory name)"),
    _s("variant", "loss_lin_slope variant (base, bn_off, narrow, adamw, ...)"),
    Column("seed", "int", "", "run seed, the only source of randomness"),
    _f("lr", "per batch", "peak learning rate (end of warmup)"),
    _f("weight_decay", "", "weight-decay coefficient (coupled for SGD, decoupled for AdamW)"),
    _s(
        "status",
        "completed | diverged | failed | interrupted | running | stalled | missing | unreadable",
    ),
    # the seed's Tier-4 contract
    _f("r_squared", "", "R^2 (log space, binned) of the step-time power-law fit = power_law_r2"),
    _f(
        "knee_epoch",
        "epochs",
        "two-segment break (BIC gain > {knee_min_bic_gain}, bins "
        "{knee_bin_width_log_t} wide in ln t) of the alpha_full window; empty if none",
    ),
    _s("knee_censored", "true when the best break sits at the edge of the window"),
    _f(
        "burn_in_loss",
        "nats",
        "train CE at burn_in_step, smoothed over {burn_in_smooth_window_steps} steps (centred)",
    ),
    _i(
        "burn_in_step",
        "steps",
        "first step whose smoothed train CE ({burn_in_smooth_window_steps}"
        "-step centred window) <= {burn_in_ce_nats} nats",
    ),
    _f(
        "alpha_early",
        "",
        "power-law exponent of train CE vs t = step + 1 over epochs "
        "{alpha_early_epochs} ({fit_bins} log-uniform bins)",
    ),
    _f(
        "alpha_full",
        "",
        "power-law exponent of train CE vs t = step + 1 from burn-in to the end"
        " ({fit_bins} log-uniform bins)",
    ),
    _f(
        "alpha_early_se",
        "",
        "OLS standard error of alpha_early on its bins (conditional "
        "on the binned regression; ignores residual autocorrelation)",
    ),
    _f("alpha_full_se", "", "OLS standard error of alpha_full on its bins"),
    _f("best_val_ce", "nats", "minimum validation cross-entropy over the run"),
    _f(
        "best_val_epoch",
        "epochs",
        "fractional epoch of best_val_ce: (step + 1) / steps_per_epoch at that validation point",
    ),
    # final values
    _f("final_loss_train_nats", "nats", "train CE of the last logged step"),
    _f("final_acc_train", "fraction", "train accuracy of the last logged step's batch"),
    _f("final_loss_val_nats", "nats", "validation CE at the last validation point"),
    _f("final_acc_val", "fraction", "validation accuracy at the last validation point"),
    _f("lambda_max_last", "nats/param^2", "last logged top Hessian eigenvalue"),
    _f("hutch_trace_last", "nats/param^2", "last logged Hessian trace estimate"),
    _f(
        "sharpness_norm_last",
        "",
        "last (lambda_max + wd) * lr_t / SGD's stability threshold "
        "2(1 + momentum) (Nesterov: / (1 + 2 momentum)); 1 = edge of stability; empty for AdamW",
    ),
    _f("sharpness_norm_max", "", "maximum of sharpness_norm over the run's curvature evaluations"),
    # lr-time fits
    _f(
        "alpha_early_lr",
        "",
        "alpha_early (epochs {alpha_early_epochs}) fitted against cumulative learning rate",
    ),
    _f("alpha_full_lr", "", "alpha_full fitted against cumulative learning rate"),
    _f("alpha_early_lr_se", "", "OLS standard error of alpha_early_lr"),
    _f("alpha_full_lr_se", "", "OLS standard error of alpha_full_lr"),
    _f("r_squared_lr", "", "R^2 of the lr-time power-law fit = power_law_r2_lr"),
    # progress and provenance
    _i("steps_done", "steps", "optimizer steps completed"),
    _i("total_steps", "steps", "planned optimizer steps"),
    _f("epochs_done", "epochs", "steps_done / steps_per_epoch"),
    _i("attempts", "", "number of starts (first run + resumes; attempts.jsonl start lines)"),
    _s("job_ids", "scheduler job ids that ran the run (attempts.jsonl), ';'-separated"),
    _s("submitted_job_ids", "scheduler job ids asked to run it (sweep.json), ';'-separated"),
    _s("host", "host of the last attempt"),
    _s("failure_reason", "status.json reason (failed / diverged / interrupted)"),
    _s("exception_type", "exception class of a failed run"),
    _s("checkpoint_path", "newest checkpoint file, relative to the sweep root"),
    _s("precision", "fp32 | fp16 | bf16 as run"),
    _s(
        "code_version",
        "package version + git sha of the code that ran the run (every distinct version of its "
        "attempts, ';'-joined); a run never started: the version it was submitted with",
    ),
    _s("verify_problem", "why `decon verify` rejects the run; empty when it passes"),
    _s(
        "analysis_settings",
        "id of the analysis settings the run's fits used (metadata "
        "`analysis_settings`); runs with different ids are never pooled",
    ),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
SETTINGS_DIFFER = "differs between runs: see analysis_settings"
DTYPES: dict[str, str] = {c.name: c.dtype for c in COLUMNS}


def require_columns(present: Iterable[str], required: Iterable[str], source: str) -> None:
    """Raise :class:`SchemaError` naming every column of ``required`` not in ``present``."""
    have = set(present)
    missing = [c for c in required if c not in have]
    if missing:
        raise SchemaError(
            f"Missing required columns: {', '.join(missing)} (in {source})",
            "export it again with `decon export` of this version, or fix the file's header",
        )


def _setting_text(value: Any) -> str:
    if isinstance(value, list) and len(value) == 2:  # an epoch window, [start, end)
        return f"[{value[0]:g}, {value[1]:g})"
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(column: Column, settings: Mapping[str, Any] | None) -> str:
    """``column``'s description with the analysis settings it depends on filled in.

    ``settings`` is the sweep's one set of analysis settings; None when its runs differ (or
    none recorded any): each setting then reads "differs between runs: see analysis_settings".
    """
    keys = re.findall(r"{(\w+)}", column.description)
    if not keys:
        return column.description
    values = {k: SETTINGS_DIFFER if settings is None or k not in settings
              else _setting_text(settings[k]) for k in keys}  # fmt: skip
    return column.description.format(**values)
