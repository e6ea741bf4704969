"""The run directory as a contract: names, states, exit codes and readers. No torch.

``decon train`` writes a run directory; every later command (monitor, recover, verify, export,
report) judges the run from these files alone, from another process or host, while the run
lives or after it died. Everything those commands need to know about the layout lives here,
so they import this small module and never load torch. Layout: docs/run-directory.md.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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


def manifest_name_problem(manifest: dict[str, Any]) -> str | None:
    """The first run id, grid name, job id or resource profile in a sweep.json that does not
    match its pattern (a ``resources`` may also be the absolute path of a .toml file)."""
    checks: list[tuple[Any, str, str]] = [(manifest.get("grid"), NAME_PATTERN, "grid name")]
    for key in ("runs", "retired_runs"):
        ids = manifest.get(key)
        checks += [(r, RUN_ID_PATTERN, "run id") for r in (ids if isinstance(ids, dict) else {})]
    for sub in submissions(manifest):
        res = sub.get("resources")
        if res is not None and not (isinstance(res, str) and _is_toml_path(res)):
            checks.append((res, NAME_PATTERN, "resource profile"))
        for job in sub["jobs"]:
            checks.append((str(job.get("job_id")), NAME_PATTERN, "job id"))
            checks += [(r, RUN_ID_PATTERN, "run id") for r in job_run_ids(job)]
    for value, pattern, what in checks:
        why = name_problem(value, pattern, what)
        if why is not None:
            return why
    return None


def _is_toml_path(text: str) -> bool:
    """An absolute path of a .toml file without control characters."""
    return text.startswith("/") and text.endswith(".toml") and text.isprintable()


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


# ---- threads: a launcher that starts several runs on one allocation sets this env var to
# their number; each run then takes its share of the CPUs it was given (see default_threads).
CONCURRENT_RUNS_ENV = "DECON_CONCURRENT_RUNS"
# ---- GPU memory: a launcher that starts N runs on one GPU sets this to N; each run then caps
# its CUDA caching allocator at its share of the card (training.device.cap_gpu_memory).
GPU_SHARE_ENV = "DECON_GPU_SHARE"
# ---- a job whose resource profile asks for a GPU sets this to 1: a run then fails (with the
# driver's and the wheel's CUDA versions) instead of training on the CPU (training.device)
REQUIRE_GPU_ENV = "DECON_REQUIRE_GPU"
# ---- exact replay on a GPU: cuBLAS's deterministic workspace, read when its first handle is
# made (so set in the run's environment); DECON_DETERMINISTIC=warn lets a torch build that
# lacks a deterministic kernel warn instead of fail (training.device.deterministic)
CUBLAS_ENV, CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
DETERMINISTIC_ENV = "DECON_DETERMINISTIC"
# ---- CUDA MPS: a job that started its MPS daemon sets DECON_MPS=1 in its runs' environment,
# else 0 with the reason (sweep.mps); each run records it in status.json and its start line
MPS_STATE_ENV, MPS_REASON_ENV = "DECON_MPS", "DECON_MPS_REASON"


def gpu_share(environ: dict[str, str] | None = None) -> int:
    """How many runs share this process's GPU (``$DECON_GPU_SHARE``; 1 when unset or bad)."""
    env = os.environ if environ is None else environ
    return max(1, _env_int(env, GPU_SHARE_ENV) or 1)


def default_threads(environ: dict[str, str] | None = None) -> int:
    """Intra-op threads for one run: the CPUs this process is given (``SLURM_CPUS_PER_TASK``,
    else the affinity mask), divided by ``$DECON_CONCURRENT_RUNS`` when set; at least 1."""
    env = os.environ if environ is None else environ
    cpus = _env_int(env, "SLURM_CPUS_PER_TASK")
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, _env_int(env, CONCURRENT_RUNS_ENV) or 1))


# ---- a test hook: ``$DECON_HOLD="N[,N...]:PATH"`` holds a run after N steps until PATH exists or
# a stop signal comes, so a test can signal a run that is certainly mid-training, whatever the
# machine's speed (tests/sweep/test_slurm*.py). Unset in normal use: the loop then never waits.
HOLD_ENV = "DECON_HOLD"


@dataclass(frozen=True)
class Hold:
    """Where a run waits (steps done) and the file that lets it go on."""

    at_steps: frozenset[int]
    release_file: Path


def hold_from_env(environ: dict[str, str] | None = None) -> Hold | None:
    """``$DECON_HOLD`` parsed (None when unset or empty); a malformed value raises ValueError."""
    env = os.environ if environ is None else environ
    text = env.get(HOLD_ENV, "").strip()
    if not text:
        return None
    steps, sep, path = text.partition(":")
    try:
        at_steps = frozenset(int(n) for n in steps.split(","))
    except ValueError:
        at_steps = frozenset()
    if not sep or not path or not at_steps or min(at_steps) < 1:
        raise ValueError(
            f"${HOLD_ENV}={text!r}: expected STEPS:PATH, steps done as positive integers "
            "separated by commas, e.g. '5,30:/tmp/release'"
        )
    return Hold(at_steps, Path(path))


def _env_int(env: dict[str, str] | os._Environ[str], name: str) -> int | None:
    """``int($name)``, or None when unset or not an integer."""
    try:
        return int(env.get(name, ""))
    except ValueError:
        return None


