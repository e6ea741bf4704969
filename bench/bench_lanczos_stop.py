"""How often each Lanczos stopping rule stops on the wrong eigenvalue, and what it costs.

Symmetric 300 x 300 matrices whose top of the spectrum is either a near-degenerate pair
(top gap 1%, 4%, 14%) over a slowly decaying tail, or the top 12 eigenvalues measured on
ResNet-18 (width 0.125, steps 500 and 1,000 of bench_metrics' trajectory) over the same kind
of tail; a Gaussian bulk (sd 0.3) below. For each, 100 starts of two kinds:

- ``cold``: a random Gaussian vector (as without any previous eigenvector);
- ``warm``: the true top eigenvector plus a random vector of half its norm (a previous
  evaluation's eigenvector after the weights moved).

Rules (``gap_cap`` of ``lanczos_top``): ``0.003`` (the cold default), ``10tol`` (the warm
default of ``evaluate_curvature``), ``resid`` (``gap_cap = 0``: the residual test alone) and
``inf`` (the plain Ritz gap). A stop is wrong when ``|theta - lambda_max| > tol lambda_max``.
Printed per rule and start: wrong stops out of 100, mean HVPs.

    python bench/bench_lanczos_stop.py [--tols 1e-2,1e-3]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from deconcnn_cli.analysis.lanczos import DEFAULT_GAP_CAP, MatrixOperator, lanczos_top

N = 300
TAIL = [k**-0.5 for k in range(1, 20)]
SPECTRA = {
    "gap 1%": [10.0, 9.9] + [9.0 * t for t in TAIL],
    "gap 4%": [10.0, 9.6] + [9.0 * t for t in TAIL],
    "gap 14%": [10.0, 8.6] + [8.0 * t for t in TAIL],
    "resnet step 500": [7.925, 6.798, 5.718, 5.515, 5.082, 4.467, 4.133, 3.706, 3.265, 3.111]
    + [2.5 * k**-0.5 for k in range(1, 30)],
    "resnet step 1000": [12.063, 6.629, 6.031, 3.883, 3.523, 3.211, 3.116, 2.844, 2.718, 2.639]
    + [2.0 * k**-0.5 for k in range(1, 30)],
}


def matrix_with(top: list[float], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=torch.float64))[0]
    rest = torch.randn(N - len(top), generator=gen, dtype=torch.float64) * 0.3
    values = torch.cat([torch.tensor(top, dtype=torch.float64), rest])
    return u @ torch.diag(values) @ u.T, u[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tols", default="1e-2,1e-3")
    ap.add_argument("--starts", type=int, default=100)
    args = ap.parse_args()
    for tol in (float(t) for t in args.tols.split(",")):
        rules = {"0.003": DEFAULT_GAP_CAP, "10tol": 10 * tol, "resid": 0.0, "inf": math.inf}
        print(f"tol {tol:g}: wrong stops / {args.starts}, mean HVPs")
        print(
            f"{'spectrum':<18}"
            + "".join(f"{r + '/' + s:>16}" for r in rules for s in ("cold", "warm"))
        )
        for name, top in SPECTRA.items():
            matrix, u1 = matrix_with(top)
            truth = float(torch.linalg.eigvalsh(matrix)[-1])
            cells = []
            for cap in rules.values():
                for start in ("cold", "warm"):
                    wrong, hvps = 0, []
                    for s in range(args.starts):
                        gen = torch.Generator().manual_seed(100 + s)
                        v0 = torch.randn(N, generator=gen, dtype=torch.float64)
                        if start == "warm":
                            v0 = u1 + 0.5 * v0 / v0.norm()
                        r = lanczos_top(
                            MatrixOperator(matrix),
                            v0=v0,
                            tol=tol,
                            max_hvp=120,
                            gap_cap=cap,
                            basis_dtype=torch.float64,
                        )
                        hvps.append(r.n_hvp)
                        wrong += abs(r.value - truth) / truth > tol
                    cells.append(f"{wrong:>3} {np.mean(hvps):5.1f}")
            print(f"{name:<18}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
