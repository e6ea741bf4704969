"""Host-side cost of the run's random draws, old way against new, side by side (CPU).

1. Hutchinson probe at full width (ResNet-18, 11.17M parameters): an int64 draw with ``2z-1``
   and the float64 cast on the host (before) against an int8 draw whose arithmetic runs on
   the operator's device (here also the CPU: on a GPU that part leaves the host).
2. Crop draws of one CIFAR epoch (45,000 images, 352 steps of 128): one generator per step,
   drawn per step (before) or all at the epoch's first step (now; the same numbers).

    python bench/bench_draws.py [--reps 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import median_time  # noqa: E402  (bench/ sibling)

from deconcnn_cli.training.data import augment_draws, derive_seed, epoch_augment_draws  # noqa: E402

N_PARAMS, N_TRAIN, BATCH = 11_173_962, 45_000, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    reps = parser.parse_args().reps
    torch.set_num_threads(1)

    def probe_int64() -> None:
        g = torch.Generator().manual_seed(1)
        z = torch.randint(0, 2, (N_PARAMS,), generator=g)
        (2 * z - 1).to(torch.float64)

    def probe_int8_draw() -> None:
        g = torch.Generator().manual_seed(1)
        torch.randint(0, 2, (N_PARAMS,), generator=g, dtype=torch.int8)

    def probe_int8_arith() -> None:
        g = torch.Generator().manual_seed(1)
        bits = torch.randint(0, 2, (N_PARAMS,), generator=g, dtype=torch.int8)
        bits.to(torch.float64).mul_(2).sub_(1)

    spe = -(-N_TRAIN // BATCH)

    def crops_per_step() -> None:
        for step in range(spe):
            g = torch.Generator().manual_seed(derive_seed(0, "augment", step))
            augment_draws(min(BATCH, N_TRAIN - step * BATCH), g)

    def crops_per_epoch() -> None:
        epoch_augment_draws(N_TRAIN, batch_size=BATCH, seed=0, epoch=0, device=torch.device("cpu"))

    rows = {}
    for name, fn in [
        ("probe: int64 draw + 2z-1 + cast on the host (before)", probe_int64),
        ("probe: int8 draw on the host (now)", probe_int8_draw),
        ("probe: int8 draw + 2z-1 + cast (the arithmetic's device = CPU here)", probe_int8_arith),
        ("crops: one epoch drawn step by step (before)", crops_per_step),
        ("crops: one epoch drawn at once (now)", crops_per_epoch),
    ]:
        rows[name] = median_time(fn, reps)
    base = rows["probe: int64 draw + 2z-1 + cast on the host (before)"]
    for name, s in rows.items():
        ratio = f"{s / base:.2f} of before" if name.startswith("probe") else ""
        print(f"{name:70s} {s * 1e3:8.1f} ms  {ratio}")


if __name__ == "__main__":
    main()
