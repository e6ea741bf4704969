"""Lanczos for the largest eigenvalue of a symmetric operator, with an a-posteriori stop.

Pure numerics over any :class:`HVPOperator` (a Hessian-vector product, or a matrix in the
tests): no model, no I/O. Full reorthogonalisation keeps the Krylov basis orthonormal to
working precision, so the basis and the tridiagonal matrix can be reused by a Krylov-deflated
trace estimator (:func:`deconcnn_cli.analysis.hessian.hutchinson_trace`).

Stopping rule. After the ``j``-th operator product the top Ritz pair ``(theta, y)`` of the
tridiagonal ``T_j`` has residual ``r = |H y - theta y| = beta_j |s_j|`` (``s`` the top
eigenvector of ``T_j``, ``s_j`` its last entry, ``beta_j`` the next off-diagonal): no extra
product. For a symmetric matrix some eigenvalue lies within ``r`` of ``theta``, and within
``r**2 / gap`` if no other eigenvalue is closer than ``gap`` to ``theta`` (Kato-Temple). The run
stops once ``min(r, r**2 / gap) <= tol * |theta|``. The gap is not known and is estimated
conservatively as

    gap = min(theta - (theta_2 + r_2), gap_cap * |theta|)

with ``(theta_2, r_2)`` the second Ritz value and its residual (``theta_2 + r_2`` is the top of
its error interval, so this is below the plain Ritz gap ``theta - theta_2``), and no more than
``gap_cap`` (0.3%) of ``|theta|``: Ritz values only bound the spectrum from below, so the Ritz
gap overestimates the true one whenever an eigenvalue near the top has not yet emerged in the
Krylov space (a near partner of ``lambda_max``). Without the cap the Ritz-gap rule stopped at
the wrong eigenvalue of a 1%-gap matrix in 75 of 100 random starts; with it, in 3 (the plain
residual test ``r <= tol |theta|``: 1). With ``gap_cap = 3e-3`` and ``tol = 1e-3`` the run
stops at ``r <= 1.7e-3 |theta|`` (or ``r <= tol |theta|`` while the Ritz gap is smaller), which
on ResNet-18 Hessians left eigenvalue errors of 2e-7 to 2e-5 (docs/metrics-curvature-noise.md).
Only ``r`` is a rigorous bound, and on the distance to *some* eigenvalue: no Krylov method sees
an eigenvector almost orthogonal to its start vector, so ``theta`` (always ``<= lambda_max``)
can stop at a lower eigenvalue when the start vector has almost no component on the top one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from deconcnn_cli.analysis.progress import STILL_WORKING, ProgressFn, report

DEFAULT_TOL = 1e-3  # library default; a run uses AnalysisConfig.lanczos_tol (1e-2, from the spread)
DEFAULT_MAX_HVP = 40  # Lanczos steps (= HVPs) at most; reaching it gives NaN, never a guess
DEFAULT_GAP_CAP = 3e-3  # the Ritz gap is trusted up to this fraction of |theta| (docstring)
DEFAULT_BASIS_DTYPE = torch.float32  # stored Lanczos vectors; the tridiagonal is float64
_COLD_START_SEED = 0
_REORTH_PASSES = 2  # classical Gram-Schmidt twice: orthogonal to working precision


class HVPOperator(Protocol):
    """Maps a flat vector ``v`` to ``H @ v`` (e.g. ``hessian.HessianOperator``)."""

    n_params: int
    device: torch.device
    dtype: torch.dtype

    def __call__(self, v: torch.Tensor) -> torch.Tensor: ...


class MatrixOperator:
    """An :class:`HVPOperator` for an explicit symmetric matrix (tests, benches)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix, self.n_params = matrix, matrix.shape[0]
        self.device, self.dtype = matrix.device, matrix.dtype

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v.to(self.dtype)


