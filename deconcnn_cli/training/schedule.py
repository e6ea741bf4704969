"""The learning-rate schedule: one home for the optimizer's multiplier, the lr-time fits and
the normalised sharpness (``loop`` and ``measure`` both import it; neither imports the other
for it)."""

from __future__ import annotations

import math

import numpy as np

from deconcnn_cli.config import RunConfig


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
