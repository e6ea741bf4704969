"""Shared bench helpers: a CIFAR-shaped offline dataset and a way to run the real loop on it."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from deconcnn_cli.config import RunConfig, load_run_config
from deconcnn_cli.training import attempt as attempt_mod
from deconcnn_cli.training.data import DataSplits, load_splits, steps_per_epoch, train_batch
from deconcnn_cli.training.models import build_model
from deconcnn_cli.training.setup import build_optimizer

CIFAR_TRAIN = 45_000  # CIFAR-10's 50,000 minus the 10% validation split: 352 steps of 128
CIFAR_VAL = 5_000  # the validation split a run evaluates 4 times an epoch
CIFAR_SPE = 352  # steps per epoch at batch 128
CIFAR_STEPS = 17_600  # a 50-epoch run
# the protocol's evaluations in that run: curvature at step 0 and every 500 steps, noise every
# 2 epochs, shape every epoch, validation 4 times an epoch
N_CURV, N_NOISE, N_SHAPE, N_VAL = 36, 25, 50, 200


def tiled_digits(
    cfg: RunConfig,
    n_train: int = CIFAR_TRAIN,
    n_val: int | None = None,
    device: torch.device | str = "cpu",
) -> DataSplits:
    """The digits at the config's image size, tiled so the training split has ``n_train``
    images (CIFAR-10's step count per epoch); the validation split is the digits' own, or
    tiled to ``n_val`` images (CIFAR-10's 5,000: a validation pass costs what a run's does).
    On ``device``, as ``load_splits`` puts a run's data (the run's device)."""
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
        train_x=base.train_x.repeat(reps, 1, 1, 1)[idx].to(device),
        train_y=base.train_y.repeat(reps)[idx].to(device),
        val_x=base.val_x.repeat(val_reps, 1, 1, 1)[val_idx].to(device),
        val_y=base.val_y.repeat(val_reps)[val_idx].to(device),
        num_classes=base.num_classes,
        mean=base.mean.to(device),
        std=base.std.to(device),
        name="digits-tiled",
        train_indices=idx,
        val_indices=base.val_indices.repeat(val_reps)[val_idx],
    )


@contextlib.contextmanager
def cifar_shaped_loop(
    cfg: RunConfig, n_train: int = CIFAR_TRAIN, n_val: int | None = None
) -> Iterator[None]:
    """Make ``train_run`` load :func:`tiled_digits` instead of the configured dataset, on the
    device the run asks for."""
    original = attempt_mod.load_splits
    attempt_mod.load_splits = lambda *a, **k: tiled_digits(cfg, n_train, n_val, k["device"])
    try:
        yield
    finally:
        attempt_mod.load_splits = original


def median_time(fn: Callable[[], object], reps: int, *, warmup: bool = False) -> float:
    """Median wall time of ``reps`` calls (after one untimed call with ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_config(
    width: float, cadence: dict | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """The base variant at ``width`` on the digits at 32 px, CPU, 4 epochs with 1 of warmup;
    ``cadence``: overrides of the metrics' cadences (e.g. all 0 for a run without them);
    ``overrides``: ``--set``-style ``KEY=VALUE`` strings (e.g. ``analysis.n_probe=64``)."""
    return load_run_config(
        variant="base",
        overrides=overrides,
        flags={
            "model": {"width_mult": width},
            "device": "cpu",
            "data": {"dataset": "digits", "image_size": 32},
            "schedule": {"epochs": 4, "warmup_epochs": 1.0},
            "cadence": cadence or {},
        },
    )


class Trajectory:
    """The benches' training trajectory: ResNet-18 (base variant) at ``width`` on the digits
    tiled to 4,096 images at 32 px, SGD at a constant ``lr`` from a fixed seed."""

    def __init__(self, width: float, lr: float, n_val: int | None = None) -> None:
        self.cfg = bench_config(width)
        self.splits = tiled_digits(self.cfg, n_train=4096, n_val=n_val)
        self.spe = steps_per_epoch(self.splits.n_train, 128)
        torch.manual_seed(0)
        self.model = build_model(self.cfg.model, self.splits.num_classes)
        self.opt = build_optimizer(self.cfg, self.model)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.step_no = 0

    def step(self) -> None:
        x, y = train_batch(
            self.splits, step=self.step_no, steps_per_epoch=self.spe, batch_size=128, seed=0,
            augment=True, image_size=32,
        )  # fmt: skip
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step_no += 1

    def advance_to(self, step: int) -> None:
        while self.step_no < step:
            self.step()
