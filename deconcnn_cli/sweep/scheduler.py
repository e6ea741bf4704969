"""What SLURM says about a sweep's jobs: one batched ``squeue`` + one ``sacct`` per refresh,
cached on disk so several shells watching the same sweep do not multiply the load.

* ``squeue -h -r -t all -j IDS -o ...`` answers for live jobs (and finished ones for
  MinJobAge, ~300 s); ``sacct -X -n -P -j IDS -o ...`` is the record of truth for finished
  ones. Both take every job id of the sweep in one call; unknown ids are dropped.
* States are taken by their first word (``CANCELLED by 123`` -> ``CANCELLED``); pending array
  ranges (``1234_[0-9%4]``) are expanded to one record per task.
* Without accounting (``sacct`` missing or failing) the answer is *degraded* and says so:
  finished jobs are then known only while squeue still lists them.
* Job ids are reused on some clusters: a record submitted before the manifest's submission
  that asked for the job is somebody else's job and is ignored (:meth:`SchedulerSnapshot.job`).
* The answer is cached in ``<root>/.scheduler_cache.json`` with its time; a reader within
  ``ttl_s`` (default 30 s) uses it, ``refresh=True`` forces a query. A file lock makes
  concurrent refreshers wait for one query instead of each making their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from deconcnn_cli.fileio import atomic_write_json, read_json
from deconcnn_cli.sweep.observe import JobRef
from deconcnn_cli.sweep.store import SCHEDULER_CACHE_FILE

CACHE_TTL_S = 30.0
QUERY_TIMEOUT_S = 60.0
# a record submitted this long before the submission that named its id is another job's
STALE_SLACK_S = 300.0

SQUEUE_FORMAT = "%i|%T|%r|%N|%V"  # job id (array: 1234_5), state, reason, nodes, submit time
SACCT_FIELDS = "JobID,State,ExitCode,Reason,NodeList,Submit,Elapsed"

# states in which the job still holds (or waits for) resources
LIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
    }
)
# a job held by the scheduler (e.g. after MaxBatchRequeue) waits for a person, not for time
HELD_REASONS = frozenset(
    {"JobHeldAdmin", "JobHeldUser", "REQUEUE_HOLD", "launch_failed_requeued_held"}
)


@dataclass(frozen=True)
class JobRecord:
    job_id: str  # "1234" or "1234_5"
    state: str  # first word, upper case: RUNNING, TIMEOUT, CANCELLED, OUT_OF_MEMORY, ...
    reason: str | None = None
    exit_code: str | None = None  # sacct's "code:signal"
    node: str | None = None
    submit_unix: float | None = None
    elapsed_s: float | None = None
    source: str = "sacct"  # which query answered

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def held(self) -> bool:
        return self.state == "REQUEUE_HOLD" or (self.live and (self.reason or "") in HELD_REASONS)


@dataclass
class SchedulerSnapshot:
    """The scheduler's answer for a set of job ids at one time."""

    time_unix: float
    records: dict[str, JobRecord] = field(default_factory=dict)
    squeue_ok: bool = False
    sacct_ok: bool = False
    notes: list[str] = field(default_factory=list)  # why the answer is degraded, if it is
    calls: int = 0  # scheduler commands run to make this answer (0 when read from the cache)
    from_cache: bool = False
    query_ids: list[str] = field(default_factory=list)

    @property
    def degraded(self) -> bool:
        return bool(self.query_ids) and not self.sacct_ok

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.time_unix

    def job(self, ref: JobRef | None) -> JobRecord | None:
        """The record for a manifest job, or None (unknown, or a reused id's older job)."""
        if ref is None or ref.executor != "slurm":
            return None
        rec = self.records.get(ref.job_id)
        if rec is None:
            return None
        if rec.submit_unix is not None and rec.submit_unix < ref.submitted_unix - STALE_SLACK_S:
            return None  # the id was reused: this is an older job's record
        return rec

    def to_json(self) -> dict[str, Any]:
        return {
            "time_unix": self.time_unix,
            "squeue_ok": self.squeue_ok,
            "sacct_ok": self.sacct_ok,
            "notes": self.notes,
            "query_ids": self.query_ids,
            "records": {k: asdict(v) for k, v in self.records.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SchedulerSnapshot:
        return cls(
            time_unix=float(data["time_unix"]),
            records={k: JobRecord(**v) for k, v in (data.get("records") or {}).items()},
            squeue_ok=bool(data.get("squeue_ok")),
            sacct_ok=bool(data.get("sacct_ok")),
            notes=list(data.get("notes") or []),
            query_ids=list(data.get("query_ids") or []),
            from_cache=True,
        )


# ---- parsing (pure)


def first_word(state: str) -> str:
    """``CANCELLED by 123`` -> ``CANCELLED``; ``RUNNING`` -> ``RUNNING``."""
    words = state.strip().split()
    return words[0].upper() if words else "UNKNOWN"


def expand_job_ids(job_id: str) -> list[str]:
    """``1234_[0-2,5%2]`` -> ``1234_0 1234_1 1234_2 1234_5``; any other id unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", job_id.strip())
    if not m:
        return [job_id.strip()]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        step = 1
        if ":" in hi:
            hi, step_s = hi.split(":")
            step = int(step_s)
        out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1, step)]
    return out


def parse_time(text: str | None) -> float | None:
    """SLURM's ``2026-11-28T18:00:00`` (local time) as unix seconds; None for Unknown/None."""
    if not text or text in ("Unknown", "None", "N/A"):
        return None
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def parse_elapsed(text: str | None) -> float | None:
    """``[D-]HH:MM:SS`` / ``MM:SS`` as seconds."""
    if not text:
        return None
    days, _, clock = text.strip().rpartition("-")
    try:
        parts = [float(p) for p in clock.split(":")]
    except ValueError:
        return None
    secs = 0.0
    for p in parts:
        secs = secs * 60 + p
    return secs + (int(days) * 86400 if days else 0)


def _blank(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "(null)", "None", "N/A") else text


def parse_squeue(text: str) -> dict[str, JobRecord]:
    """Lines of ``squeue -h -r -t all -o '%i|%T|%r|%N|%V'``."""
    out: dict[str, JobRecord] = {}
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) < 2 or not cells[0].strip():
            continue
        cells += [""] * (5 - len(cells))
        for jid in expand_job_ids(cells[0]):
            out[jid] = JobRecord(
                job_id=jid,
                state=first_word(cells[1]),
                reason=_blank(cells[2]),
                node=_blank(cells[3]),
                submit_unix=parse_time(cells[4]),
                source="squeue",
            )
    return out


def parse_sacct(text: str) -> dict[str, JobRecord]:
    """Lines of ``sacct -X -n -P -o JobID,State,ExitCode,Reason,NodeList,Submit,Elapsed``."""
    out: dict[str, JobRecord] = {}
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) < 2 or not cells[0].strip():
            continue
        if "." in cells[0]:  # a step (1234.batch): -X should have left these out
            continue
        cells += [""] * (7 - len(cells))
        for jid in expand_job_ids(cells[0]):
            out[jid] = JobRecord(
                job_id=jid,
                state=first_word(cells[1]),
                exit_code=_blank(cells[2]),
                reason=_blank(cells[3]),
                node=_blank(cells[4]),
                submit_unix=parse_time(cells[5]),
                elapsed_s=parse_elapsed(cells[6]),
                source="sacct",
            )
    return out


