"""The run's schedule, pure and torch-free: the learning-rate multiplier (for the optimizer, the
lr-time fits and the normalised sharpness), the step geometry and cadences (:class:`Schedule`),
and what happens after each step (:func:`after_step`). The loop, ``decon verify`` and the
tests' run writers all use these rules; none re-derives them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from deconcnn_cli.config import RunConfig
from deconcnn_cli.contract import COMPLETED, INTERRUPTED


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (from 0): linear warmup from 0 over
    ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def warmup_steps(cfg: RunConfig, spe: int) -> int:
    """The warmup in optimizer steps: ``round(warmup_epochs x steps per epoch)``."""
    return round(cfg.schedule.warmup_epochs * spe)


def lr_per_step(cfg: RunConfig, spe: int, n_steps: int) -> np.ndarray:
    """The lr each of steps ``0 .. n_steps - 1`` used: the schedule as ``train_run`` runs it."""
    warmup, total = warmup_steps(cfg, spe), cfg.schedule.epochs * spe
    factors = [lr_factor(s, warmup_steps=warmup, total_steps=total) for s in range(n_steps)]
    return cfg.optim.lr * np.asarray(factors, dtype=np.float64)


@dataclass(frozen=True)
class Schedule:
    """The step geometry of one run and its cadences, in steps and epochs."""

    steps_per_epoch: int
    total_steps: int
    val_positions: frozenset[int]  # positions within an epoch after which validation runs
    curvature_every_steps: int  # 0 = off; else at step 0 and every N steps (before the step)
    noise_every_epochs: int
    shape_every_epochs: int
    checkpoint_every_epochs: int
    checkpoint_every_s: float  # at an epoch end, once this long since the last checkpoint
    flush_every_steps: int

    @classmethod
    def of(cls, cfg: RunConfig, spe: int) -> Schedule:
        c = cfg.cadence
        return cls(
            steps_per_epoch=spe,
            total_steps=cfg.schedule.epochs * spe,
            val_positions=frozenset(val_steps_in_epoch(spe, c.val_per_epoch)),
            curvature_every_steps=c.curvature_every_steps,
            noise_every_epochs=c.noise_every_epochs,
            shape_every_epochs=c.shape_every_epochs,
            checkpoint_every_epochs=c.checkpoint_every_epochs,
            checkpoint_every_s=60.0 * c.checkpoint_every_minutes,
            flush_every_steps=c.flush_every_steps,
        )


@dataclass(frozen=True)
class EndOfStep:
    """What happens after a step, in this order: flush, validate, noise, shape, hold,
    checkpoint, stop."""

    flush: bool = False
    validate: bool = False
    noise: bool = False
    shape: bool = False
    checkpoint: bool = False
    stop: str | None = None  # COMPLETED, INTERRUPTED or None (go on)
    hold: bool = False  # wait for $DECON_HOLD's release file or a stop signal (a test hook)


def curvature_due(step: int, s: Schedule) -> bool:
    """Curvature runs before step ``step`` (at step 0 and every ``curvature_every_steps``)."""
    return bool(s.curvature_every_steps) and step % s.curvature_every_steps == 0


def after_step(
    step: int,
    s: Schedule,
    *,
    buffered: int,
    stop_requested: bool,
    since_checkpoint_s: float = math.inf,
    hold_due: bool = False,
) -> EndOfStep:
    """The actions after step ``step`` (counted from 0) with ``buffered`` unflushed rows.

    - validation at the epoch's validation positions; noise and shape at their epoch ends;
    - the final step completes the run (even when a stop was asked for at that moment);
    - otherwise a requested stop interrupts it, with a checkpoint at ``step + 1``;
    - a checkpoint at every ``checkpoint_every_epochs`` epoch end once
      ``since_checkpoint_s`` (the attempt's seconds since its last checkpoint, or since it
      started) reached ``checkpoint_every_s``; and always at a stop and at the final step;
    - a flush whenever the block is full, and before anything that reads the per-step rows
      or must find them on disk: validation, noise, shape, a checkpoint, a stop, and the
      curvature evaluation before the next step (so no metric row lies past a divergence);
    - ``hold_due`` (``$DECON_HOLD`` names ``step + 1``, a test hook): hold, unless the run
      completes or stops here; flushed first, so status.json shows the step the run waits at.
    """
    spe = s.steps_per_epoch
    position, done_epochs = step % spe, step // spe + 1
    epoch_end = position == spe - 1
    validate = position in s.val_positions
    noise = epoch_end and bool(s.noise_every_epochs) and done_epochs % s.noise_every_epochs == 0
    shape = epoch_end and bool(s.shape_every_epochs) and done_epochs % s.shape_every_epochs == 0
    if step >= s.total_steps - 1:
        stop: str | None = COMPLETED
    else:
        stop = INTERRUPTED if stop_requested else None
    hold = hold_due and stop is None
    on_cadence = epoch_end and done_epochs % s.checkpoint_every_epochs == 0
    checkpoint = (on_cadence and since_checkpoint_s >= s.checkpoint_every_s) or stop is not None
    flush = buffered > 0 and (
        buffered >= s.flush_every_steps
        or validate
        or noise
        or shape
        or checkpoint
        or stop is not None
        or curvature_due(step + 1, s)
        or hold
    )
    return EndOfStep(flush, validate, noise, shape, checkpoint, stop, hold)


def val_steps_in_epoch(spe: int, per_epoch: int) -> set[int]:
    """Positions (0-based, within an epoch) after which validation runs; the last is spe-1."""
    return {math.ceil(q * spe / per_epoch) - 1 for q in range(1, per_epoch + 1)}
