"""Certify a sweep: every run present and final, every stream whole, nothing silently wrong.

:func:`verify_sweep` checks, for every run of the manifest (docs/cluster.md, "verify"):

* the run directory exists and its state is ``completed`` or ``diverged``;
* each metric stream (contract.STREAMS) holds exactly the steps its cadence gives — derived
  from the run's ``config.json`` and ``steps_per_epoch`` in ``status.json`` — in order, without
  gaps or duplicates; a diverged run's streams stop at its divergence;
* no ``nan``/``inf`` cell outside a diverged run, except the documented cases: a warning in
  ``events.jsonl`` at that row's step (a metric that failed and said why), or a column that
  is NaN by definition while too little of the curve exists (``DOCUMENTED_NAN_COLUMNS``);
* ``summary.json`` holds every field (``SUMMARY_FIELDS``) and agrees with the run's state;
* ``config.json``'s config gives the run's id and its ``config_hash`` when both are
  recomputed from it (a config swapped for another run's does not pass);
* every kept checkpoint matches its ``.sha256``, and a completed run has its final one;
* every run was made by the same code version (the differing runs are listed otherwise).

:func:`verify_run` checks one run directory (``export`` may call it). Torch-free.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deconcnn_cli import contract, fileio, streambound
from deconcnn_cli.sweep.identity import identity_mismatches
from deconcnn_cli.sweep.manifest import job_run_ids, submissions
from deconcnn_cli.sweep.observe import load_sweep
from deconcnn_cli.training.schedule import val_steps_in_epoch

# ---- exit codes of `decon verify` (docs/cluster.md)
EXIT_VERIFIED = 0  # complete and clean
EXIT_PROBLEMS = 1  # at least one problem, each listed with its run and file
# bad input (not a sweep root): DeconError's exit code 2, as every command

MAX_CHECKED_STEPS = 10**8  # a config.json claiming more steps is refused as unreadable
SUMMARY_FIELDS = (
    "state",
    "steps_done",
    "epochs_done",
    "final_loss_train_nats",
    "final_loss_val_nats",
    "final_acc_val",
    "best_val_ce",
    "best_val_epoch",
    "knee_epoch",
    "alpha_early",
    "alpha_full",
    "power_law_r2",
    "burn_in_step",
)
# NaN by definition while too little of the curve exists (docs/metrics-curve-shape.md,
# docs/metrics.md): a fit window not reached yet, fewer than the needed residual samples, and
# grad_noise_scale whose denominator (the unbiased |g|^2 estimate) is <= 0 (METRICS.md)
DOCUMENTED_NAN_COLUMNS: dict[str, frozenset[str]] = {
    "shape": frozenset(contract.STREAMS["shape"]) - {"step", "epoch", "burn_in_step"},
    "noise": frozenset({"residual_power", "psd_tail", "grad_noise_scale"}),
}


@dataclass(frozen=True)
class Problem:
    run_id: str | None  # None for a sweep-wide problem
    file: str | None  # relative to the run directory (or the root)
    kind: str  # missing_run, unfinished, stream_gap, stream_duplicate, ...
    message: str


@dataclass
class VerifyResult:
    root: Path
    n_runs: int
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    code_versions: dict[str, list[str]] = field(default_factory=dict)  # version -> run ids

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return EXIT_VERIFIED if self.ok else EXIT_PROBLEMS

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "n_runs": self.n_runs,
            "counts": self.counts,
            "code_versions": {v: len(r) for v, r in self.code_versions.items()},
            "problems": [asdict(p) for p in self.problems],
        }


def expected_steps(config: dict[str, Any], steps_per_epoch: int) -> dict[str, list[int]]:
    """Every stream's row steps for a whole run of ``config`` (a resolved RunConfig dict)."""
    spe = steps_per_epoch
    epochs = int(config["schedule"]["epochs"])
    if not 1 <= epochs * spe <= MAX_CHECKED_STEPS:
        raise ValueError(f"{epochs} epochs x {spe} steps is not a run verify can check")
    cad = config["cadence"]
    total = epochs * spe
    vals = sorted(val_steps_in_epoch(spe, int(cad["val_per_epoch"])))

    def epoch_ends(every: int) -> list[int]:
        return [(e + 1) * spe - 1 for e in range(epochs) if every and (e + 1) % every == 0]

    curv = int(cad["curvature_every_steps"])
    return {
        "step": list(range(total)),
        "val": [e * spe + p for e in range(epochs) for p in vals],
        "curvature": list(range(0, total, curv)) if curv else [],
        "noise": epoch_ends(int(cad["noise_every_epochs"])),
        "shape": epoch_ends(int(cad["shape_every_epochs"])),
    }