# ---- querying


def _run(cmd: list[str]) -> tuple[int, str, str] | None:
    """Run a scheduler command; None when it is not installed."""
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        return (124, "", f"{cmd[0]} did not answer within {QUERY_TIMEOUT_S:.0f} s")
    return proc.returncode, proc.stdout, proc.stderr


def query_ids(job_ids: list[str]) -> list[str]:
    """The ids to ask for: array tasks by their array job (one id covers every task)."""
    return sorted({j.split("_")[0] for j in job_ids})


def query_scheduler(job_ids: list[str], now: float | None = None) -> SchedulerSnapshot:
    """One ``squeue`` and one ``sacct`` for all ``job_ids``; sacct wins where both answer."""
    ids = query_ids(job_ids)
    snap = SchedulerSnapshot(time_unix=time.time() if now is None else now, query_ids=ids)
    if not ids:
        return snap
    joined = ",".join(ids)
    sq = _run(["squeue", "-h", "-r", "-t", "all", "-j", joined, "-o", SQUEUE_FORMAT])
    if sq is not None:
        snap.calls += 1
    live: dict[str, JobRecord] = {}
    if sq is None:
        snap.notes.append("squeue not found: no live job information")
    elif sq[0] == 0 or not sq[2].strip() or "Invalid job id" in sq[2]:
        # rc=1 with "Invalid job id" means none of the ids is known to squeue any more
        snap.squeue_ok = True
        live = parse_squeue(sq[1])
    else:
        snap.notes.append(f"squeue failed (rc={sq[0]}): {sq[2].strip()[:200]}")
    sa = _run(["sacct", "-X", "-n", "-P", "-j", joined, "-o", SACCT_FIELDS])
    if sa is not None:
        snap.calls += 1
    done: dict[str, JobRecord] = {}
    if sa is None:
        snap.notes.append("sacct not found: finished jobs are known only while squeue lists them")
    elif sa[0] != 0:
        snap.notes.append(
            f"sacct failed (rc={sa[0]}: {sa[2].strip()[:160]}): finished jobs are known only "
            "while squeue lists them (MinJobAge)"
        )
    else:
        snap.sacct_ok = True
        done = parse_sacct(sa[1])

    # sacct is the record of truth, but squeue is fresher for a live job (sacct lags slurmdbd,
    # e.g. just after a requeue); a COMPLETING job has ended: sacct's end state says how
    def squeue_wins(k: str, v: JobRecord) -> bool:
        if k not in done:
            return True
        return v.live and not (v.state == "COMPLETING" and not done[k].live)

    snap.records = {**done, **{k: v for k, v in live.items() if squeue_wins(k, v)}}
    return snap


