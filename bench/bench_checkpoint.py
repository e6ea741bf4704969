"""What one checkpoint costs, and what the checkpoint cadence makes of it.

A full-width ResNet-18 (CIFAR-10, 11.2 M parameters) after one optimizer step, SGD with
momentum and AdamW, with the curvature's float64 warm-start eigenvector: its state is saved
with the run's own ``save_checkpoint`` (torch.save to memory, an atomic write with fsync, the
SHA-256 beside it, pruning to the newest two), and, side by side in the same run, the same
bytes written plainly (one ``write_bytes``, no fsync, no hash): the ratio is what the
checkpoint's safety costs over a bare copy on this disk. Then the share of a run that
checkpointing takes, per cadence, for an epoch of ``--epoch-s`` seconds (a GPU epoch of the
protocol is 7-15 s, issue 16): every epoch, against the default time cadence (every 10
minutes, at a stop and at the end: ~6 in a < 30-minute run).

    python bench/bench_checkpoint.py [--reps 3] [--dir /path/on/the/cluster/filesystem]

Run it with ``--dir`` on the cluster's shared filesystem: that, not a laptop's SSD, is the
disk a run checkpoints to.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.checkpoint import save_checkpoint
from deconcnn_cli.training.models import build_model
from deconcnn_cli.training.setup import build_optimizer

EPOCHS, RUN_CHECKPOINTS = 50, 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--epoch-s", type=float, default=10.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for variant in ("base", "adamw"):
        cfg = load_run_config(variant=variant, flags={"device": "cpu"})
        model = build_model(cfg.model, 10)
        opt = build_optimizer(cfg, model)
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        F.cross_entropy(model(x), y).backward()
        opt.step()  # the optimizer's state exists (momentum, Adam's moments)
        n = sum(p.numel() for p in model.parameters())
        state = {  # what a run saves: model, optimizer, and the curvature's warm start
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "analysis": {"eigenvector": torch.randn(n, dtype=torch.float64)},
        }
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            ckpt, raw = [], []
            for i in range(args.reps):
                t0 = time.perf_counter()
                path = save_checkpoint(Path(d) / "run", i + 1, state)
                ckpt.append(time.perf_counter() - t0)
                data = path.read_bytes()
                t0 = time.perf_counter()
                (Path(d) / f"plain{i}.bin").write_bytes(data)
                raw.append(time.perf_counter() - t0)
            size = len(data) / 1e6
        t_ckpt, t_raw = statistics.median(ckpt), statistics.median(raw)
        per_epoch = t_ckpt / args.epoch_s
        timed = RUN_CHECKPOINTS * t_ckpt / (EPOCHS * args.epoch_s)
        print(
            f"{variant:6s} ({cfg.optim.name}): {size:.0f} MB; one checkpoint = "
            f"{t_ckpt / t_raw:.1f}x a plain write of its bytes ({t_ckpt:.2f} s here); share "
            f"of a run with {args.epoch_s:g} s epochs: every epoch {per_epoch:.1%}, every 10 "
            f"min {timed:.2%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
