"""What a sweep is doing now: one pass over its run directories plus one (cached) scheduler query.

:func:`observe_sweep` reads ``status.json`` and ``attempts.jsonl`` of every run (no metric
streams: it must answer in well under a second for hundreds of runs) and classifies each run
(:mod:`deconcnn_cli.sweep.classify`), then estimates when the sweep ends from what was measured
(:mod:`deconcnn_cli.sweep.eta`). :func:`failure_report` adds, for one run that needs
action, the tail of its log or traceback and the command that fixes it. No torch, no printing.
"""

from __future__ import annotations

import math
import re
import socket
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deconcnn_cli import contract, fileio, locking
from deconcnn_cli.errors import DeconError
from deconcnn_cli.sweep import classify as C
from deconcnn_cli.sweep.eta import EtaEstimate, Work, estimate_eta, typical_s_per_step
from deconcnn_cli.sweep.manifest import JOBS_DIR
from deconcnn_cli.sweep.observe import JobRef, SweepView, load_sweep
from deconcnn_cli.sweep.scheduler import (
    CACHE_TTL_S,
    JobRecord,
    SchedulerSnapshot,
    scheduler_snapshot,
)

LOG_TAIL_LINES = 15
_TAIL_BYTES = 16384


@dataclass(frozen=True)
class RunRow:
    run_id: str
    state: str
    cause: str | None
    detail: str
    step: int
    total_steps: int | None
    epoch: float
    steps_per_s: float | None
    attempts: int
    gpu_hours: float
    gpu_hours_wasted: float
    job_id: str | None
    job_state: str | None  # the scheduler's word for the run's latest job, if it answered
    executor: str | None  # "slurm" | "local": who ran the latest job
    written_state: str | None  # the state as the run's status.json has it
    heartbeat_age_s: float | None
    action: str | None = None  # a running run's evaluation now (curvature, validation, ...)


@dataclass(frozen=True)
class Pool:
    """Whose slots run a set of runs: a local runner, a SLURM array, a lone SLURM job, or
    nobody yet (runs never submitted)."""

    key: str  # the runner's job id, the array's job id, "" for none
    kind: str  # "local" | "array" | "job" | "none"
    slots: int  # local: runs at once; SLURM: jobs at once (each job's runs share one GPU)


@dataclass
class SweepReport:
    root: Path
    grid: str
    time_unix: float
    rows: list[RunRow]
    scheduler: SchedulerSnapshot
    counts: dict[str, int] = field(default_factory=dict)
    eta_s: float | None = None  # when the last unfinished run will end (sweep/eta.py)
    gpu_hours: float = 0.0  # device-hours (the field keeps its name for --json)
    gpu_hours_wasted: float = 0.0
    # for the table, not in --json
    eta: EtaEstimate | None = None
    hours_unit: str = "device"  # "GPU" | "CPU" | "device" (not known yet, or mixed)
    pools: dict[str, Pool] = field(default_factory=dict)
    pool_of: dict[str, str] = field(default_factory=dict)  # run id -> Pool.key

    @property
    def needs_action(self) -> list[RunRow]:
        return [r for r in self.rows if r.cause is not None]

    def to_json(self) -> dict[str, Any]:
        sched = self.scheduler
        return {
            "root": str(self.root),
            "grid": self.grid,
            "time_unix": self.time_unix,
            "counts": self.counts,
            "n_runs": len(self.rows),
            "eta_s": self.eta_s,
            "gpu_hours": round(self.gpu_hours, 4),
            "gpu_hours_wasted": round(self.gpu_hours_wasted, 4),
            "hours_unit": self.hours_unit,  # what gpu_hours counts: "GPU", "CPU" or "device"
            "scheduler": {
                "calls": sched.calls,
                "from_cache": sched.from_cache,
                "age_s": round(sched.age_s(self.time_unix), 3),
                "degraded": sched.degraded,
                "squeue_ok": sched.squeue_ok,
                "sacct_ok": sched.sacct_ok,
                "notes": sched.notes,
                "n_jobs": len(sched.query_ids),
            },
            "runs": [asdict(r) for r in self.rows],
        }


