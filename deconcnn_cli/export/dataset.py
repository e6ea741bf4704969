"""The rows of ``results.csv`` (one per run of the manifest), built from the sweep. No torch.

Reads the sweep root (docs/sweep-root.md) and each run directory (docs/run-directory.md)
through :mod:`deconcnn_cli.contract` only. Every run of ``sweep.json`` gets a row, whatever its
state; a run with no directory is ``missing`` with empty metric cells.

Cell encoding (docs/data-dictionary.md): ``""`` = not defined, ``nan`` = could not be
computed, floats as the shortest positional decimal that reads back to the same double
(:func:`deconcnn_cli.export.files.format_float`: ``1e-07`` -> ``0.0000001``).
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deconcnn_cli import contract, fileio, streambound
from deconcnn_cli.analysis.settings import analysis_settings, settings_id
from deconcnn_cli.export.columns import COLUMN_NAMES
from deconcnn_cli.export.files import (
    ExportError,
)
from deconcnn_cli.sweep import manifest as sweep_manifest
from deconcnn_cli.sweep.manifest import MANIFEST_FILE, RUNS_DIR, job_run_ids, submissions

FORMATS = ("csv", "parquet")

# summary.json key -> column, where the names differ
_SUMMARY_KEYS = {"r_squared": "power_law_r2", "r_squared_lr": "power_law_r2_lr"}
# columns that fall back to the last defined value of shape.csv when summary.json lacks them
_SHAPE_FALLBACK = {
    "r_squared": "power_law_r2",
    "burn_in_step": "burn_in_step",
    "alpha_early": "alpha_early",
    "alpha_full": "alpha_full",
    "alpha_early_lr": "alpha_early_lr",
    "alpha_full_lr": "alpha_full_lr",
    "r_squared_lr": "power_law_r2_lr",
    "alpha_early_se": "alpha_early_se",
    "alpha_full_se": "alpha_full_se",
    "alpha_early_lr_se": "alpha_early_lr_se",
    "alpha_full_lr_se": "alpha_full_lr_se",
}


VerifyFn = Callable[[Path, contract.RunView], str | None]


def verify_problem(run_dir: Path, view: contract.RunView) -> str | None:
    """Why ``decon verify`` rejects a finished (completed or diverged) run; None if it passes.

    Unfinished runs are not judged here: their ``status`` already says what they are.
    """
    from deconcnn_cli.sweep.verify import verify_run

    if view.state not in contract.TERMINAL_STATES:
        return None
    _, problems = verify_run(run_dir, view.run_id)
    if not problems:
        return None
    first = problems[0]
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{first.kind}: {first.file or ''} {first.message}".replace("  ", " ") + more


@dataclass
class Dataset:
    """The exported table in memory: rows of Python values (None = not defined)."""

    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    root: Path
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> settings

    def settings_groups(self) -> list[dict[str, Any]]:
        """Each set of analysis settings with the runs that used it (metadata, report)."""
        out = []
        for sid, values in sorted(self.settings.items()):
            runs = [r for r in self.rows if r["analysis_settings"] == sid]
            out.append({"id": sid, "runs": len(runs), "settings": values})
        unknown = sum(r["analysis_settings"] is None for r in self.rows)
        if unknown:
            out.append({"id": None, "runs": unknown, "settings": None})
        return out

    def sweep_settings(self) -> dict[str, Any] | None:
        """The sweep's one set of analysis settings; None when its runs differ or none has any."""
        return next(iter(self.settings.values())) if len(self.settings) == 1 else None

    def counts_by_status(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Float text


# ---------------------------------------------------------------------------------------------
# Reading the sweep


def read_manifest(root: Path) -> dict[str, Any]:
    """sweep.json through the one checked reader, plus what export needs of each run entry."""
    manifest = sweep_manifest.read_manifest(root, ExportError)
    path, runs = root / MANIFEST_FILE, manifest["runs"]
    for run_id, spec in runs.items():
        if not isinstance(spec, dict):
            raise ExportError(f"{path}: run {run_id!r} is not an object", "see docs/sweep-root.md")
        missing = [k for k in ("variant", "lr", "weight_decay", "seed") if k not in spec]
        if missing:
            raise ExportError(
                f"{path}: run {run_id} lacks {', '.join(missing)}", "see docs/sweep-root.md"
            )
        wrong = [k for k in ("lr", "weight_decay", "seed") if not _finite(spec[k])]
        if wrong or not isinstance(spec["variant"], str):
            raise ExportError(
                f"{path}: run {run_id}: {', '.join(wrong or ['variant'])} of the wrong type",
                "see docs/sweep-root.md",
            )
    return manifest


def _num(value: Any) -> float | None:
    """A summary/status value as float; None stays None (not defined)."""
    if value is None or isinstance(value, bool) or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _cell(text: str | None, bad: list[str] | None = None) -> float | None:
    """:func:`contract.parse_cell`, with a cell that is not a number read as not defined (and
    counted in ``bad``, so the export says so)."""
    try:
        return contract.parse_cell(text)
    except ValueError:
        if bad is not None:
            bad.append(str(text))
        return None


def _finite(value: Any) -> bool:
    number = _num(value)
    return number is not None and math.isfinite(number)


def _last_defined(
    rows: list[dict[str, str]], key: str, bad: list[str] | None = None
) -> float | None:
    for row in reversed(rows):
        cell = row.get(key)
        if cell not in (None, ""):
            value = _cell(cell, bad)
            if value is not None:
                return value
    return None


def _max_defined(rows: list[dict[str, str]], key: str) -> float | None:
    """The largest finite value of ``key``; None when none is defined (NaN if all are NaN)."""
    values = []
    for r in rows:
        if r.get(key) in (None, ""):
            continue
        try:
            values.append(contract.parse_cell(r.get(key)))
        except (TypeError, ValueError):  # a garbage cell: not a value (reported elsewhere)
            continue
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite:
        return max(finite)
    return math.nan if values else None


def _last_row(path: Path) -> dict[str, str] | None:
    """The last whole row of a stream, without parsing the rest (step.csv can be long)."""
    try:
        with fileio.open_regular(path) as f:
            header = f.readline().decode(errors="replace")
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(len(header), size - 65536))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    lines = tail.split("\n")[:-1]  # drop a partial last line (or the "" after the newline)
    if not header.endswith("\n") or not lines or not lines[-1]:
        return None
    names = next(csv.reader([header.strip()]))
    cells = next(csv.reader([lines[-1]]))
    return dict(zip(names, cells, strict=False)) if len(cells) == len(names) else None


