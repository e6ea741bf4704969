"""How much deflation shrinks one Hutchinson probe's spread, along a training trajectory.

ResNet-18 (``--width``, 32 px) trained on the tiled digits at ``--lr`` (as bench_metrics);
at each of ``--points`` it computes, at the same weights and on the run's probe batch:

- the top 12 Hessian eigenpairs (ARPACK ``eigsh``, tol 1e-6), independent of our Lanczos;
- ``--probes`` Rademacher samples ``z^T H z`` and their projections on those eigenvectors,
  from which the deflated samples ``z^T H z - sum_i lambda_i (q_i^T z)^2`` follow for any k
  (for exact eigenvectors ``P H P = H - Q Lambda Q^T``): one probe's relative spread
  ``sd(samples) / trace`` with the top k deflated, k = 0, 1, 3, 6, 9, 12;
- the same for the run's own estimator: deflated by the Krylov basis of a warm Lanczos run
  at the run's tolerance (``evaluate_curvature``'s start: previous eigenvector + gradient);
- whether the Gauss-Newton part could serve as a control variate: for each deflated probe
  also ``w^T G w`` (G = J^T diag-block(softmax Hessian) J / N, from one forward-mode JVP of
  the logits), the spread of ``w^T (H - G) w`` beside that of ``w^T H w``, their
  correlation, and the JVP's cost in training steps. A control variate pays only if the
  residual's spread is well below H's for less than an HVP's extra cost.

The relative SEM of an m-probe estimate is that spread / sqrt(m).

    python bench/bench_trace_spread.py [--width 0.125] [--points 500,1000] [--probes 16]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import Trajectory, median_time  # noqa: E402  (bench/ sibling)
from scipy.sparse.linalg import LinearOperator, eigsh
from torch.func import functional_call, jvp

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
    step_s = median_time(run.step, 3)  # the unit of cost (3 steps of the trajectory)
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
            plain, proj, krylov, ggn = [], [], [], []
            for _ in range(args.probes):
                z = (2 * torch.randint(0, 2, (n,), generator=gen) - 1).double()
                plain.append(float(z @ op(z).double()))
                proj.append((q.T @ z).numpy())
                w = z.float()
                for b in warm.basis:
                    w -= b * float(lanczos.dot64(b, w))
                krylov.append(float(lanczos.dot64(w, op(w).float())))
                ggn.append(gauss_newton_quadratic(model, x, w))
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
            residual = np.asarray(krylov) - np.asarray(ggn)
            jvp_s = median_time(lambda w=w: gauss_newton_quadratic(model, x, w), 3)
            hvp_s = median_time(lambda op=op, w=w: op(w), 3)
            print(
                f"  Gauss-Newton control variate: spread of w^T (H - G) w"
                f" {float(np.std(residual, ddof=1)) / abs(trace):.1%} against w^T H w's"
                f" {spread:.1%}, correlation {np.corrcoef(krylov, ggn)[0, 1]:.2f};"
                f" w^T G w costs {jvp_s / step_s:.2f} steps, an HVP {hvp_s / step_s:.2f}"
            )
            del op


def gauss_newton_quadratic(model: torch.nn.Module, x: torch.Tensor, w: torch.Tensor) -> float:
    """``w^T G w`` for the mean cross-entropy's Gauss-Newton matrix on ``x`` (train-mode BN,
    buffers left as found): ``sum_n (Jw)_n^T (diag(p_n) - p_n p_n^T) (Jw)_n / N``."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    pieces = w.to(next(iter(params.values())).dtype).split([p.numel() for p in params.values()])
    tangents = {name: t.view_as(p) for (name, p), t in zip(params.items(), pieces, strict=True)}
    with hessian.preserved_model_state(model, train=True), hessian.plain_batchnorm_forward(model):
        logits, jw = jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))
    p, q = logits.softmax(-1).double(), jw.double()
    return float(((p * q * q).sum(-1) - (p * q).sum(-1) ** 2).sum() / x.shape[0])


if __name__ == "__main__":
    main()