def attempt_seconds(
    attempts: list[dict[str, Any]], status: dict[str, Any], now: float
) -> tuple[float, float]:
    """(seconds used, seconds wasted on attempts that ended ``failed``) from attempts.jsonl.

    An attempt runs from its start line to its end line (``event: end``); without one, to the
    next attempt's start, or for the last attempt to its heartbeat (``now`` if still running).
    """

    def when(value: Any) -> float | None:
        """A usable time: a finite number between 1970 and a day from now (a damaged or
        hand-edited line cannot make the hours infinite or astronomical)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        t = float(value)
        return t if math.isfinite(t) and 0 <= t <= now + 86400 else None

    starts: dict[int, float] = {}
    ends: dict[int, tuple[float | None, str | None]] = {}
    for rec in attempts:
        n = rec.get("attempt")
        if not isinstance(n, int):
            continue
        if rec.get("event") == "end":
            t = rec.get("end_unix", rec.get("time_unix", rec.get("time")))
            ends[n] = (when(t), rec.get("state"))
        elif (start := when(rec.get("start_unix"))) is not None:
            starts[n] = start
    used = wasted = 0.0
    order = sorted(starts)
    for i, n in enumerate(order):
        end, end_state = ends.get(n, (None, None))
        if end is None:
            if i + 1 < len(order):
                end = starts[order[i + 1]]
            else:
                beat = when(status.get("heartbeat_unix"))
                live = status.get("state") == contract.RUNNING
                end = now if live or beat is None else beat
                end_state = end_state or status.get("state")
        secs = max(0.0, end - starts[n])
        used += secs
        if end_state == contract.FAILED:
            wasted += secs
    return used, wasted


def local_job(ref: JobRef, view: contract.RunView | None) -> JobRecord | None:
    """A local runner as a scheduler record: live while its process is (on this host);
    ``PENDING`` for a run it has not started yet. None when it is gone or on another host."""
    if ref.pid is None or ref.host != socket.gethostname():
        return None
    if not locking.pid_alive(ref.pid):
        return None
    beat = view.status.get("heartbeat_unix") if view is not None else None
    started = isinstance(beat, int | float) and beat >= ref.submitted_unix
    return JobRecord(ref.job_id, "RUNNING" if started else "PENDING", source="local")


def owner_gone(run_dir: Path, status: dict[str, Any]) -> str:
    """Why the process that last wrote ``running`` into this run is known dead on this host
    ("" if not known): ``owner.json`` and status.json name the same pid on this host, and
    that pid is gone. A process on another host is judged by its heartbeat only."""
    owner = fileio.read_json(run_dir / contract.OWNER_FILE)
    host = socket.gethostname()
    if (
        owner
        and owner.get("host") == host == status.get("host")
        and isinstance(owner.get("pid"), int)
        and owner.get("pid") == status.get("pid")
        and not locking.pid_alive(owner["pid"])
    ):
        return f"its process (pid {owner['pid']} on {host}) is gone"
    return ""


_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _device_share(ref: JobRef | None, local_slots: int, on_gpu: bool) -> float:
    """The fraction of a device a run holds. SLURM: its job's one GPU shared by the job's
    runs. Local: the GPU shared by the runner's ``parallel_runs``; on the CPU, its own."""
    if ref is None or not ref.run_ids:
        return 1.0
    if ref.executor == "local":
        return 1.0 / local_slots if on_gpu else 1.0
    return 1.0 / len(ref.run_ids)


def _local_slots(root: Path, job_id: str) -> int:
    """``parallel_runs`` of a local runner, from its input ``jobs/<job_id>.json``; else 1."""
    if not _JOB_NAME.match(job_id):
        return 1
    spec = fileio.read_json(root / JOBS_DIR / f"{job_id}.json") or {}
    n = spec.get("parallel_runs")
    return n if isinstance(n, int) and n >= 1 else 1


