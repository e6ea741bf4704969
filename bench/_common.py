"""Shared bench helpers: a CIFAR-shaped offline dataset and a way to run the real loop on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from deconcnn_cli.config import RunConfig
from deconcnn_cli.training import loop as loop_mod
from deconcnn_cli.training.data import DataSplits, load_splits

CIFAR_TRAIN = 45_000  # CIFAR-10's 50,000 minus the 10% validation split: 352 steps of 128
CIFAR_VAL = 5_000  # the validation split a run evaluates 4 times an epoch


def tiled_digits(
    cfg: RunConfig, n_train: int = CIFAR_TRAIN, n_val: int | None = None
) -> DataSplits:
    """The digits at the config's image size, tiled so the training split has ``n_train``
    images (CIFAR-10's step count per epoch); the validation split is the digits' own, or
    tiled to ``n_val`` images (CIFAR-10's 5,000: a validation pass costs what a run's does)."""
    d = cfg.data
    base = load_splits(
        "digits",
        None,
        val_fraction=d.val_fraction,
        split_seed=d.split_seed,
        image_size=d.image_size,
        download=False,
        device=torch.device("cpu"),
    )
    reps = -(-n_train // base.n_train)
    idx = torch.arange(reps * base.n_train)[:n_train]
    val_reps = -(-(n_val or base.n_val) // base.n_val)
    val_idx = torch.arange(val_reps * base.n_val)[: n_val or base.n_val]
    return DataSplits(
        train_x=base.train_x.repeat(reps, 1, 1, 1)[idx],
        train_y=base.train_y.repeat(reps)[idx],
        val_x=base.val_x.repeat(val_reps, 1, 1, 1)[val_idx],
        val_y=base.val_y.repeat(val_reps)[val_idx],
        num_classes=base.num_classes,
        mean=base.mean,
        std=base.std,
        name="digits-tiled",
        train_indices=idx,
        val_indices=base.val_indices.repeat(val_reps)[val_idx],
    )


@contextlib.contextmanager
def cifar_shaped_loop(
    cfg: RunConfig, n_train: int = CIFAR_TRAIN, n_val: int | None = None
) -> Iterator[None]:
    """Make ``train_run`` load :func:`tiled_digits` instead of the configured dataset."""
    original = loop_mod.load_splits
    loop_mod.load_splits = lambda *a, **k: tiled_digits(cfg, n_train, n_val)
    try:
        yield
    finally:
        loop_mod.load_splits = original
