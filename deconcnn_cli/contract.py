"""The run directory as a contract: names, states, exit codes and readers. No torch.

``decon train`` writes a run directory; every later command (monitor, recover, verify, export,
report) judges the run from these files alone, from another process or host, while the run
lives or after it died. Everything those commands need to know about the layout lives here,
so they import this small module and never load torch. Layout: docs/run-directory.md.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deconcnn_cli.fileio import complete_lines, read_json, read_jsonl

# ---- file names (relative to the run directory)
CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
ATTEMPTS_FILE = "attempts.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"
OWNER_FILE = "owner.json"
LOG_FILE = "train.log"
METRICS_DIR = "metrics"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tb"  # TensorBoard event files of the run's streams (logging.tensorboard)
CHECKPOINT_PATTERN = r"^ckpt_(\d{9})\.pt$"  # ckpt_<next_step:09d>.pt (+ .sha256 beside it)
TEMP_MARK = ".tmp"  # atomic writes go through ".<name>.tmp<pid>"; leftovers are orphans


# ---- names read from files become paths and lines of scripts: each is checked against its
# pattern where it is read (docs/sweep-root.md, "Names"). A run id is `<variant>_lr<lr>_wd<wd>_
# s<seed>_<hash>` (config.run_id); a grid, resource profile or job id is a plain name.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


def name_problem(value: Any, pattern: str, what: str) -> str | None:
    """Why ``value`` is not a valid ``what`` (None when it matches ``pattern``)."""
    if isinstance(value, str) and re.fullmatch(pattern, value):
        return None
    return f"{what} {_short(value)} does not match {pattern}"


def checkpoint_name(next_step: int) -> str:
    return f"ckpt_{next_step:09d}.pt"


# Columns appended to a stream since runs were first written: a run begun by older code keeps
# its file's header without them (training/writer.py), and verify accepts that header
STREAM_COLUMNS_ADDED: dict[str, tuple[str, ...]] = {
    "curvature": ("sharpness_norm",),
    "shape": ("alpha_early_se", "alpha_full_se", "alpha_early_lr_se", "alpha_full_lr_se"),
}

# ---- metric streams: name -> columns. "step" is the optimizer step (from 0) the row belongs to.
STREAMS: dict[str, tuple[str, ...]] = {
    "step": ("step", "epoch", "loss_train_nats", "loss_train_bits", "acc_train", "lr", "wd"),
    "val": ("step", "epoch", "loss_val_nats", "acc_val", "grad_norm", "weight_norm"),
    "curvature": (
        "step",
        "epoch",
        "lambda_max",
        "hutch_trace",
        "hutch_trace_sem",
        "n_hvp",
        "hutch_trace_ci95",
        "sharpness_norm",
    ),
    "noise": (
        "step",
        "epoch",
        "grad_noise_trace",
        "gradient_variance",
        "grad_norm_sq_unbiased",
        "grad_noise_scale",
        "residual_power",
        "psd_tail",
    ),
    "shape": (
        "step",
        "epoch",
        "burn_in_step",
        "alpha_early",
        "alpha_early_r2",
        "alpha_full",
        "power_law_r2",
        "power_law_rmse",
        "offset_alpha",
        "offset_c",
        "offset_r2",
        "alpha_early_lr",
        "alpha_full_lr",
        "power_law_r2_lr",
        "knee_epoch",
        "knee_censored",
        "alpha_early_se",
        "alpha_full_se",
        "alpha_early_lr_se",
        "alpha_full_lr_se",
    ),
}

# ---- timing: where an attempt's wall time went (status.json and its end line in attempts.jsonl,
# key "timing": wall_s, <action>_s for each timed action, analysis_overhead). The analysis
# actions are the metrics of METRICS.md's cost budget (docs/run-directory.md, "Timing").
TIMED_ACTIONS = ("curvature", "noise", "shape", "validation", "checkpoint")
ANALYSIS_ACTIONS = ("curvature", "noise", "shape")


def analysis_split(timing: dict[str, Any]) -> tuple[float, float]:
    """(seconds in the analysis actions, the rest of ``wall_s``) of one ``timing`` dict;
    missing (or non-numeric) values count 0. ``analysis / rest`` is the overhead the benches
    define."""

    def seconds(key: str) -> float:
        value = timing.get(key)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok and math.isfinite(value) else 0.0

    analysis = sum(seconds(f"{k}_s") for k in ANALYSIS_ACTIONS)
    return analysis, seconds("wall_s") - analysis


# ---- run states as written to status.json by the run itself
RUNNING = "running"
INTERRUPTED = "interrupted"  # stopped by a signal or --max-steps, checkpointed at `step`
COMPLETED = "completed"
DIVERGED = "diverged"  # a non-finite training loss: a result, never retried
FAILED = "failed"  # an exception; `reason` and `exception_type` hold it
STATES = (RUNNING, INTERRUPTED, COMPLETED, DIVERGED, FAILED)
TERMINAL_STATES = (COMPLETED, DIVERGED)
# ---- states only an observer derives (never written by the run)
STALLED = "stalled"  # status says running but the heartbeat is older than STALLED_AFTER_S
MISSING = "missing"  # no run directory / no status.json
UNREADABLE = "unreadable"  # status.json is there but unreadable, and no other evidence decides
DERIVED_STATES = (STALLED, MISSING, UNREADABLE)

# ---- liveness: a live run rewrites status.json's heartbeat every HEARTBEAT_EVERY_S seconds
# from a timer thread, independent of step time; a `running` run whose heartbeat is older than
# STALLED_AFTER_S (several missed beats, with room for shared-filesystem caching and clock skew
# between hosts) is dead or hung.
HEARTBEAT_EVERY_S = 15.0
STALLED_AFTER_S = 120.0

# ---- exit codes of `decon train` (documented in docs/run-directory.md)
EXIT_OK = 0  # completed, diverged (a result), or already terminal
EXIT_FAILED = 1  # an exception during the run (status `failed`)
EXIT_BAD_INPUT = 2  # bad config/flags/profile: nothing written
EXIT_STOPPED = 3  # stopped by --max-steps (checkpointed, resumable)
EXIT_OWNED = 4  # another live process owns this run directory
# a stop signal gives 128 + signal number (SIGTERM 143, SIGUSR2 140, SIGINT 130)


def exit_code_for(state: str, signal_number: int | None = None) -> int:
    """The exit code of ``decon train`` for a run that ended in ``state``."""
    if state in (COMPLETED, DIVERGED):
        return EXIT_OK
    if state == INTERRUPTED:
        return 128 + signal_number if signal_number else EXIT_STOPPED
    return EXIT_FAILED


def read_stream(path: Path, limit: int | None = None) -> list[dict[str, str]]:
    """Rows of a metric stream as dicts of strings; tolerant of a partial last line. With
    ``limit``, a file larger than that many bytes reads as no rows (memory stays bounded).

    Cell encoding: ``""`` = not defined yet, ``"nan"`` = could not be computed (reason in
    events.jsonl), otherwise a Python ``repr`` float or an int.
    """
    lines = complete_lines(path, limit)
    if not lines:
        return []
    return list(csv.DictReader(io.StringIO("\n".join(lines) + "\n")))


def format_cell(value: Any) -> str:
    """A value as a stream cell: None -> "" (not defined yet), NaN -> "nan", floats by repr."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)  # repr: shortest exact float
    return str(value)