def _array_parallelism(manifest: dict[str, Any]) -> dict[str, int]:
    """The %N of each submission's arrays, by job id, from the resource profile it used."""
    from deconcnn_cli.sweep.profiles import load_resources  # pydantic, loaded once per profile

    by_profile: dict[str, int] = {}
    out: dict[str, int] = {}
    for sub in manifest.get("submissions") or []:
        if not isinstance(sub, dict) or sub.get("executor", "slurm") != "slurm":
            continue
        ref = str(sub.get("resources") or "")
        if ref not in by_profile:
            try:
                by_profile[ref] = load_resources(ref).array_parallelism
            except (DeconError, OSError, ValueError):  # moved or changed since: what runs tells
                by_profile[ref] = 0
        for job in sub.get("jobs") or []:
            if isinstance(job, dict) and job.get("job_id") is not None:
                out[str(job["job_id"]).split("_")[0]] = by_profile[ref]
    return out


def _pools(
    sweep: SweepView, rows: list[RunRow], local_slots: dict[str, int]
) -> tuple[dict[str, Pool], dict[str, str]]:
    """Every run's pool and each pool's slots (see :mod:`deconcnn_cli.sweep.eta`)."""
    parallelism: dict[str, int] | None = None
    pool_of: dict[str, str] = {}
    members: dict[str, list[RunRow]] = {}
    kinds: dict[str, str] = {}
    for r in rows:
        ref = sweep.jobs_by_run.get(r.run_id)
        if ref is None:
            key, kind = "", "none"
        elif ref.executor == "local":
            key, kind = ref.job_id, "local"
        elif "_" in ref.job_id:
            key, kind = ref.job_id.split("_")[0], "array"
        else:
            key, kind = ref.job_id, "job"
        pool_of[r.run_id] = key
        kinds[key] = kind
        members.setdefault(key, []).append(r)
    pools: dict[str, Pool] = {}
    for key, kind in kinds.items():
        if kind == "local":
            slots = local_slots.get(key) or _local_slots(sweep.root, key)
        elif kind == "array":
            if parallelism is None:
                parallelism = _array_parallelism(sweep.manifest)
            # the array's %N; where its profile cannot be read, what runs now
            running = {r.job_id for r in members[key] if r.job_state == "RUNNING"}
            slots = parallelism.get(key) or len(running)
        else:
            slots = 1
        pools[key] = Pool(key, kind, max(1, slots))
    if "" in pools:  # never submitted: as many at once as the sweep's widest pool
        widest = max((p.slots for k, p in pools.items() if k), default=1)
        pools[""] = Pool("", "none", widest)
    return pools, pool_of


