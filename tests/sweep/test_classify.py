"""The decision table: a run's directory state x its job's scheduler state -> state, cause."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deconcnn_cli import contract
from deconcnn_cli.sweep import classify as C
from deconcnn_cli.sweep.scheduler import JobRecord

NOW = time.time()


def view(state: str, *, beat_age: float = 1.0, **status: object) -> contract.RunView:
    st = {"state": state, "step": 5, "heartbeat_unix": NOW - beat_age, **status}
    return contract.RunView(
        run_dir=Path("/x/r"),
        run_id="r",
        state=contract.derive_state(st, NOW),
        written_state=state,
        steps_done=5,
        total_steps=100,
        epoch=0.5,
        heartbeat_age_s=beat_age,
        attempt=1,
        reason=st.get("reason"),  # type: ignore[arg-type]
        status=st,
    )


def job(state: str, reason: str | None = None) -> JobRecord:
    return JobRecord("42", state, reason=reason)


FRESH, STALE = 1.0, contract.STALLED_AFTER_S + 5

TABLE = [
    # (run state, heartbeat age, status extras, job state, job reason) -> (state, cause)
    (("completed", FRESH, {}, None, None), ("completed", None)),
    (("diverged", FRESH, {}, "FAILED", None), ("diverged", None)),
    (("running", FRESH, {}, "RUNNING", None), ("running", None)),
    (("running", FRESH, {}, None, None), ("running", None)),
    (("running", STALE, {}, None, None), ("stalled", C.STALLED_CAUSE)),
    (("running", STALE, {}, "RUNNING", None), ("stalled", C.STALLED_CAUSE)),
    # killed without a word: the scheduler knows at once, no need to wait for the heartbeat
    (("running", FRESH, {}, "CANCELLED", None), ("interrupted", C.CANCELLED)),
    (("running", FRESH, {}, "NODE_FAIL", None), ("interrupted", C.NODE_FAILURE)),
    (("running", FRESH, {}, "OUT_OF_MEMORY", None), ("failed", C.OOM_CGROUP)),
    (("interrupted", FRESH, {}, "TIMEOUT", None), ("interrupted", C.TIMEOUT)),
    (("interrupted", FRESH, {}, "PREEMPTED", None), ("interrupted", C.PREEMPTED)),
    (("interrupted", FRESH, {}, "CANCELLED", None), ("interrupted", C.CANCELLED)),
    (("interrupted", FRESH, {}, "PENDING", None), ("pending", None)),  # requeued
    (("interrupted", FRESH, {}, "REQUEUED", None), ("pending", None)),
    (("interrupted", FRESH, {}, "PENDING", "JobHeldAdmin"), ("pending", C.HELD)),
    (("interrupted", FRESH, {}, "COMPLETED", None), ("interrupted", C.INTERRUPTED_CAUSE)),
    (("interrupted", FRESH, {}, None, None), ("interrupted", C.INTERRUPTED_CAUSE)),
    (
        ("failed", FRESH, {"exception_type": "OutOfMemoryError"}, "FAILED", None),
        ("failed", C.OOM_CUDA),
    ),
    (
        ("failed", FRESH, {"reason": "RuntimeError: CUDA out of memory"}, None, None),
        ("failed", C.OOM_CUDA),
    ),
    (("failed", FRESH, {"exception_type": "ValueError"}, "FAILED", None), ("failed", C.EXCEPTION)),
    # a planted checkpoint refused by the safe load: no transient, never retried
    (
        ("failed", FRESH, {"exception_type": "UnsafeCheckpointError"}, "FAILED", None),
        ("failed", C.UNSAFE_CHECKPOINT),
    ),
    (
        ("failed", FRESH, {"exception_type": "UnsafeCheckpointError"}, None, None),
        ("failed", C.UNSAFE_CHECKPOINT),
    ),
    (("failed", FRESH, {}, "RUNNING", None), ("failed", C.EXCEPTION)),  # partner still runs
    (("failed", FRESH, {}, "PENDING", None), ("pending", None)),  # resubmitted
    ((None, FRESH, {}, None, None), ("missing", C.NOT_STARTED)),
    # a failed run whose job is newer than its status: the retry is starting
    (("failed", FRESH, {"_newer": True}, "RUNNING", None), ("running", None)),
    ((None, FRESH, {}, "PENDING", None), ("pending", None)),
    ((None, FRESH, {}, "RUNNING", None), ("running", None)),
    ((None, FRESH, {}, "FAILED", None), ("failed", C.EXCEPTION)),
    ((None, FRESH, {}, "CANCELLED", None), ("failed", C.CANCELLED)),
]


@pytest.mark.parametrize(("given", "expected"), TABLE)
def test_classification_table(given: tuple, expected: tuple) -> None:
    state, age, extras, jstate, jreason = given
    extras = dict(extras)
    newer = bool(extras.pop("_newer", False))
    v = None if state is None else view(state, beat_age=age, **extras)
    j = None if jstate is None else job(jstate, jreason)
    ob = C.classify_run("r", v, j, job_is_newer=newer)
    assert (ob.state, ob.cause) == expected, ob.detail
    assert ob.state in C.SWEEP_STATES


@pytest.mark.parametrize(
    ("beat", "state"),
    [
        (NOW - 5, "running"),
        (NOW + 60, "running"),  # clock skew between hosts: believed
        (NOW - contract.STALLED_AFTER_S - 1, "stalled"),
        (NOW + contract.FUTURE_HEARTBEAT_S + 1, "stalled"),  # from the future: not believed
        (float("nan"), "stalled"),
        (float("inf"), "stalled"),
        (True, "stalled"),
        ("12", "stalled"),
    ],
)
def test_a_heartbeat_is_believed_only_when_it_is_a_recent_number(beat: object, state: str):
    assert contract.derive_state({"state": "running", "heartbeat_unix": beat}, NOW) == state
