"""Repair a sweep: classify each unfinished run and apply the strategy its cause calls for.

The table of causes, strategies and limits is in docs/cluster.md (`decon recover`); each
action taken is appended to ``<root>/recover.jsonl``, which is also where the counts of
:data:`MAX_SAME_CAUSE` come from. A run whose process is known dead is released before it is
resubmitted. No torch. Exit codes: ``EXIT_RECOVERED`` 0 (nothing left for a person),
``EXIT_NEEDS_PERSON`` 1 (some runs are, each listed with why), 2 bad input.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deconcnn_cli import contract, fileio
from deconcnn_cli.errors import SweepError
from deconcnn_cli.sweep import classify as C
from deconcnn_cli.sweep.manifest import job_run_ids, submissions
from deconcnn_cli.sweep.monitor import (
    RunRow,
    SweepReport,
    last_traceback,
    observe_sweep,
    owner_gone,
)
from deconcnn_cli.sweep.observe import RECOVER_LOG_FILE, SweepView, load_sweep
from deconcnn_cli.sweep.scheduler import LIVE_STATES, cancel_jobs
from deconcnn_cli.sweep.store import SweepStore

EXIT_RECOVERED = 0
EXIT_NEEDS_PERSON = 1
MAX_SAME_CAUSE = 3  # K: recoveries of one run for one cause before a person must look
MAX_RETRIES = {C.EXCEPTION: 1, C.OOM_CGROUP: 1, C.OOM_CUDA: 1}

# actions
RESUME = "resume"  # resubmit; training resumes from the run directory's newest checkpoint
ALONE = "alone"  # resubmit as the only run on its GPU
RETRY = "retry"  # resubmit once after an exception
SUBMIT = "submit"  # a run that never started: submit it
CANCEL = "cancel"  # scancel a hung job; a later recover resumes the run
PERSON = "person"  # left for a person, with the reason
WAIT = "wait"  # its job ended but the heartbeat is still fresh: resumable once it is stale
_STRATEGY = {
    C.TIMEOUT: RESUME,
    C.PREEMPTED: RESUME,
    C.NODE_FAILURE: RESUME,
    C.CANCELLED: RESUME,
    C.INTERRUPTED_CAUSE: RESUME,
    C.STALLED_CAUSE: RESUME,
    C.NOT_STARTED: SUBMIT,
    C.OOM_CGROUP: ALONE,
    C.OOM_CUDA: ALONE,
    C.EXCEPTION: RETRY,
    C.HELD: PERSON,
    C.UNREADABLE_CAUSE: PERSON,
    C.UNSAFE_CHECKPOINT: PERSON,
}


_WRITES = (RESUME, ALONE, RETRY, SUBMIT, CANCEL)  # actions that change the sweep


@dataclass(frozen=True)
class Action:
    run_id: str
    cause: str
    action: str  # RESUME, ALONE, RETRY, CANCEL, PERSON
    why: str  # one line: what the run and the scheduler say, or why a person must look
    job_id: str | None = None
    previous: int = 0  # earlier recoveries of this run for this cause
    traceback: str | None = None  # for PERSON after an exception
    release: bool = False  # its process is known dead: mark it interrupted before resubmitting


@dataclass
class RecoverPlan:
    root: Path
    actions: list[Action] = field(default_factory=list)
    untouched: dict[str, int] = field(default_factory=dict)  # state -> runs needing nothing
    scheduler_notes: list[str] = field(default_factory=list)
    not_submitted: dict[str, str] = field(default_factory=dict)  # run -> why submit skipped it

    def of(self, action: str) -> list[Action]:
        return [a for a in self.actions if a.action == action]

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "actions": [asdict(a) for a in self.actions],
            "untouched": self.untouched,
            "scheduler_notes": self.scheduler_notes,
            "not_submitted": self.not_submitted,
        }


def recovery_counts(root: Path) -> Counter[tuple[str, str]]:
    """(run_id, cause) -> how many times recover already acted on it."""
    counts: Counter[tuple[str, str]] = Counter()
    for rec in fileio.read_jsonl(root / RECOVER_LOG_FILE):
        if rec.get("action") in (RESUME, ALONE, RETRY, CANCEL, SUBMIT):
            counts[(str(rec.get("run_id")), str(rec.get("cause")))] += 1
    return counts


def plan_recovery(
    root: Path,
    run_ids: list[str] | None = None,
    *,
    report: SweepReport | None = None,
    refresh: bool = True,
) -> RecoverPlan:
    """What recover would do for every run (or only ``run_ids``); changes nothing."""
    sweep = load_sweep(root)
    if run_ids:
        sweep.check_run_ids(run_ids)
    report = report or observe_sweep(root, refresh=refresh, sweep=sweep)
    done = recovery_counts(sweep.root)
    plan = RecoverPlan(root=sweep.root, scheduler_notes=list(report.scheduler.notes))
    untouched: Counter[str] = Counter()
    wanted = set(run_ids or sweep.run_ids)
    for row in report.rows:
        if row.run_id not in wanted:
            continue
        if row.cause is None:
            untouched[row.state] += 1
            continue
        plan.actions.append(_decide(sweep, row, done))
    plan.untouched = dict(untouched)
    return plan


def _decide(sweep: SweepView, row: RunRow, done: Counter[tuple[str, str]]) -> Action:
    run_id, cause, detail, job_id = row.run_id, row.cause or "", row.detail, row.job_id
    previous = done[(run_id, cause)]
    action = _STRATEGY.get(cause, PERSON)
    limit = MAX_RETRIES.get(cause, MAX_SAME_CAUSE)
    if cause == C.STALLED_CAUSE and job_id and row.job_state == "RUNNING":
        if row.executor != "slurm":  # a local runner: only a person may kill it
            why = f"{detail}: its local runner lives; stop it, then decon recover"
            return Action(run_id, cause, PERSON, why, job_id, previous)
        action = CANCEL
    fresh = (
        row.heartbeat_age_s is not None
        and row.written_state == contract.RUNNING
        and row.heartbeat_age_s < contract.STALLED_AFTER_S
    )
    dead = fresh and action in (RESUME, RETRY, ALONE) and process_ended(sweep.run_dir(run_id), row)
    if dead:
        detail = f"{detail}; {dead}: released"
    if action in (RESUME, RETRY, ALONE) and fresh and not dead:
        # the scheduler says the job ended, but a process on another host could still be
        # writing: resubmit only once the heartbeat is stale (submit_runs refuses before)
        left = contract.STALLED_AFTER_S - row.heartbeat_age_s
        why = (
            f"{detail}; the run's heartbeat is {row.heartbeat_age_s:.0f} s old: resumable in "
            f"{left:.0f} s (run decon recover again then)"
        )
        return Action(run_id, cause, WAIT, why, job_id, previous)
    if cause == C.UNREADABLE_CAUSE:
        why = f"{detail}: inspect {sweep.run_dir(run_id) / contract.STATUS_FILE}"
        return Action(run_id, cause, PERSON, why, job_id, previous)
    if cause == C.UNSAFE_CHECKPOINT:
        why = (
            f"{detail}. Never retried: find out who wrote the file (docs/cluster.md, 'Who may "
            "write a sweep root'); to resume from the previous checkpoint, delete it and its "
            ".sha256, then decon recover"
        )
        return Action(run_id, cause, PERSON, why, job_id, previous)
    if action == PERSON:
        why = f"{detail}: release or cancel the job (scontrol release {job_id})"
        return Action(run_id, cause, PERSON, why, job_id, previous)
    if previous >= limit:
        tb = last_traceback(sweep.run_dir(run_id)) if cause == C.EXCEPTION else None
        why = (
            f"{cause} again after {previous} recover(s) for it (limit {limit}): "
            f"stopped, a person must look ({detail})"
        )
        return Action(run_id, cause, PERSON, why, job_id, previous, tb)
    return Action(run_id, cause, action, detail, job_id, previous, release=bool(dead))


def process_ended(run_dir: Path, row: RunRow) -> str:
    """Why the process that last wrote ``running`` into this run is known dead ("" if not).

    Under SLURM no process of an ended job survives it (its cgroup is killed before the job
    leaves the queue), so when the scheduler says the job that status.json names has ended,
    its fresh heartbeat is a dead process's last. On this host the owner's pid is asked.
    """
    status = fileio.read_json(run_dir / contract.STATUS_FILE) or {}
    if row.executor == "slurm" and row.job_id and row.job_state is not None:
        ids = {str(status.get("slurm_job_id"))}
        if status.get("slurm_array_job_id") is not None:
            ids.add(f"{status.get('slurm_array_job_id')}_{status.get('slurm_array_task_id')}")
        if row.job_id in ids and row.job_state not in LIVE_STATES:
            return f"its process ended with job {row.job_id} ({row.job_state})"
    return owner_gone(run_dir, status)


def release_run(run_dir: Path, why: str) -> bool:
    """Mark a run whose process is known dead as ``interrupted`` and drop its owner claim.

    Only a run that still says ``running`` is touched (a process that wrote its own end
    meanwhile is left as it wrote it). Its progress is its checkpoints: nothing else changes.
    """
    status = fileio.read_json(run_dir / contract.STATUS_FILE)
    if not status or status.get("state") != contract.RUNNING:
        return False
    status.update(
        state=contract.INTERRUPTED,
        reason=f"{why}; released by decon recover (resumes from its newest checkpoint)",
    )
    fileio.atomic_write_json(run_dir / contract.STATUS_FILE, status)
    (run_dir / contract.OWNER_FILE).unlink(missing_ok=True)
    record = {
        "time": time.time(),
        "attempt": status.get("attempt"),
        "level": "warning",
        "message": f"{why}; released by decon recover",
        "by": "decon recover",
    }
    fileio.append_jsonl(run_dir / contract.EVENTS_FILE, record)
    return True


def _log_actions(root: Path, actions: list[Action], job_ids: dict[str, list[str]]) -> None:
    now = time.time()
    lines = "".join(
        json.dumps(
            {
                "time_unix": now,
                "run_id": a.run_id,
                "cause": a.cause,
                "action": a.action,
                "previous_job": a.job_id,
                "new_jobs": job_ids.get(a.run_id, []),
                "why": a.why,
            }
        )
        + "\n"
        for a in actions
    )
    fd = os.open(root / RECOVER_LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode())  # one write: concurrent appenders never interleave
    finally:
        os.close(fd)


def _submission_of(sweep: SweepView, run_id: str) -> tuple[str, str]:
    """(executor, resources) the run was last submitted with (the sweep's first otherwise)."""
    subs = submissions(sweep.manifest)
    for sub in reversed(subs):
        if any(run_id in job_run_ids(j) for j in sub["jobs"]):
            return str(sub.get("executor") or "slurm"), str(sub.get("resources") or "")
    if subs:
        return str(subs[0].get("executor") or "slurm"), str(subs[0].get("resources") or "")
    raise SweepError(
        f"run {run_id} was never submitted: recover does not know which executor to use",
        hint="submit the sweep first: decon submit --grid NAME --root DIR",
    )


def apply_recovery(plan: RecoverPlan, resources: str | None = None) -> dict[str, list[str]]:
    """Carry out the plan: cancel hung jobs, resubmit runs (alone after an OOM), record all.

    Call under the sweep lock (:func:`recover_sweep` does). Returns run_id -> new job ids.
    ``resources`` overrides the profile each run was last submitted with (name or path).
    Submission goes through ``sweep.submit.submit_runs``, which records each submission in the
    manifest with its reason and still skips a run that is live or queued.
    """
    from deconcnn_cli.sweep import submit  # the submission side: executors, manifest record
    from deconcnn_cli.sweep.profiles import load_resources

    sweep = load_sweep(plan.root)
    store = SweepStore(plan.root)
    new_jobs: dict[str, list[str]] = {}
    cancel = [a for a in plan.actions if a.action == CANCEL]
    if cancel:
        cancel_jobs(sorted({a.job_id for a in cancel if a.job_id}))
    for a in plan.actions:
        if a.release:
            release_run(sweep.run_dir(a.run_id), a.why.rsplit(": released", 1)[0])
    groups: dict[tuple[str, str, bool], list[Action]] = {}
    for a in plan.actions:
        if a.action in (RESUME, RETRY, ALONE, SUBMIT):
            executor, recorded = _submission_of(sweep, a.run_id)
            groups.setdefault((executor, resources or recorded, a.action == ALONE), []).append(a)
    error = None
    skipped: dict[str, str] = {}
    done: list[Action] = list(cancel)
    for (executor, profile, alone), actions in sorted(groups.items()):
        causes = Counter(a.cause for a in actions)
        reason = "recover: " + ", ".join(f"{n} {c}" for c, n in sorted(causes.items()))
        if alone:
            reason += " (rerun alone on its GPU; batch size and config unchanged)"
        result = submit.submit_runs(
            store,
            [a.run_id for a in actions],
            load_resources(profile),
            executor,
            alone=alone,
            reason=reason,
        )
        for d in result.plan.decisions:
            if not d.submit:
                skipped[d.run_id] = d.reason
        for job in (result.submission or {}).get("jobs", []):
            for rid in job.get("run_ids", []):
                new_jobs.setdefault(rid, []).append(str(job.get("job_id")))
        done += [a for a in actions if a.run_id in new_jobs]
        if result.error is not None:  # part of the jobs went in: record those, then say so
            error = result.error
            break
    _log_actions(sweep.root, done, new_jobs)
    if error is not None:
        raise error
    plan.not_submitted = skipped
    return new_jobs


def recover_sweep(
    root: Path,
    run_ids: list[str] | None = None,
    *,
    dry_run: bool = False,
    resources: str | None = None,
) -> tuple[RecoverPlan, dict[str, list[str]]]:
    """Plan (and unless ``dry_run`` apply) recovery; applying holds the sweep lock, so two
    recovers (or a recover and a submit) never submit a run twice."""
    if dry_run:
        return plan_recovery(root, run_ids), {}
    SweepStore(root).check_folder()
    sweep = load_sweep(root)  # bad input fails before the lock file is created
    if run_ids:
        sweep.check_run_ids(run_ids)
    if resources is not None:
        from deconcnn_cli.sweep.profiles import load_resources

        load_resources(resources)  # an unknown or malformed profile: refused, nothing written
    first = plan_recovery(root, run_ids)
    if not any(a.action in _WRITES or a.release for a in first.actions):
        return first, {}  # nothing to change: no lock, no write (a read-only root answers)
    with SweepStore(root).lock():
        plan = plan_recovery(root, run_ids)
        return plan, apply_recovery(plan, resources)