def parse_cell(text: str | None) -> float | None:
    """Inverse of :func:`format_cell` for numbers: "" -> None, "nan" -> NaN."""
    if text is None or text == "":
        return None
    return float(text)


def stream_path(run_dir: Path, name: str) -> Path:
    return run_dir / METRICS_DIR / f"{name}.csv"


@dataclass(frozen=True)
class RunView:
    """What an observer can tell about one run from its directory alone."""

    run_dir: Path
    run_id: str
    state: str  # one of STATES, or STALLED / MISSING / UNREADABLE
    written_state: str | None  # the state as status.json has it
    steps_done: int  # status.json's `step`: optimizer steps done (docs/architecture.md)
    total_steps: int | None
    epoch: float
    heartbeat_age_s: float | None
    attempt: int
    reason: str | None
    status: dict[str, Any]
    # why status.json could not be read (truncated, binary, wrong types); the state then
    # comes from summary.json or the attempts' end lines, else it is UNREADABLE
    unreadable: str | None = None

    @property
    def live(self) -> bool:
        return self.state == RUNNING

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


FUTURE_HEARTBEAT_S = 3600  # a heartbeat further ahead of this host's clock is not believed


def derive_state(status: dict[str, Any] | None, now: float | None = None) -> str:
    """The run's state as an observer sees it: ``running`` with a stale heartbeat is stalled."""
    if not status:
        return MISSING
    state = status.get("state")
    if not isinstance(state, str) or state not in STATES:
        return MISSING
    if state == RUNNING:
        beat = status.get("heartbeat_unix")
        now = time.time() if now is None else now
        if isinstance(beat, bool) or not isinstance(beat, int | float):
            return STALLED
        age = now - beat
        # stale, not a number, or from more than an hour ahead (a wrong clock or a damaged
        # file would otherwise keep a hung run `running` forever; an hour leaves room for skew)
        if not math.isfinite(age) or age > STALLED_AFTER_S or age < -FUTURE_HEARTBEAT_S:
            return STALLED
    return state