def _stream_problems(
    run_id: str, name: str, steps: list[int], expected: list[int], diverged_at: int | None
) -> list[Problem]:
    if diverged_at is None and steps == expected:  # the common case, decided in one comparison
        return []
    file = f"{contract.METRICS_DIR}/{name}.csv"
    out: list[Problem] = []
    seen = set(steps)
    dups = sorted(s for s, n in Counter(steps).items() if n > 1)
    if dups:
        out.append(Problem(run_id, file, "stream_duplicate", f"duplicate steps {dups[:5]}"))
    if diverged_at is None:
        must, may = expected, expected
    else:  # streams stop at the divergence; curvature runs before the update of its step
        inclusive = name in ("step", "curvature")
        must = [s for s in expected if s < diverged_at or (inclusive and s == diverged_at)]
        may = expected[: len(steps)]
    missing = sorted(set(must) - seen)
    extra = sorted(seen - set(may))
    if missing:
        out.append(
            Problem(
                run_id,
                file,
                "stream_gap",
                f"{len(missing)} of {len(must)} expected rows missing (first at step "
                f"{missing[0]}; last row at step {steps[-1] if steps else 'none'})",
            )
        )
    if extra:
        out.append(Problem(run_id, file, "stream_extra", f"rows off cadence at steps {extra[:5]}"))
    if not dups and steps != sorted(steps):
        out.append(Problem(run_id, file, "stream_order", "rows are not in step order"))
    return out


def _nan_problems(
    run_id: str, name: str, rows: list[dict[str, str]], warned_steps: set[int]
) -> list[Problem]:
    allowed = DOCUMENTED_NAN_COLUMNS.get(name, frozenset())
    bad: list[str] = []
    for row in rows:
        for col, cell in row.items():
            if col is None:  # csv.DictReader's key for cells beyond the header
                bad.append(f"step {row.get('step')} {len(cell)} cell(s) beyond the header")
                continue
            if cell is None or cell == "" or col in allowed:
                continue
            try:
                value = float(cell)
            except ValueError:
                bad.append(f"step {row.get('step')} {col}={cell!r} (not a number)")
                continue
            if not math.isfinite(value) and int(row.get("step") or -1) not in warned_steps:
                bad.append(f"step {row.get('step')} {col}={cell}")
    if not bad:
        return []
    msg = f"{len(bad)} non-finite cell(s) without a warning in events.jsonl: {'; '.join(bad[:3])}"
    return [Problem(run_id, f"{contract.METRICS_DIR}/{name}.csv", "nan", msg)]


