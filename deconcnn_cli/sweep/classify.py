"""One run's state and, when it needs action, its cause: from its directory and the scheduler.

The run directory is the truth about progress (contract.py); the scheduler says whether the
job that should run it is alive, and how it ended. The decision is one pure function,
:func:`classify_run`, with a table test (tests/sweep/test_classify.py).

Sweep states (``decon monitor`` counts these):

=============  ==================================================================
pending        its job waits in the queue (first submission or a requeue)
running        a live process with a fresh heartbeat (or its job just started)
completed      finished; a result
diverged       a non-finite training loss; a result, never retried
interrupted    stopped with a checkpoint (timeout, preemption, node failure, a
               user's scancel) and no live job: ``decon recover`` resumes it
failed         an exception, an OOM, or a job that died before the run started
stalled        status says running, the heartbeat is older than STALLED_AFTER_S
missing        no run directory and no job that will make one
unreadable     status.json cannot be read and no summary.json or attempt end says
               how the run ended: a person looks (it is never rerun on its own)
=============  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from deconcnn_cli import contract
from deconcnn_cli.contract import RunView
from deconcnn_cli.sweep.scheduler import JobRecord

PENDING = "pending"
RUNNING = contract.RUNNING
COMPLETED = contract.COMPLETED
DIVERGED = contract.DIVERGED
INTERRUPTED = contract.INTERRUPTED
FAILED = contract.FAILED
STALLED = contract.STALLED
MISSING = contract.MISSING
UNREADABLE = contract.UNREADABLE
SWEEP_STATES = (
    PENDING,
    RUNNING,
    COMPLETED,
    DIVERGED,
    INTERRUPTED,
    FAILED,
    STALLED,
    MISSING,
    UNREADABLE,
)

# ---- causes: why a run needs action (the `cause` column of monitor and recover). A cause
# whose word is also a run state (contract.STATES) is named <STATE>_CAUSE, so a constant never
# reads as a state: STALLED is what monitor shows, STALLED_CAUSE why recover acts.
TIMEOUT = "timeout"
PREEMPTED = "preempted"
NODE_FAILURE = "node_failure"
OOM_CGROUP = "oom_cgroup"  # SLURM's OUT_OF_MEMORY: the job's memory cgroup killed it
OOM_CUDA = "oom_cuda"  # the run's own recorded torch.OutOfMemoryError
CANCELLED = "cancelled"  # scancel by a user (or an admin)
EXCEPTION = "exception"
INTERRUPTED_CAUSE = "interrupted"  # stopped by a signal or --max-steps, scheduler silent
STALLED_CAUSE = "stalled"  # heartbeat stopped while the job still runs, or with no scheduler to ask
HELD = "held"  # JobHeldAdmin / REQUEUE_HOLD: the scheduler waits for a person
NOT_STARTED = "not_started"  # in the manifest, no directory, no live job
UNREADABLE_CAUSE = "unreadable"  # status.json unreadable, no other evidence of the outcome
# a checkpoint refused by the safe load (UnsafeCheckpointError): not transient, someone else
# wrote it; a rerun would refuse it again, so a person looks (docs/cluster.md)
UNSAFE_CHECKPOINT = "unsafe_checkpoint"
UNSAFE_EXCEPTIONS = frozenset({"UnsafeCheckpointError"})

# scheduler end states -> cause
_JOB_CAUSES = {
    "TIMEOUT": TIMEOUT,
    "DEADLINE": TIMEOUT,
    "PREEMPTED": PREEMPTED,
    "NODE_FAIL": NODE_FAILURE,
    "BOOT_FAIL": NODE_FAILURE,
    "OUT_OF_MEMORY": OOM_CGROUP,
    "CANCELLED": CANCELLED,
    "REVOKED": CANCELLED,
    "FAILED": EXCEPTION,
}
RESUMABLE = frozenset(
    {TIMEOUT, PREEMPTED, NODE_FAILURE, CANCELLED, INTERRUPTED_CAUSE, STALLED_CAUSE}
)
OOM_EXCEPTIONS = frozenset({"OutOfMemoryError", "CUDAOutOfMemoryError"})


@dataclass(frozen=True)
class Observation:
    run_id: str
    state: str  # one of SWEEP_STATES
    cause: str | None  # why it needs action; None when it does not
    detail: str  # one line for a person: what the scheduler and the run say
    job_id: str | None = None
    job_state: str | None = None


def _cuda_oom(status: dict) -> bool:
    exc = str(status.get("exception_type") or "")
    reason = str(status.get("reason") or "")
    return exc in OOM_EXCEPTIONS or "out of memory" in reason.lower()


def _job_text(job: JobRecord) -> str:
    parts = [f"job {job.job_id} {job.state}"]
    if job.exit_code and job.exit_code != "0:0":
        parts.append(f"exit {job.exit_code}")
    if job.reason and job.reason != "None":
        parts.append(f"({job.reason})")
    if job.node:
        parts.append(f"on {job.node}")
    return " ".join(parts)


def classify_run(
    run_id: str, view: RunView | None, job: JobRecord | None, *, job_is_newer: bool = False
) -> Observation:
    """The run's sweep state and cause. ``view`` is None when the run has no directory;
    ``job`` is the scheduler's record of the run's latest job (None: unknown or not SLURM);
    ``job_is_newer``: that job was submitted after the run last wrote its status (a retry)."""
    state = view.state if view is not None else MISSING
    status = view.status if view is not None else {}
    jid = job.job_id if job else None
    jstate = job.state if job else None

    def obs(s: str, cause: str | None, detail: str) -> Observation:
        return Observation(run_id, s, cause, detail, jid, jstate)

    if state in (COMPLETED, DIVERGED):
        return obs(state, None, view.reason or "" if view else "")
    if state == UNREADABLE:
        return obs(UNREADABLE, UNREADABLE_CAUSE, view.reason or "" if view else "")
    reason = (view.reason if view else None) or ""
    retrying = job is not None and job.live and (job.state != "RUNNING" or job_is_newer)
    if state == FAILED and not retrying:
        # a failed run stays failed while its partner keeps the job running
        if _cuda_oom(status):
            return obs(FAILED, OOM_CUDA, f"CUDA out of memory: {reason}")
        if job and job.state == "OUT_OF_MEMORY":
            return obs(FAILED, OOM_CGROUP, f"{_job_text(job)}; run: {reason}")
        if str(status.get("exception_type") or "") in UNSAFE_EXCEPTIONS:
            return obs(FAILED, UNSAFE_CHECKPOINT, reason or "a checkpoint failed the safe load")
        return obs(FAILED, EXCEPTION, reason or "failed without a recorded reason")
    if job is not None and job.live:
        if job.held:
            return obs(PENDING, HELD, f"{_job_text(job)}: held by the scheduler")
        if job.state == "RUNNING" and state == STALLED:
            age = view.heartbeat_age_s if view else None
            return obs(
                STALLED, STALLED_CAUSE, f"{_job_text(job)} but no heartbeat for {age or 0:.0f} s"
            )
        if job.state in ("RUNNING", "COMPLETING") and state != STALLED:
            return obs(RUNNING, None, _job_text(job))
        return obs(PENDING, None, _job_text(job))
    # no live job: the run's process cannot be alive under SLURM
    if job is not None:
        cause = _JOB_CAUSES.get(job.state, EXCEPTION)
        if state == INTERRUPTED and cause == EXCEPTION:
            cause = INTERRUPTED_CAUSE  # the run checkpointed on a signal; the job ended oddly
        if cause == EXCEPTION and job.state == "COMPLETED":
            detail = f"{_job_text(job)} but the run says {state}: {reason}"
        else:
            detail = f"{_job_text(job)}; run: {state}" + (f" ({reason})" if reason else "")
        if state == MISSING and cause in RESUMABLE:
            return obs(FAILED, cause, f"{detail}: never started")
        return obs(INTERRUPTED if cause in RESUMABLE else FAILED, cause, detail)
    # no scheduler answer (local executor, or SLURM without accounting after MinJobAge)
    if state == RUNNING:
        return obs(
            RUNNING, None, f"heartbeat {view.heartbeat_age_s or 0:.0f} s ago" if view else ""
        )
    if state == STALLED:
        age = view.heartbeat_age_s if view else None
        return obs(
            STALLED, STALLED_CAUSE, f"no heartbeat for {age or 0:.0f} s" if age else "no heartbeat"
        )
    if state == INTERRUPTED:
        return obs(INTERRUPTED, INTERRUPTED_CAUSE, reason or "interrupted")
    return obs(MISSING, NOT_STARTED, "no run directory and no live job")
