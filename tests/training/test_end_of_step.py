"""The end-of-step decision (what happens after step t), table-tested on the smoke geometry."""

from __future__ import annotations

import dataclasses

import pytest

from deconcnn_cli.contract import COMPLETED, INTERRUPTED
from deconcnn_cli.training.schedule import EndOfStep, Schedule, after_step, curvature_due

# smoke geometry: 13 steps an epoch, 3 epochs, validation after positions 3, 6, 9, 12,
# curvature every 10 steps, noise and shape every epoch, flush every 8 steps
SMOKE = Schedule(
    steps_per_epoch=13,
    total_steps=39,
    val_positions=frozenset({3, 6, 9, 12}),
    curvature_every_steps=10,
    noise_every_epochs=1,
    shape_every_epochs=1,
    checkpoint_every_epochs=2,
    checkpoint_every_s=0.0,
    flush_every_steps=8,
)
GO = EndOfStep()
FLUSH = EndOfStep(flush=True)
VAL = EndOfStep(flush=True, validate=True)
EPOCH_END = EndOfStep(flush=True, validate=True, noise=True, shape=True)
STOP = EndOfStep(flush=True, checkpoint=True, stop=INTERRUPTED)


@pytest.mark.parametrize(
    ("step", "buffered", "stop_requested", "expected"),
    [
        (0, 1, False, GO),
        (4, 1, False, GO),  # just after a validation flush: nothing due
        (2, 3, False, GO),
        (3, 4, False, VAL),
        (5, 2, False, GO),
        (4, 8, False, FLUSH),  # a full block
        (9, 3, False, VAL),  # curvature before step 10 needs the rows on disk too
        (8, 2, False, GO),
        (18, 6, False, GO),
        (12, 3, False, EPOCH_END),  # epoch 1 ends: not a checkpoint epoch (every 2)
        (25, 3, False, EndOfStep(True, True, True, True, checkpoint=True)),  # epoch 2 ends
        # a stop anywhere: flush, checkpoint at step + 1, interrupted
        (4, 1, True, STOP),  # neither a flush nor a validation boundary
        (5, 2, True, STOP),
        (3, 4, True, EndOfStep(True, True, checkpoint=True, stop=INTERRUPTED)),
        (12, 3, True, EndOfStep(True, True, True, True, True, INTERRUPTED)),  # non-ckpt epoch
        # the final step completes the run even when a stop is asked at that moment
        (38, 3, False, EndOfStep(True, True, True, True, True, COMPLETED)),
        (38, 3, True, EndOfStep(True, True, True, True, True, COMPLETED)),
        (37, 2, True, STOP),
        (4, 0, True, EndOfStep(checkpoint=True, stop=INTERRUPTED)),  # nothing left to flush
    ],
)
def test_after_step_table(step: int, buffered: int, stop_requested: bool, expected: EndOfStep):
    got = after_step(step, SMOKE, buffered=buffered, stop_requested=stop_requested)
    assert got == expected


def test_flush_before_a_curvature_evaluation():
    """Curvature before step t+1 finds steps <= t on disk (no metric row past a divergence)."""
    every5 = Schedule(**{**SMOKE.__dict__, "curvature_every_steps": 5})
    assert after_step(4, every5, buffered=1, stop_requested=False) == FLUSH
    assert after_step(5, every5, buffered=1, stop_requested=False) == GO


def test_every_stop_flushes_and_checkpoints_the_next_step():
    """Whatever the step and buffer, a stop leaves nothing buffered and a checkpoint."""
    for step in range(SMOKE.total_steps):
        for buffered in range(1, SMOKE.flush_every_steps + 1):
            plan = after_step(step, SMOKE, buffered=buffered, stop_requested=True)
            assert plan.flush and plan.checkpoint and plan.stop is not None


@pytest.mark.parametrize(
    ("step", "buffered", "stop_requested", "expected"),
    [
        (5, 2, False, EndOfStep(flush=True, hold=True)),  # flushed: status shows the held step
        (5, 0, False, EndOfStep(hold=True)),
        (3, 4, False, EndOfStep(flush=True, validate=True, hold=True)),  # after validation
        (5, 2, True, STOP),  # a stop already asked for: no hold, the run stops here
        (38, 3, False, EndOfStep(True, True, True, True, True, COMPLETED)),  # the final step
    ],
)
def test_a_hold_waits_after_the_steps_work_unless_the_run_ends(
    step: int, buffered: int, stop_requested: bool, expected: EndOfStep
):
    got = after_step(step, SMOKE, buffered=buffered, stop_requested=stop_requested, hold_due=True)
    assert got == expected


def test_curvature_before_step_zero_and_every_n():
    assert [t for t in range(39) if curvature_due(t, SMOKE)] == [0, 10, 20, 30]
    off = Schedule(**{**SMOKE.__dict__, "curvature_every_steps": 0})
    assert not any(curvature_due(t, off) for t in range(39))


def test_epoch_checkpoints_wait_for_the_time_cadence():
    """At a checkpointing epoch end (step 25: epoch 2 of 2-epoch cadence) a checkpoint is due
    only once ``checkpoint_every_s`` passed since the last; a stop and the end always save."""
    timed = dataclasses.replace(SMOKE, checkpoint_every_s=600.0)
    early = after_step(25, timed, buffered=3, stop_requested=False, since_checkpoint_s=599.0)
    late = after_step(25, timed, buffered=3, stop_requested=False, since_checkpoint_s=600.0)
    assert not early.checkpoint and late.checkpoint
    odd_epoch = after_step(12, timed, buffered=3, stop_requested=False, since_checkpoint_s=1e9)
    assert not odd_epoch.checkpoint  # not a checkpointing epoch, however long it has been
    stop = after_step(5, timed, buffered=1, stop_requested=True, since_checkpoint_s=0.0)
    end = after_step(38, timed, buffered=1, stop_requested=False, since_checkpoint_s=0.0)
    assert stop.checkpoint and end.checkpoint
