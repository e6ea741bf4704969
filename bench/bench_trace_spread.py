"""How much deflation shrinks one Hutchinson probe's spread, along a training trajectory.

ResNet-18 (``--width``, 32 px) trained on the tiled digits at ``--lr`` (as bench_metrics);
at each of ``--points`` it computes, at the same weights and on the run's probe batch:

- the top 12 Hessian eigenpairs (ARPACK ``eigsh``, tol 1e-6), independent of our Lanczos;
- ``--probes`` Rademacher samples ``z^T H z`` and their projections on those eigenvectors,
  from which the deflated samples ``z^T H z - sum_i lambda_i (q_i^T z)^2`` follow for any k
  (for exact eigenvectors ``P H P = H - Q Lambda Q^T``): one probe's relative spread
  ``sd(samples) / trace`` with the top k deflated, k = 0, 1, 3, 6, 9, 12;
- the same for the run's own estimator: deflated by the Krylov basis of a warm Lanczos run
  at the run's tolerance (``evaluate_curvature``'s start: previous eigenvector + gradient).

The relative SEM of an m-probe estimate is that spread / sqrt(m).

    python bench/bench_trace_spread.py [--width 0.125] [--points 500,1000] [--probes 16]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import Trajectory  # noqa: E402  (bench/ sibling)
from scipy.sparse.linalg import LinearOperator, eigsh

from deconcnn_cli.analysis import hessian, lanczos
from deconcnn_cli.training import measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=0.125)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--points", default="500,1000")
    ap.add_argument("--probes", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Trajectory(args.width, args.lr)
    cfg, model = run.cfg, run.model
    x, y = measure.probe_batch(run.splits, cfg)
    previous = None
    print(f"ResNet-18 width {args.width}, lr {args.lr}, {args.probes} probes per point")
    for target in (int(s) for s in args.points.split(",")):
        run.advance_to(target)
        step = run.step_no
        with hessian.preserved_model_state(model, train=True):
            op = hessian.HessianOperator(model, x, y, chunk_size=128)
            n = op.n_params

            def matvec(v: np.ndarray, op: hessian.HessianOperator = op) -> np.ndarray:
                return op(torch.from_numpy(np.asarray(v, np.float64).reshape(-1))).double().numpy()

            values, vectors = eigsh(
                LinearOperator((n, n), matvec=matvec, dtype=np.float64),
                k=12, which="LA", tol=1e-6, ncv=40,
            )  # fmt: skip
            order = np.argsort(values)[::-1]
            values, q = values[order], torch.from_numpy(vectors[:, order]).double()
            start = hessian.lanczos_start(previous, op.gradient)
            gap_cap = 10 * cfg.analysis.lanczos_tol if previous is not None else 3e-3
            warm = lanczos.lanczos_top(op, v0=start, tol=cfg.analysis.lanczos_tol, gap_cap=gap_cap)
            previous = warm.vector
            gen = torch.Generator().manual_seed(step)
            plain, proj, krylov = [], [], []
            for _ in range(args.probes):
                z = (2 * torch.randint(0, 2, (n,), generator=gen) - 1).double()
                plain.append(float(z @ op(z).double()))
                proj.append((q.T @ z).numpy())
                w = z.float()
                for b in warm.basis:
                    w -= b * float(lanczos.dot64(b, w))
                krylov.append(float(lanczos.dot64(w, op(w).float())))
            plain_a, proj_a = np.asarray(plain), np.asarray(proj)
            print(f"step {step}: top eigenvalues {np.round(values[:6], 3).tolist()} ...")
            for k in (0, 1, 3, 6, 9, 12):
                samples = plain_a - (proj_a[:, :k] ** 2 * values[:k]).sum(1)
                trace = values[:k].sum() + samples.mean()
                spread = samples.std(ddof=1) / abs(trace)
                print(f"  top {k:2d} exact eigenvectors deflated: one probe's spread {spread:.1%}")
            trace = float(np.trace(warm.tridiagonal)) + float(np.mean(krylov))
            spread = float(np.std(krylov, ddof=1)) / abs(trace)
            print(
                f"  the run's Krylov basis ({warm.n_hvp} vectors): one probe's spread {spread:.1%}"
                f" -> rel. SEM {spread / np.sqrt(cfg.analysis.hutchinson_probes):.1%} at the"
                f" default m = {cfg.analysis.hutchinson_probes}"
            )
            del op


if __name__ == "__main__":
    main()