def _newest_checkpoint(run_dir: Path, root: Path) -> str | None:
    ckpts = sorted((run_dir / contract.CHECKPOINT_DIR).glob("ckpt_*.pt"))
    return str(ckpts[-1].relative_to(root)) if ckpts else None


def _submitted_jobs(manifest: dict[str, Any]) -> dict[str, list[str]]:
    jobs: dict[str, list[str]] = {}
    for sub in submissions(manifest):
        for job in sub["jobs"]:
            for run_id in job_run_ids(job):
                jobs.setdefault(run_id, []).append(str(job.get("job_id")))
    return jobs


def _run_code_version(manifest: dict[str, Any], run_id: str) -> str | None:
    for sub in reversed(submissions(manifest)):
        if any(run_id in job_run_ids(j) for j in sub["jobs"]):
            return _text(sub.get("code_version")) or _text(manifest.get("code_version"))
    return _text(manifest.get("code_version"))


def _text(value: Any) -> str | None:
    """A string field of a file, or None when it holds another type."""
    return value if isinstance(value, str) else None


def run_settings(run_dir: Path, summary: Mapping[str, Any], status: Mapping[str, Any]) -> Any:
    """The analysis settings a run's fits used: ``summary.json``'s record, else (a run with no
    summary yet, or one written before settings were recorded) derived from its
    ``config.json`` and steps per epoch with this version's fit constants; None if neither."""
    recorded = summary.get("analysis_settings")
    if isinstance(recorded, dict):
        return recorded
    record = contract.read_config(run_dir) or {}
    analysis = (record.get("config") or {}).get("analysis")
    spe = _num(status.get("steps_per_epoch"))
    if not isinstance(analysis, dict) or not spe:
        return None
    try:
        return analysis_settings(
            analysis["alpha_early_epochs"], analysis["burn_in_ce_nats"], int(spe)
        )
    except (KeyError, TypeError, ValueError):
        return None