def observe_sweep(
    root: Path,
    *,
    refresh: bool = False,
    ttl_s: float = CACHE_TTL_S,
    now: float | None = None,
    sweep: SweepView | None = None,
) -> SweepReport:
    """Every run's state, progress and cost, and the sweep's counts, ETA and GPU-hours."""
    sweep = sweep or load_sweep(root)
    now = time.time() if now is None else now
    snap = scheduler_snapshot(sweep.root, sweep.slurm_job_ids(), ttl_s=ttl_s, refresh=refresh)
    rows = []
    local_slots: dict[str, int] = {}
    devices: set[str] = set()
    measured: list[tuple[float, int]] = []  # (wall s, steps) of each completed run
    for run_id in sweep.run_ids:
        run_dir = sweep.run_dir(run_id)
        view = contract.view_run(run_dir, now) if run_dir.is_dir() else None
        if view is not None and view.state == contract.MISSING and not view.status:
            view = None
        ref = sweep.jobs_by_run.get(run_id)
        job = snap.job(ref) if ref is None or ref.executor == "slurm" else local_job(ref, view)
        if (
            view is not None
            and view.state == contract.RUNNING
            and ref is not None
            and ref.executor == "local"
            and (gone := owner_gone(run_dir, view.status))
        ):  # seen at once, not when the heartbeat goes stale: the runner may live on
            view = replace(view, state=contract.INTERRUPTED, reason=gone)
            job = None
        beat = (view.status if view else {}).get("heartbeat_unix")
        newer = ref is not None and isinstance(beat, int | float) and ref.submitted_unix > beat
        ob = C.classify_run(run_id, view, job, job_is_newer=newer)
        status = view.status if view else {}
        used_s, wasted_s = (
            attempt_seconds(contract.read_attempts(run_dir), status, now) if view else (0.0, 0.0)
        )
        device = str(status.get("device") or "")
        if device:
            devices.add(device.split(":")[0])
        if ref is not None and ref.executor == "local" and ref.job_id not in local_slots:
            local_slots[ref.job_id] = _local_slots(sweep.root, ref.job_id)
        slots = local_slots.get(ref.job_id, 1) if ref is not None else 1
        share = _device_share(ref, slots, on_gpu=device.startswith("cuda"))
        rate = status.get("steps_per_s")
        row = RunRow(
            run_id=run_id,
            state=ob.state,
            cause=ob.cause,
            detail=ob.detail,
            step=view.steps_done if view else 0,
            total_steps=view.total_steps if view else None,
            epoch=view.epoch if view else 0.0,
            steps_per_s=float(rate) if isinstance(rate, int | float) else None,
            attempts=view.attempt if view else 0,
            gpu_hours=used_s * share / 3600.0,
            gpu_hours_wasted=wasted_s * share / 3600.0,
            job_id=ref.job_id if ref else None,
            job_state=ob.job_state,
            executor=ref.executor if ref else None,
            written_state=view.written_state if view else None,
            heartbeat_age_s=view.heartbeat_age_s if view else None,
            action=status.get("action") if ob.state == C.RUNNING else None,
        )
        rows.append(row)
        if row.state == C.COMPLETED and row.step > 0:
            measured.append((used_s, row.step))
    counts = Counter(r.state for r in rows)
    pools, pool_of = _pools(sweep, rows, local_slots)
    report = SweepReport(
        root=sweep.root,
        grid=sweep.grid,
        time_unix=now,
        rows=rows,
        scheduler=snap,
        counts={s: counts.get(s, 0) for s in C.SWEEP_STATES},
        gpu_hours=sum(r.gpu_hours for r in rows),
        gpu_hours_wasted=sum(r.gpu_hours_wasted for r in rows),
        hours_unit=_hours_unit(devices),
        pools=pools,
        pool_of=pool_of,
    )
    report.eta = _estimate(rows, measured, pools, pool_of)
    report.eta_s = report.eta.eta_s
    return report


def _hours_unit(devices: set[str]) -> str:
    """What the hours were spent on, from the devices the runs say they trained on."""
    if "cuda" in devices:
        return "GPU"
    if devices == {"cpu"}:
        return "CPU"
    return "device"


def _estimate(
    rows: list[RunRow],
    measured: list[tuple[float, int]],
    pools: dict[str, Pool],
    pool_of: dict[str, str],
) -> EtaEstimate:
    """The sweep's ETA from the completed runs' wall time per step and the running runs'
    rates, over each pool's slots (:func:`deconcnn_cli.sweep.eta.estimate_eta`)."""
    known = [r.total_steps for r in rows if r.total_steps]
    typical_total = int(statistics.median(known)) if known else None
    running = [r for r in rows if r.state == C.RUNNING]
    s_per_step, n_measured = typical_s_per_step(
        measured, [r.steps_per_s for r in running if r.steps_per_s]
    )
    work = []
    for r in rows:
        if r.state in (C.COMPLETED, C.DIVERGED):
            continue
        total = r.total_steps or typical_total
        if total is None:
            return EtaEstimate(None, s_per_step, n_measured, 0, 0, 0)
        live = r.state == C.RUNNING
        work.append(
            Work(
                run_id=r.run_id,
                pool=pool_of.get(r.run_id, ""),
                # a SLURM job's runs share its slot; a local runner's runs each take one
                unit=r.job_id if r.executor == "slurm" and r.job_id else r.run_id,
                steps_left=max(0, total - r.step),
                steps_per_s=r.steps_per_s if live and r.steps_per_s else None,
                running=live,
            )
        )
    slots = {k: p.slots for k, p in pools.items()}
    return estimate_eta(work, slots, s_per_step, n_measured)