def _regular_table(path: Path, limit: int) -> Any | None:
    """The stream's whole lines as a pandas DataFrame of numbers, when the file is regular:
    every line (header included) has the header's number of cells, no blank line, no quote or
    carriage return, a unique header starting with ``step``, an integer ``step`` column and
    numeric columns only. None otherwise, and the caller reads it row by row with
    :func:`contract.read_stream` (the reference reading; this one is only its fast path).

    Like :func:`fileio.complete_lines`, a partial last line is left out. ``""`` and ``nan``
    both read as NaN here, so a caller that finds any NaN must look at the cells themselves.
    A file over ``limit`` bytes is not read (None).
    """
    try:
        data = fileio.read_regular(path, limit)
    except OSError:
        return None
    data = data[: data.rfind(b"\n") + 1]
    if not data or b"\r" in data or b'"' in data:
        return None
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw == ord("\n"))
    if len(ends) < 2:  # a header alone (or nothing): nothing to gain
        return None
    commas_before = np.searchsorted(np.flatnonzero(raw == ord(",")), ends)
    per_line = np.diff(commas_before, prepend=0)
    if (per_line != per_line[0]).any() or (np.diff(ends, prepend=-1) == 1).any():
        return None  # a ragged row or a blank line
    try:
        header = data[: ends[0]].decode().split(",")
    except UnicodeDecodeError:
        return None
    if header[0] != "step" or len(set(header)) != len(header):
        return None
    import pandas as pd  # here, not at the top: `decon monitor` imports this module

    try:
        table = pd.read_csv(
            io.BytesIO(data),
            header=0,
            index_col=False,
            keep_default_na=False,
            na_values=[""],
            comment=None,
            skip_blank_lines=False,
            quoting=csv.QUOTE_NONE,
            engine="c",
            low_memory=False,
        )
    except (ValueError, pd.errors.ParserError):
        return None
    dtypes = list(table.dtypes)
    if dtypes[0] != np.int64 or any(d.kind not in "if" for d in dtypes):
        return None
    return table


def _check_stream(
    run_id: str,
    name: str,
    path: Path,
    expected: list[int],
    diverged_at: int | None,
    warned: set[int],
) -> list[Problem]:
    """A stream's problems: its steps against its cadence and, unless the run diverged, its
    non-finite cells. A regular stream whose checked cells are all finite numbers is decided
    from one vectorised parse; anything else is read cell by cell as ``_nan_problems`` says.
    A stream far longer than its expected rows allow (:func:`streambound.stream_too_long`) is
    reported from its size and not read: memory stays bounded by what the config gives."""
    rel = f"{contract.METRICS_DIR}/{name}.csv"
    too_long = streambound.stream_too_long(path, name, len(expected))
    if too_long is not None:
        return [Problem(run_id, rel, "stream_too_long", too_long)]
    limit = streambound.stream_byte_limit(name, len(expected))
    header = _header_problem(name, path)
    if header is not None:  # columns not the documented ones: the cells cannot be trusted
        return [Problem(run_id, f"{contract.METRICS_DIR}/{name}.csv", "stream_header", header)]
    table = _regular_table(path, limit)
    rows: list[dict[str, str]] | None = None
    if table is not None:
        steps = table["step"].tolist()
        if diverged_at is None:
            allowed = DOCUMENTED_NAN_COLUMNS.get(name, frozenset())
            checked = [c for c in table.columns if c not in allowed]
            if not np.isfinite(table[checked].to_numpy(dtype=np.float64)).all():
                rows = streambound.read_stream_within(path, limit)  # a NaN, inf or empty cell
    else:
        rows = streambound.read_stream_within(path, limit)
        try:
            steps = [int(r["step"]) for r in rows]
        except (KeyError, TypeError, ValueError):
            rel = f"{contract.METRICS_DIR}/{name}.csv"
            return [Problem(run_id, rel, "unreadable", "a row without an integer step")]
    out = _stream_problems(run_id, name, steps, expected, diverged_at)
    if diverged_at is None and rows is not None:
        out += _nan_problems(run_id, name, rows, warned)
    return out


def _header_problem(name: str, path: Path) -> str | None:
    """Why the stream's header is not its documented one (or the documented one without the
    columns appended since, as a run begun by older code writes it); None when it is."""
    try:
        with fileio.open_regular(path) as f:
            first = f.readline(65536).decode(errors="replace")
    except OSError:
        return None  # unreadable: the row checks say what is missing
    if not first.strip():
        return None
    columns = tuple(first.rstrip("\r\n").split(","))
    documented = contract.STREAMS[name]
    added = contract.STREAM_COLUMNS_ADDED.get(name, ())
    older = tuple(c for c in documented if c not in added)
    if columns in (documented, older):
        return None
    text = ",".join(columns)
    return f"header {text[:200]!r} is not the documented {','.join(documented)!r}"


