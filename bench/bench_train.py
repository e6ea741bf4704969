"""Steps/s of `decon train` (per-step logging on) vs a minimal plain-PyTorch loop.

Both train the same model on the same device-resident data with the same batches
(``train_batch``): the offline digits tiled to CIFAR-10's 45,000 training images, so an epoch
has CIFAR's 352 steps and per-epoch costs (checkpoint, validation) are amortised as in a real
run; the plain loop does forward, backward, optimizer and LR-scheduler step and
one validation pass per epoch (the protocol's work) and nothing else. `decon train` runs
its real loop (``train_run``) with per-step logging, block
flushes, status heartbeats, one validation and one checkpoint per epoch. Both timings
include set-up (data, model); the analysis
cadences are off here (their cost is measured by bench_metrics.py). The two are interleaved
(plain, decon, plain, decon, ...) and the ratio of medians is printed: machines are noisy.

    python bench/bench_train.py [--reps 3] [--epochs 1] [--width 0.25] [--image-size 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import cifar_shaped_loop, tiled_digits  # noqa: E402  (bench/ sibling)

from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.data import steps_per_epoch, train_batch
from deconcnn_cli.training.device import Precision
from deconcnn_cli.training.loop import train_run
from deconcnn_cli.training.measure import evaluate
from deconcnn_cli.training.models import build_model
from deconcnn_cli.training.rundir import prepare_run_dir
from deconcnn_cli.training.schedule import lr_factor
from deconcnn_cli.training.setup import build_optimizer


def make_config(args: argparse.Namespace):
    return load_run_config(
        variant="base",
        flags={
            "model": {"width_mult": args.width},
            "schedule": {"epochs": args.epochs, "warmup_epochs": 1.0},
            "data": {"dataset": "digits", "image_size": args.image_size},
            "cadence": {
                "val_per_epoch": 1,
                "curvature_every_steps": 0,
                "noise_every_epochs": 0,
                "shape_every_epochs": 0,
                "flush_every_steps": 200,
            },
            "device": "cpu",
        },
    )


def plain_loop(cfg) -> float:
    """Seconds per step of the minimal loop: set-up, train steps, one validation per epoch."""
    t0 = time.perf_counter()
    d = cfg.data
    splits = tiled_digits(cfg)
    spe = steps_per_epoch(splits.n_train, d.batch_size)
    total = spe * cfg.schedule.epochs
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.num_classes)
    opt = build_optimizer(cfg, model)
    warm = round(cfg.schedule.warmup_epochs * spe)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup_steps=warm, total_steps=total)
    )
    model.train()
    for step in range(total):
        x, y = train_batch(
            splits,
            step=step,
            steps_per_epoch=spe,
            batch_size=d.batch_size,
            seed=cfg.seed,
            augment=True,
            image_size=d.image_size,
        )
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % spe == spe - 1:
            evaluate(model, splits, d.batch_size, Precision("fp32", "cpu"))
    return (time.perf_counter() - t0) / total


def decon_loop(cfg) -> float:
    """Seconds per step of the real `decon train` loop (wall time of the whole run)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        prepare_run_dir(cfg, run_dir)
        t0 = time.perf_counter()
        with cifar_shaped_loop(cfg):
            result = train_run(cfg, run_dir)
        elapsed = time.perf_counter() - t0
    return elapsed / result.steps_done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--image-size", type=int, default=16)
    args = ap.parse_args()
    cfg = make_config(args)
    plain_loop(cfg)  # warm-up (allocator, kernels, dataset cache)
    plain, decon = [], []
    for _ in range(args.reps):
        plain.append(plain_loop(cfg))
        decon.append(decon_loop(cfg))
    p, d = statistics.median(plain), statistics.median(decon)
    print(
        f"model width {args.width}, digits tiled to 45,000 images at {args.image_size}px, "
        f"batch 128, "
        f"{args.epochs} epochs x {args.reps} interleaved reps, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'loop':<28}{'steps/s (median)':>18}{'all reps':>40}")
    print(f"{'plain PyTorch':<28}{1 / p:>18.2f}{str([round(1 / x, 2) for x in plain]):>40}")
    print(
        f"{'decon train (logging on)':<28}{1 / d:>18.2f}{str([round(1 / x, 2) for x in decon]):>40}"
    )
    print(f"ratio decon/plain steps/s: {p / d:.3f}  (target >= 0.97)")


if __name__ == "__main__":
    main()