# ---- ownership: owner.json names the process training the run (written when it takes the
# run, removed when it ends). Decidable from any host; see docs/run-directory.md "Ownership".
def owner_is_live(
    owner: dict[str, Any] | None,
    status: dict[str, Any] | None,
    *,
    this_host: str,
    pid_alive: Callable[[int], bool],
    now: float | None = None,
) -> bool:
    """Whether the process ``owner.json`` names still owns the run.

    On this host its pid is asked directly (``pid_alive(pid)``). On another host only the
    heartbeat can tell: the owner is live while the newest of its claim time and its
    status.json heartbeat (when status names the same host and pid) is at most
    ``STALLED_AFTER_S`` old.
    """
    if not owner or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("host") == this_host:
        return bool(pid_alive(owner["pid"]))
    now = time.time() if now is None else now
    beats = [owner.get("claimed_unix")]
    if status and status.get("host") == owner.get("host") and status.get("pid") == owner["pid"]:
        beats.append(status.get("heartbeat_unix"))
    beats = [b for b in beats if isinstance(b, int | float)]
    return bool(beats) and now - max(beats) <= STALLED_AFTER_S


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename: readers see old or new."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float as None: JSON has no NaN or Infinity, and a reader
    of ``--json`` output must get valid JSON whatever a damaged file held."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class NotRegularFileError(OSError):
    """A path where a file belongs holds a FIFO, a device or a socket (or links to one)."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file (links followed).

    A FIFO (``mkfifo``) would block a reader forever and a link to ``/dev/zero`` would feed it
    without end: both are refused with :class:`NotRegularFileError`, an ``OSError``, so
    every reader that already treats an unreadable file as missing does the same here. The
    open never blocks (``O_NONBLOCK``); the regular file it returns reads normally.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# The largest JSON / JSON-lines file a reader loads (a status.json is ~2 KB, a 100,000-run
# sweep.json ~200 MB): a file grown to gigabytes (NULs a crash left, a runaway writer) is
# unreadable at once instead of filling the memory
MAX_JSON_BYTES = 512 * 2**20


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`'s refusals, as OSError);
    with ``limit``, a larger file is refused (``EFBIG``) before it is read."""
    with open_regular(path) as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return f.read()


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (a truncated or
    binary file, a directory, a link to nowhere, a value that is not an object)."""
    try:
        value = json.loads(read_regular(path, MAX_JSON_BYTES).decode())
    except (OSError, ValueError, RecursionError):  # ValueError: JSON and UTF-8 decode errors
        return None
    return value if isinstance(value, dict) else None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (``attempts.jsonl``, ``events.jsonl``): a reader sees
    whole lines, and a crash mid-write leaves at most one partial line, which it skips."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a partial or corrupt line (a crash mid-write) is skipped
    (:func:`read_jsonl_checked` also says which)."""
    return read_jsonl_checked(path)[0]


def read_jsonl_checked(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, 1-based numbers of the whole lines that are not a JSON object) of a JSON-lines
    file. A bad line (a stray byte, a NUL, a torn write) costs that line only; a partial last
    line (no newline yet: a live writer, or a crash mid-write) is left out and not counted."""
    try:
        data = read_regular(path, MAX_JSON_BYTES)
    except OSError:
        return [], []
    out: list[dict[str, Any]] = []
    bad: list[int] = []
    lines = data.split(b"\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode())
        except (ValueError, RecursionError):
            rec = None
        if isinstance(rec, dict):
            out.append(rec)  # a last line without its newline counts when it is whole
        elif n < len(lines):
            bad.append(n)
    return out, bad


def complete_lines(path: Path) -> list[str]:
    """The file's whole lines (a partial last line, from a crash mid-write, is dropped).

    Bytes that are not UTF-8 read as U+FFFD, so such a cell fails as a number where it is
    parsed; a missing or unreadable file (a directory, no permission) has no lines."""
    try:
        data = read_regular(path)
    except OSError:
        return []
    return data.decode(errors="replace").split("\n")[:-1]  # "" after a final newline, or partial


def partial_tail(path: Path) -> bytes:
    """What follows the file's last newline: a line still being written, or (in a run that
    ended) bytes that are not a line at all, e.g. NULs a filesystem left after a crash."""
    try:
        with open_regular(path) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))  # the tail only: a stream can be megabytes
            data = f.read()
            if b"\n" not in data and size > len(data):
                f.seek(0)
                data = f.read()
    except OSError:
        return b""
    return data[data.rfind(b"\n") + 1 :]


def read_stream(path: Path) -> list[dict[str, str]]:
    """Rows of a metric stream as dicts of strings; tolerant of a partial last line.

    Cell encoding: ``""`` = not defined yet, ``"nan"`` = could not be computed (reason in
    events.jsonl), otherwise a Python ``repr`` float or an int.
    """
    lines = complete_lines(path)
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
    step: int
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
        step=int(status.get("step") or 0),
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
        step=step,
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


# ---- sweep.json (docs/sweep-root.md): tolerant readers of what its lists hold. A manifest is
# edited by hand and copied around; an entry of the wrong type is skipped, never a crash.
def submissions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's submissions that are objects, each with ``jobs`` as a list of objects."""
    subs = manifest.get("submissions")
    out = []
    for sub in subs if isinstance(subs, list) else []:
        if isinstance(sub, dict):
            jobs = sub.get("jobs")
            jobs = [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []
            out.append({**sub, "jobs": jobs})
    return out


def job_run_ids(job: dict[str, Any]) -> list[str]:
    """A manifest job's run ids (strings only)."""
    ids = job.get("run_ids")
    return [r for r in ids if isinstance(r, str)] if isinstance(ids, list) else []