def _sha256(path: Path) -> str | None:
    """The file's SHA-256, or None when it cannot be read (a directory, no permission)."""
    h = hashlib.sha256()
    try:
        with fileio.open_regular(path) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def _checkpoint_problems(run_id: str, run_dir: Path, final_step: int | None) -> list[Problem]:
    folder = run_dir / contract.CHECKPOINT_DIR
    out = []
    for ckpt in sorted(folder.glob("ckpt_*.pt")):
        rel = f"{contract.CHECKPOINT_DIR}/{ckpt.name}"
        try:
            sha = fileio.read_regular(ckpt.with_suffix(".sha256"))
            expected = sha.decode().split()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            out.append(Problem(run_id, rel, "checksum", "no readable .sha256 beside it"))
            continue
        if _sha256(ckpt) != expected:
            out.append(Problem(run_id, rel, "checksum", "content does not match its .sha256"))
    if final_step is not None and not (folder / f"ckpt_{final_step:09d}.pt").is_file():
        out.append(
            Problem(
                run_id,
                f"{contract.CHECKPOINT_DIR}/ckpt_{final_step:09d}.pt",
                "checkpoint_missing",
                "the final checkpoint of a completed run is missing",
            )
        )
    return out


def verify_run(run_dir: Path, run_id: str | None = None) -> tuple[str, list[Problem]]:
    """(the run's state, its problems) for one run directory."""
    run_id = run_id or run_dir.name
    if not run_dir.is_dir():
        return contract.MISSING, [Problem(run_id, None, "missing_run", f"no directory {run_dir}")]
    view = contract.view_run(run_dir)
    if view.unreadable is not None:  # judged from other evidence: say so, check no further
        return view.state, [Problem(run_id, contract.STATUS_FILE, "unreadable", view.reason or "")]
    if view.state not in contract.TERMINAL_STATES:
        why = f" ({view.reason})" if view.reason else ""
        return view.state, [
            Problem(run_id, contract.STATUS_FILE, "unfinished", f"state {view.state}{why}")
        ]
    record = contract.read_config(run_dir)
    spe = view.status.get("steps_per_epoch")
    config = (record or {}).get("config")
    if not isinstance(config, dict) or not isinstance(spe, int) or spe < 1:
        what = "config.json" if not isinstance(config, dict) else "steps_per_epoch"
        return view.state, [Problem(run_id, contract.CONFIG_FILE, "unreadable", f"no {what}")]
    try:
        expected = expected_steps(config, spe)
    except (KeyError, TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        msg = f"config has no usable schedule/cadence ({type(exc).__name__}: {exc})"
        return view.state, [Problem(run_id, contract.CONFIG_FILE, "unreadable", msg)]
    problems: list[Problem] = []
    total = len(expected["step"])
    if view.state == contract.COMPLETED and (view.steps_done, view.total_steps) != (total, total):
        problems.append(
            Problem(
                run_id,
                contract.STATUS_FILE,
                "status_steps",
                f"completed at step {view.steps_done} of {view.total_steps}, but its config gives "
                f"{total} steps",
            )
        )
    if record.get("run_id") not in (None, run_id):
        problems.append(
            Problem(run_id, contract.CONFIG_FILE, "foreign", f"holds run {record['run_id']!r}")
        )
    problems += [
        Problem(run_id, contract.CONFIG_FILE, "identity", why)
        for why in identity_mismatches(run_id, record)
    ]
    diverged = view.state == contract.DIVERGED
    summary = contract.read_summary(run_dir)
    diverged_at = None
    if diverged:
        done = (summary or {}).get("steps_done", view.steps_done)
        done = done if isinstance(done, int) and not isinstance(done, bool) else view.steps_done
        diverged_at = done - 1
    events, bad_events = fileio.read_jsonl_checked(run_dir / contract.EVENTS_FILE)
    _, bad_attempts = fileio.read_jsonl_checked(run_dir / contract.ATTEMPTS_FILE)
    for name, bad in ((contract.EVENTS_FILE, bad_events), (contract.ATTEMPTS_FILE, bad_attempts)):
        if bad:
            msg = f"{len(bad)} line(s) not a JSON object, skipped: line {bad[0]}"
            problems.append(Problem(run_id, name, "bad_line", msg))
    warned = {
        int(ev["step"])
        for ev in events
        if ev.get("level") == "warning" and isinstance(ev.get("step"), int)
    }
    home = run_dir.resolve()
    for name in contract.STREAMS:
        path = contract.stream_path(run_dir, name)
        if not expected[name] and not path.exists():
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(home):
            # not the run's data (export leaves it out too): named, never read
            rel = f"{contract.METRICS_DIR}/{name}.csv"
            msg = f"links outside the run directory, to {path.resolve()}"
            problems.append(Problem(run_id, rel, "foreign_link", msg))
            continue
        found = _check_stream(run_id, name, path, expected[name], diverged_at, warned)
        problems += found
        if any(p.kind == "stream_too_long" for p in found):
            continue  # named from its size, read no further
        tail = fileio.partial_tail(path)
        if tail:  # a run that ended wrote whole lines only
            what = "NUL bytes" if not tail.strip(b"\0") else "bytes"
            problems.append(
                Problem(
                    run_id,
                    f"{contract.METRICS_DIR}/{name}.csv",
                    "stream_partial",
                    f"{len(tail)} {what} after the last whole line",
                )
            )
    if summary is None:
        problems.append(Problem(run_id, contract.SUMMARY_FILE, "summary", "missing or unreadable"))
    else:
        absent = [f for f in SUMMARY_FIELDS if f not in summary]
        if absent:
            problems.append(
                Problem(run_id, contract.SUMMARY_FILE, "summary", f"fields missing: {absent}")
            )
        if summary.get("state") not in (None, view.state):
            problems.append(
                Problem(
                    run_id,
                    contract.SUMMARY_FILE,
                    "summary",
                    f"says {summary.get('state')!r}, status.json says {view.state}",
                )
            )
    final = view.total_steps if view.state == contract.COMPLETED else None
    problems += _checkpoint_problems(run_id, run_dir, final)
    return view.state, problems


def _run_versions(manifest: dict[str, Any], run_dir: Path, run_id: str) -> set[str]:
    """The code versions that made the run: its attempts' own, else its submissions'."""
    own = {str(a["code_version"]) for a in contract.read_attempts(run_dir) if a.get("code_version")}
    if own:
        return own
    subs = set()
    for sub in submissions(manifest):
        if any(run_id in job_run_ids(j) for j in sub["jobs"]):
            subs.add(str(sub.get("code_version") or manifest.get("code_version") or "unknown"))
    return subs


def verify_sweep(root: Path) -> VerifyResult:
    """Check every run of the manifest at ``root``; see the module docstring for the rules."""
    sweep = load_sweep(root)
    result = VerifyResult(root=sweep.root, n_runs=len(sweep.run_ids))
    counts: dict[str, int] = defaultdict(int)
    versions: dict[str, list[str]] = defaultdict(list)
    for run_id in sweep.run_ids:
        run_dir = sweep.run_dir(run_id)
        state, problems = verify_run(run_dir, run_id)
        counts[state] += 1
        result.problems += [
            Problem(
                p.run_id,
                f"runs/{run_id}/{p.file}" if p.file else f"runs/{run_id}",
                p.kind,
                p.message,
            )
            for p in problems
        ]
        if run_dir.is_dir():
            for v in _run_versions(sweep.manifest, run_dir, run_id):
                versions[v].append(run_id)
    result.counts = dict(counts)
    result.code_versions = dict(versions)
    if len(versions) > 1:
        detail = "; ".join(
            f"{v}: {len(r)} run(s), e.g. {r[0]}" for v, r in sorted(versions.items())
        )
        result.problems.append(
            Problem(None, "sweep.json", "code_version", f"runs made by different code: {detail}")
        )
    return result