def run_row(
    root: Path,
    run_id: str,
    spec: Mapping[str, Any],
    manifest: dict[str, Any],
    submitted: Mapping[str, list[str]],
    now: float,
    verify: VerifyFn | None = None,
    settings_seen: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One row of results.csv for ``run_id``: manifest axes + what its directory says.

    ``settings_seen`` (id -> settings) collects the analysis settings of the run, if given.
    """
    row: dict[str, Any] = dict.fromkeys(COLUMN_NAMES)
    row.update(
        run_id=run_id,
        variant=spec["variant"],
        seed=int(spec["seed"]),
        lr=float(spec["lr"]),
        weight_decay=float(spec["weight_decay"]),
        submitted_job_ids=";".join(submitted.get(run_id, [])) or None,
        code_version=_run_code_version(manifest, run_id),
    )
    run_dir = root / RUNS_DIR / run_id
    view = contract.view_run(run_dir, now=now)
    row["status"] = view.state
    if view.state == contract.MISSING:
        return row
    status = view.status
    summary = contract.read_summary(run_dir) or {}
    attempts = contract.read_attempts(run_dir)
    n_rows = streambound.run_stream_rows(view.total_steps)
    too_long = {
        name: why
        for name in contract.STREAMS
        if (why := streambound.stream_too_long(contract.stream_path(run_dir, name), name, n_rows))
    }
    if too_long:  # reported, and read as empty: a runaway file never fills the memory
        row["_too_long"] = [f"{contract.METRICS_DIR}/{n}.csv: {w}" for n, w in too_long.items()]

    def stream(name: str) -> list[dict[str, str]]:
        if name in too_long:
            return []
        path = contract.stream_path(run_dir, name)
        return streambound.read_stream_within(path, streambound.stream_byte_limit(name, n_rows))

    shape = stream("shape")
    val = stream("val")
    last_step = None if "step" in too_long else _last_row(contract.stream_path(run_dir, "step"))
    last_curv = None
    if "curvature" not in too_long:
        last_curv = _last_row(contract.stream_path(run_dir, "curvature"))

    bad: list[str] = []  # cells that are not numbers: left empty, and said so
    for col in ("knee_epoch", "burn_in_loss", "best_val_ce", "best_val_epoch", "burn_in_step"):
        row[col] = _num(summary.get(col))
    for col, shape_key in _SHAPE_FALLBACK.items():
        row[col] = _num(summary.get(_SUMMARY_KEYS.get(col, col)))
        if row[col] is None:  # no summary (failed / still running) or an older one: streams
            row[col] = _last_defined(shape, shape_key, bad)
    censored = summary.get("knee_censored")
    row["knee_censored"] = None if censored is None else bool(censored)
    if row["best_val_ce"] is None and val:
        pairs = [(_cell(r.get("loss_val_nats"), bad), _cell(r.get("epoch"), bad)) for r in val]
        finite = [(c, e) for c, e in pairs if c is not None and e is not None and math.isfinite(c)]
        if finite:
            row["best_val_ce"], row["best_val_epoch"] = min(finite)
    if last_step is not None:
        row["final_loss_train_nats"] = _cell(last_step.get("loss_train_nats"), bad)
        row["final_acc_train"] = _cell(last_step.get("acc_train"), bad)
    if val:
        row["final_loss_val_nats"] = _cell(val[-1].get("loss_val_nats"), bad)
        row["final_acc_val"] = _cell(val[-1].get("acc_val"), bad)
    if last_curv is not None:
        row["lambda_max_last"] = _cell(last_curv.get("lambda_max"), bad)
        row["hutch_trace_last"] = _cell(last_curv.get("hutch_trace"), bad)
        row["sharpness_norm_last"] = _cell(last_curv.get("sharpness_norm"), bad)
        row["sharpness_norm_max"] = _max_defined(stream("curvature"), "sharpness_norm")
    if bad:
        row["_bad_cells"] = bad

    spe = _num(status.get("steps_per_epoch"))
    row["steps_done"] = float(view.steps_done)
    row["total_steps"] = _num(view.total_steps)
    row["epochs_done"] = view.steps_done / spe if spe else _num(status.get("epoch"))
    if row["epochs_done"] is None and summary:  # status.json unreadable: the summary knows
        row["epochs_done"] = _num(summary.get("epochs_done"))
    numbers = {a.get("attempt") for a in attempts if isinstance(a.get("attempt"), int)}
    row["attempts"] = float(max(view.attempt, len(numbers)))
    row["job_ids"] = ";".join(
        dict.fromkeys(str(a["slurm_job_id"]) for a in attempts if a.get("slurm_job_id"))
    )
    row["job_ids"] = row["job_ids"] or None
    made_by = dict.fromkeys(str(a["code_version"]) for a in attempts if a.get("code_version"))
    if made_by:  # what really ran (every attempt's version); the manifest says what was sent
        row["code_version"] = ";".join(made_by)
    hosts = [a["host"] for a in attempts if _text(a.get("host"))]
    row["host"] = status.get("host") or (hosts[-1] if hosts else None)
    row["failure_reason"] = view.reason if view.state != contract.COMPLETED else None
    row["exception_type"] = status.get("exception_type")
    row["checkpoint_path"] = _newest_checkpoint(run_dir, root)
    row["precision"] = status.get("precision") or _text(summary.get("precision"))
    settings = run_settings(run_dir, summary, status)
    if settings is not None:
        row["analysis_settings"] = settings_id(settings)
        if settings_seen is not None:
            settings_seen[row["analysis_settings"]] = settings
    if verify is not None:
        row["verify_problem"] = verify(run_dir, view)
    return row


def collect(
    root: str | os.PathLike[str], verify: VerifyFn | None = None, now: float | None = None
) -> Dataset:
    """Every run of ``root/sweep.json`` as a row, ordered by variant, lr, weight decay, seed."""
    root = Path(root)
    manifest = read_manifest(root)
    now = time.time() if now is None else now
    submitted = _submitted_jobs(manifest)
    seen: dict[str, dict[str, Any]] = {}
    rows = [
        run_row(root, run_id, spec, manifest, submitted, now, verify, seen)
        for run_id, spec in manifest["runs"].items()
    ]
    rows.sort(key=lambda r: (r["variant"], r["lr"], r["weight_decay"], r["seed"], r["run_id"]))
    data = Dataset(rows=rows, manifest=manifest, root=root, settings=seen)
    if len(seen) > 1:
        groups = ", ".join(f"{g['id']} ({g['runs']} runs)" for g in data.settings_groups())
        data.warnings.append(
            f"runs used {len(seen)} different analysis settings ({groups}): H1/H2 are computed "
            "per settings, never pooled; see analysis_settings in the metadata"
        )
    for row in rows:
        bad = row.pop("_bad_cells", None)
        if bad:
            data.warnings.append(
                f"{row['run_id']}: {len(bad)} stream cell(s) not a number, left empty "
                f"(first {bad[0][:20]!r})"
            )
        for why in row.pop("_too_long", None) or []:
            data.warnings.append(f"{row['run_id']}: {why}; its values left empty")
        if row["verify_problem"]:
            data.warnings.append(f"{row['run_id']} fails verification: {row['verify_problem']}")
    runs_dir = root / RUNS_DIR
    if runs_dir.is_dir():
        extra = sorted(p.name for p in runs_dir.iterdir() if p.name not in manifest["runs"])
        if extra:
            data.warnings.append(
                f"{len(extra)} run directories not in sweep.json are not exported: "
                + ", ".join(extra[:5])
                + (" ..." if len(extra) > 5 else "")
            )
    return data