# ---- one run that needs action: its story and its fix


@dataclass(frozen=True)
class FailureReport:
    run_id: str
    state: str
    cause: str
    detail: str
    exception_type: str | None
    traceback: str | None
    log_path: str | None
    log_tail: list[str]
    fix: str  # the command (or step) that fixes it


def tail_lines(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``n`` lines of a text file (reads at most its last 16 KiB)."""
    try:
        with fileio.open_regular(path) as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read().decode(errors="replace")
    except OSError:
        return []
    return data.splitlines()[-n:]


def job_logs(root: Path, job_id: str | None) -> list[Path]:
    """The job's stderr/stdout files under ``<root>/jobs/`` (submitit names them
    ``<job_id>_<task>_log.err|out``), newest first."""
    if not job_id or not (root / JOBS_DIR).is_dir():
        return []
    found = [p for p in (root / JOBS_DIR).rglob(f"{job_id}_*") if p.suffix in (".err", ".out")]
    return sorted(found, key=lambda p: (p.suffix != ".err", -p.stat().st_mtime))


def last_traceback(run_dir: Path) -> str | None:
    """The traceback of the run's newest ``error`` event, if it recorded one."""
    for ev in reversed(contract.read_events(run_dir)):
        if ev.get("traceback"):
            return str(ev["traceback"])
    return None


def fix_command(root: Path, run_id: str, cause: str, job_id: str | None) -> str:
    r = f"--root {root}"
    if cause == C.UNREADABLE_CAUSE:
        return f"inspect {root}/runs/{run_id}/status.json (unreadable); decon never reruns it"
    if cause == C.HELD:
        return f"scontrol release {job_id}  (or: scancel {job_id} && decon recover {r})"
    if cause == C.STALLED_CAUSE and job_id:
        return f"decon recover {r}  (cancels hung job {job_id}; the next recover resumes the run)"
    if cause == C.EXCEPTION:
        return (
            f"read the traceback, fix the cause, then: decon recover {r} "
            f"(one automatic retry; reproduce with decon train --run-dir {root}/runs/{run_id})"
        )
    if cause in (C.OOM_CGROUP, C.OOM_CUDA):
        return f"decon recover {r}  (reruns it alone on its GPU; batch size unchanged)"
    return f"decon recover {r}  (resumes from its newest checkpoint)"


def failure_report(sweep: SweepView, row: RunRow) -> FailureReport:
    run_dir = sweep.run_dir(row.run_id)
    status = fileio.read_json(run_dir / contract.STATUS_FILE) or {}
    log: Path | None = None
    tail: list[str] = []
    # the job's own stderr first (a cgroup OOM or a crash before the run's log opened shows
    # only there), then the run's train.log
    for candidate in [*job_logs(sweep.root, row.job_id), run_dir / contract.LOG_FILE]:
        tail = tail_lines(candidate)
        if tail:
            log = candidate
            break
    return FailureReport(
        run_id=row.run_id,
        state=row.state,
        cause=row.cause or "",
        detail=row.detail,
        exception_type=status.get("exception_type"),
        traceback=last_traceback(run_dir),
        log_path=str(log) if log else None,
        log_tail=tail,
        fix=fix_command(sweep.root, row.run_id, row.cause or "", row.job_id),
    )
