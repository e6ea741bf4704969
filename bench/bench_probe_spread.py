"""How much lambda_max and the trace move between probe batches, and what Lanczos tolerances cost.

The curvature metrics describe the Hessian of the mean CE on one fixed 128-image probe batch.
A different 128-image batch at the same weights gives a different Hessian: that sampling
spread is the floor under any accuracy claim, so the Lanczos tolerance is chosen from it
(docs/metrics-curvature-noise.md). Along one trajectory (ResNet-18 width 0.25, digits tiled
to CIFAR's 352 steps per epoch, 32 px, SGD lr 0.05, batch 128), at initialisation and every
``--between`` steps:

1. ``lambda_max`` to 1e-4 on ``--batches`` independent 128-image probe batches (no
   augmentation, as ``measure.probe_batch`` draws them): relative standard deviation across
   batches, and the mean relative difference between two batches;
2. on the run's own probe batch, warm-started from the previous point's eigenvector as in a
   run: the HVPs Lanczos needs and the error it leaves at each candidate tolerance.

    OMP_NUM_THREADS=1 python bench/bench_probe_spread.py [--points 4] [--batches 6]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import numpy as np
import torch
from _common import Trajectory  # noqa: E402  (bench/ sibling)

from deconcnn_cli.analysis import hessian
from deconcnn_cli.analysis.lanczos import lanczos_top
from deconcnn_cli.training import measure
from deconcnn_cli.training.data import normalize

TOLS = (1e-3, 3e-3, 1e-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--between", type=int, default=500)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--skip-init", action="store_true", help="first point after --between steps")
    args = ap.parse_args()
    run = Trajectory(args.width, args.lr)
    cfg, splits, model = run.cfg, run.splits, run.model
    run_probe = measure.probe_batch(splits, cfg)
    prev_vec: torch.Tensor | None = None
    spreads, pair_diffs = [], []
    print(f"ResNet-18 width {args.width}, lr {args.lr}, {args.batches} probe batches per point")
    for point in range(args.points):
        if point or args.skip_init:
            run.advance_to(run.step_no + args.between)
        step = run.step_no
        lams = []
        vec = None
        for b in range(args.batches):
            gen = torch.Generator().manual_seed(1000 + 97 * b + point)
            rows = torch.randperm(splits.n_train, generator=gen)[:128]
            px = normalize(splits.train_x[rows], splits.mean, splits.std)
            with hessian.preserved_model_state(model, train=True):
                op = hessian.HessianOperator(model, px, splits.train_y[rows], chunk_size=128)
                r = lanczos_top(op, v0=vec, tol=1e-4, max_hvp=40)
            vec = r.vector
            lams.append(r.ritz_value)
        lam = np.array(lams)
        rel_sd = float(lam.std(ddof=1) / abs(lam.mean()))
        pairs = [abs(a - b) / abs(lam.mean()) for a, b in itertools.combinations(lam, 2)]
        spreads.append(rel_sd)
        pair_diffs.append(statistics.mean(pairs))
        x, y = run_probe
        with hessian.preserved_model_state(model, train=True):
            op = hessian.HessianOperator(model, x, y, chunk_size=128)
            tight = lanczos_top(op, v0=prev_vec, tol=1e-5, max_hvp=60)
            costs = []
            for tol in TOLS:
                r = lanczos_top(op, v0=prev_vec, tol=tol, max_hvp=40)
                err = abs(r.ritz_value - tight.ritz_value) / abs(tight.ritz_value)
                costs.append(f"tol {tol:g}: {r.n_hvp} HVPs, err {err:.1e}")
        print(
            f"step {step:>5}: lambda_max over batches {np.array2string(lam, precision=4)}"
            f" rel. sd {rel_sd:.2%}, mean pairwise rel. diff {pair_diffs[-1]:.2%}"
        )
        print(f"    run probe batch, warm from {args.between} steps back: " + "; ".join(costs))
        prev_vec = tight.vector
    print(
        f"probe-batch spread of lambda_max: rel. sd median {statistics.median(spreads):.2%}"
        f" (min {min(spreads):.2%}, max {max(spreads):.2%}); mean pairwise diff median"
        f" {statistics.median(pair_diffs):.2%}"
    )


if __name__ == "__main__":
    main()