@dataclass(frozen=True)
class LanczosResult:
    """Top eigenvalue of a symmetric operator; ``value`` NaN and ``reason`` unless converged.

    ``basis`` (the ``j`` orthonormal Lanczos vectors, 1-D, in the run's ``basis_dtype`` on the
    operator's device; never stacked into a matrix, which would double the peak memory) and
    ``tridiagonal`` (``j x j`` float64, ``Q.T @ H @ Q``) are those of the ``j`` products made;
    they are kept after a non-converged run too (a valid deflation basis), and are None only
    when a product was non-finite.
    """

    value: float  # converged top Ritz value; NaN if not converged
    ritz_value: float  # top Ritz value reached, converged or not (NaN if non-finite)
    vector: torch.Tensor | None  # top Ritz vector: flat, float32, CPU, unit norm
    basis: tuple[torch.Tensor, ...] | None
    tridiagonal: np.ndarray | None
    error_bound: float  # a-posteriori bound on |ritz_value - eigenvalue|
    n_hvp: int
    converged: bool
    reason: str  # "" on success


def lanczos_top(
    op: HVPOperator,
    *,
    v0: torch.Tensor | np.ndarray | None = None,
    tol: float = DEFAULT_TOL,
    max_hvp: int = DEFAULT_MAX_HVP,
    gap_cap: float = DEFAULT_GAP_CAP,
    basis_dtype: torch.dtype = DEFAULT_BASIS_DTYPE,
    progress: ProgressFn | None = None,
) -> LanczosResult:
    """Largest algebraic eigenvalue by Lanczos with full reorthogonalisation.

    Parameters
    ----------
    op : HVPOperator
        Symmetric operator; called with vectors of ``op.dtype`` on ``op.device``. The Lanczos
        vectors and the reorthogonalisation are ``basis_dtype`` on that device; the
        tridiagonal and its eigenproblem are float64.
    v0 : tensor or array, optional
        Start vector (the previous eigenvector: a warm start); ignored if zero or non-finite.
        Without it a fixed-seed Gaussian vector is used, so results are deterministic.
    tol : float
        Stop when the bound ``min(r, r**2 / gap)`` (module docstring) is at most
        ``tol * |theta|``.
    max_hvp : int
        Products at most (one per Lanczos step). Reaching it without meeting ``tol`` gives
        ``value`` NaN with a reason; the Ritz pair and the basis are still returned.
    gap_cap : float
        The gap in ``r**2 / gap`` is at most ``gap_cap * |theta|`` (module docstring); 0
        gives the residual test ``r <= tol * |theta|``.
    basis_dtype : torch.dtype
        Precision of the stored Lanczos vectors: float32 (default) halves the memory of
        float64, and its rounding (~1e-7) is far below any tolerance used; float64 for tests
        that check orthogonality to 1e-12.
    progress : callable, optional
        Told ``("lanczos", done, max_hvp)`` before each product; a True answer raises
        :class:`~deconcnn_cli.analysis.progress.EvaluationStopped` (nothing is returned).

    Returns
    -------
    LanczosResult
    """
    n = op.n_params
    if n < 1:
        raise ValueError(f"need at least 1 parameter, got {n}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if max_hvp < 1:
        raise ValueError(f"max_hvp must be >= 1, got {max_hvp}")
    if not gap_cap >= 0:
        raise ValueError(f"gap_cap must be >= 0, got {gap_cap}")
    if basis_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"basis_dtype must be float32 or float64, got {basis_dtype}")
    q = start_vector(v0, n).to(op.device, basis_dtype)
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []  # off-diagonal of T: betas[i] couples q_i and q_{i+1}
    theta, bound, s = math.nan, math.inf, np.ones(1)
    for step in range(1, min(max_hvp, n) + 1):
        report(progress, "lanczos", step - 1, max_hvp)
        basis.append(q)
        with torch.autocast(op.device.type, enabled=False):
            hq = op(q.to(op.dtype)).detach().to(basis_dtype)
        if not bool(torch.isfinite(hq).all()):
            return _failed(step, "non-finite Hessian-vector product in Lanczos")
        alpha = float(dot64(q, hq))
        alphas.append(alpha)
        w = hq - alpha * q
        if len(basis) > 1:
            w -= betas[-1] * basis[-2]
        for _ in range(_REORTH_PASSES):  # no stacked copy of the basis: loop over it
            report(progress, STILL_WORKING, 0, 0)  # 2 j full-length dots: seconds at width 1
            coeffs = [dot64(b, w).to(w.dtype) for b in basis]
            for b, c in zip(basis, coeffs, strict=True):
                w -= c * b
        beta = float(torch.linalg.vector_norm(w, dtype=torch.float64))
        theta, bound, s, exhausted = _ritz_bound(alphas, betas, beta, gap_cap)
        if not math.isfinite(theta):
            return _failed(step, "non-finite Lanczos tridiagonal")
        if bound <= tol * abs(theta) or exhausted or step == n:
            return _result(basis, alphas, betas, theta, s, bound, converged=True)
        betas.append(beta)
        q = w / beta
        del hq, w
    result = _result(basis, alphas, betas[: len(alphas) - 1], theta, s, bound, converged=False)
    reason = (
        f"Lanczos did not converge within max_hvp={max_hvp} HVPs "
        f"(bound {bound / abs(theta) if theta else math.inf:.1e} > tol {tol:g})"
    )
    return dataclasses.replace(result, value=math.nan, reason=reason)


def dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a . b`` accumulated in float64 (a 0-d tensor on their device).

    A float32 ``torch.dot`` over millions of entries accumulates in float32 and is off by
    ~1e-4 (the basis then fails an orthonormality check at full width); the products are
    exact enough in float32, the sum is what needs float64.
    """
    return torch.sum(a * b, dtype=torch.float64)


def start_vector(v0: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor:
    """Unit float64 CPU vector: ``v0`` normalised, or a fixed-seed Gaussian if unusable."""
    if v0 is not None:
        start = torch.as_tensor(np.asarray(v0) if isinstance(v0, np.ndarray) else v0)
        start = start.detach().to("cpu", torch.float64).reshape(-1)
        if start.shape != (n,):
            raise ValueError(f"v0 must have {n} elements, got {start.numel()}")
        norm = float(torch.linalg.vector_norm(start))
        if math.isfinite(norm) and norm > 0:
            return start / norm
    gen = torch.Generator().manual_seed(_COLD_START_SEED)
    start = torch.randn(n, generator=gen, dtype=torch.float64)
    return start / torch.linalg.vector_norm(start)


def _ritz_bound(
    alphas: list[float], betas: list[float], beta: float, gap_cap: float
) -> tuple[float, float, np.ndarray, bool]:
    """Top Ritz value of ``T_j``, its error bound, its eigenvector ``s``, invariant subspace?"""
    d = np.asarray(alphas)
    if len(d) == 1:
        values, vectors = d.copy(), np.ones((1, 1))
    else:
        values, vectors = eigh_tridiagonal(d, np.asarray(betas))
    if not (np.all(np.isfinite(values)) and math.isfinite(beta)):
        return math.nan, math.inf, vectors[:, -1], False
    theta, s = float(values[-1]), vectors[:, -1]
    scale = max(float(np.max(np.abs(values))), 1e-300)
    exhausted = beta <= 1e-12 * scale  # invariant subspace: the Ritz values are exact
    r = beta * abs(float(s[-1]))
    bound = r
    if len(d) > 1:
        r2 = beta * abs(float(vectors[-1, -2]))
        gap = min(theta - (float(values[-2]) + r2), gap_cap * abs(theta))
        if gap > r:
            bound = min(r, r * r / gap)
    return theta, bound, s, exhausted


def _result(
    basis: list[torch.Tensor],
    alphas: list[float],
    betas: list[float],
    theta: float,
    s: np.ndarray,
    bound: float,
    *,
    converged: bool,
) -> LanczosResult:
    vector = torch.zeros_like(basis[0], dtype=torch.float64)  # sum_i s_i q_i, no stacked copy
    for b, coeff in zip(basis, s.tolist(), strict=True):
        vector.add_(b, alpha=coeff)
    vector = (vector / torch.linalg.vector_norm(vector)).to("cpu", torch.float32)
    j = len(alphas)
    t = np.diag(np.asarray(alphas))
    if j > 1:
        off = np.asarray(betas[: j - 1])
        t += np.diag(off, 1) + np.diag(off, -1)
    return LanczosResult(
        value=theta,
        ritz_value=theta,
        vector=vector,
        basis=tuple(basis),
        tridiagonal=t,
        error_bound=bound,
        n_hvp=j,
        converged=converged,
        reason="",
    )


def _failed(n_hvp: int, reason: str) -> LanczosResult:
    return LanczosResult(
        value=math.nan,
        ritz_value=math.nan,
        vector=None,
        basis=None,
        tridiagonal=None,
        error_bound=math.inf,
        n_hvp=n_hvp,
        converged=False,
        reason=reason,
    )