@contextlib.contextmanager
def _cache_lock(path: Path):  # noqa: ANN202 - a plain context manager
    try:
        fd = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115
    except OSError:  # a read-only root: every reader queries on its own
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fd.close()


def _cached(data: dict[str, Any] | None) -> SchedulerSnapshot | None:
    """The cache file's snapshot, or None when it is not one (truncated, wrong types)."""
    if not data or not isinstance(data.get("time_unix"), int | float):
        return None
    ids, records = data.get("query_ids"), data.get("records") or {}
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return None
    if not isinstance(records, dict) or not all(isinstance(v, dict) for v in records.values()):
        return None
    try:
        return SchedulerSnapshot.from_json(data)
    except (TypeError, ValueError):  # a record with unknown or missing fields
        return None


def _fresh(snap: SchedulerSnapshot, ids: list[str], ttl_s: float, now: float) -> bool:
    return now - snap.time_unix < ttl_s and set(ids) <= set(snap.query_ids)


def scheduler_snapshot(
    root: Path,
    job_ids: list[str],
    *,
    ttl_s: float = CACHE_TTL_S,
    refresh: bool = False,
    now: float | None = None,
) -> SchedulerSnapshot:
    """The scheduler's answer for ``job_ids``: from ``<root>/.scheduler_cache.json`` when it
    is younger than ``ttl_s`` and covers them, else one batched query (then cached)."""
    now = time.time() if now is None else now
    ids = query_ids(job_ids)
    if not ids:
        return SchedulerSnapshot(time_unix=now)
    path = Path(root) / SCHEDULER_CACHE_FILE
    cached = None if refresh else _cached(read_json(path))
    if cached is not None and _fresh(cached, ids, ttl_s, now):
        return cached
    with _cache_lock(path):
        # another shell may have refreshed while we waited
        cached = None if refresh else _cached(read_json(path))
        if cached is not None and _fresh(cached, ids, ttl_s, time.time()):
            return cached
        snap = query_scheduler(job_ids)
        with contextlib.suppress(OSError):
            atomic_write_json(path, snap.to_json())
    return snap


def cancel_jobs(job_ids: list[str]) -> None:
    """``scancel`` the given jobs in one call (used by recover for hung jobs)."""
    if job_ids:
        _run(["scancel", *job_ids])