_NUMBER = (int, float)
# status.json fields every observer reads, and the types the run writes them with (any of
# them but `state` may be absent: an attempt writes `step` once its data is loaded; any but
# `state` and `step` may be null)
_STATUS_TYPES: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "step": (int,),
    "epoch": _NUMBER,
    "total_steps": (int,),
    "steps_per_epoch": (int,),
    "attempt": (int,),
    "heartbeat_unix": _NUMBER,
    "steps_per_s": _NUMBER,
    "reason": (str,),
    "exception_type": (str,),
    "host": (str,),
    "pid": (int,),
    "precision": (str,),
    "last_checkpoint_step": (int,),
    "action": (str,),  # the evaluation running now (curvature, validation, ...), null between
}


def status_problem(status: dict[str, Any]) -> str | None:
    """Why a status.json object cannot be trusted (a field of the wrong type, an unknown
    state, a negative step), or None. The run writes every field with one type."""
    for key, types in _STATUS_TYPES.items():
        if key not in status:
            if key == "state":
                return "no `state`"
            continue  # e.g. `step` before the first one is known (data still loading)
        value = status[key]
        if value is None and key != "state":
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            return f"`{key}` is {type(value).__name__} {_short(value)}"
        if key in ("epoch", "heartbeat_unix") and not math.isfinite(value):
            return f"`{key}` is {value}"
    if status["state"] not in STATES:
        return f"unknown state {_short(status['state'])}"
    if status.get("step", 0) < 0:
        return f"negative step {status['step']}"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def view_run(run_dir: Path, now: float | None = None) -> RunView:
    """Read ``status.json`` (one small file) and derive the run's observable state.

    Never raises on what it finds: a status.json that is there but cannot be read (truncated,
    not UTF-8, not an object, a field of the wrong type, a directory) is judged from the
    other evidence instead (:func:`_view_from_evidence`), and so is a missing status.json
    beside a summary.json.
    """
    now = time.time() if now is None else now
    path = run_dir / STATUS_FILE
    status = read_json(path)
    if status is None:
        if path.exists() or path.is_symlink():
            return _view_from_evidence(run_dir, f"{STATUS_FILE} is not a readable JSON object")
        if (run_dir / SUMMARY_FILE).exists():
            return _view_from_evidence(run_dir, f"no {STATUS_FILE}")
        status = {}
    elif (why := status_problem(status)) is not None:
        return _view_from_evidence(run_dir, f"{STATUS_FILE}: {why}")
    beat = status.get("heartbeat_unix")
    return RunView(
        run_dir=run_dir,
        run_id=run_dir.name,
        state=derive_state(status, now),
        written_state=status.get("state"),
        steps_done=int(status.get("step") or 0),
        total_steps=status.get("total_steps"),
        epoch=float(status.get("epoch") or 0.0),
        heartbeat_age_s=(now - beat) if isinstance(beat, int | float) else None,
        attempt=int(status.get("attempt") or 0),
        reason=status.get("reason"),
        status=status,
    )


def _view_from_evidence(run_dir: Path, why: str) -> RunView:
    """A run whose status.json cannot be read: ``completed``/``diverged`` when summary.json
    (else the newest attempt end line) says so, since a run with a result is never to be run
    again; otherwise UNREADABLE, which only a person resolves. ``status`` is then empty."""
    summary = read_summary(run_dir) or {}
    attempts = read_attempts(run_dir)
    ends = [a for a in attempts if a.get("event") == "end"]
    state, step, source = summary.get("state"), summary.get("steps_done"), SUMMARY_FILE
    if state not in TERMINAL_STATES and ends:
        state, step, source = ends[-1].get("state"), ends[-1].get("steps_done"), ATTEMPTS_FILE
    numbers = [a.get("attempt") for a in attempts]
    attempt = max((n for n in numbers if isinstance(n, int) and not isinstance(n, bool)), default=0)
    step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else 0
    if state in TERMINAL_STATES:
        reason = f"{why}; state {state} from {source}"
    else:
        state, reason = UNREADABLE, f"{why}; no summary.json or attempt end says how it ended"
    epochs = summary.get("epochs_done")
    return RunView(
        run_dir=run_dir,
        run_id=run_dir.name,
        state=state,
        written_state=None,
        steps_done=step,
        total_steps=step if state == COMPLETED else None,
        epoch=float(epochs) if isinstance(epochs, int | float) and math.isfinite(epochs) else 0.0,
        heartbeat_age_s=None,
        attempt=attempt,
        reason=reason,
        status={},
        unreadable=why,
    )


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """``config.json``: ``{"run_id", "config_hash", "config": {...resolved RunConfig...}}``."""
    return read_json(run_dir / CONFIG_FILE)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    return read_json(run_dir / SUMMARY_FILE)


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / ATTEMPTS_FILE)


def read_attempt_starts(run_dir: Path) -> list[dict[str, Any]]:
    """The start line of each attempt (``attempts.jsonl`` also holds ``event: end`` lines)."""
    return [a for a in read_attempts(run_dir) if a.get("event") != "end"]


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / EVENTS_FILE)
