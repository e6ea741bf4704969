"""Tests for deconcnn_cli.analysis.hessian against dense Hessians of tiny networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from deconcnn_cli.analysis.hessian import (
    HessianOperator,
    evaluate_curvature,
    hutchinson_trace,
    lanczos_start,
    plain_batchnorm_forward,
    preserved_model_state,
    top_hessian_eigenvalue,
)
from deconcnn_cli.analysis.lanczos import DEFAULT_GAP_CAP, lanczos_top
from deconcnn_cli.analysis.lanczos import MatrixOperator as MatrixHVP
from tests.analysis.models import assert_state_equal, probe_batch, snapshot, tiny_cnn

HVP_REL_TOL = 1e-5  # HVP vs dense Hessian, float64
EIG_REL_TOL = 1e-3  # protocol: lambda_max to 1e-3 relative
TRACE_N_SE = 3.0  # pooled trace estimate within this many standard errors of the truth
SEM_CALIBRATION_FACTOR = 1.5  # empirical std of the estimate vs mean reported sem
N_SEEDS = 40
N_PROBES = 32
N_KRYLOV_SEEDS = 400  # Krylov-deflated estimator: many cheap seeds on an explicit matrix
CHUNK = 4  # 10 examples -> chunks of 4, 4, 2


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Explicit train-mode Hessian (float64) of the chunk-weighted mean CE."""
    model = model.double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    x = x.double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = flat.split([s.numel() for s in shapes])
        state = {n: t.view(s) for n, t, s in zip(names, pieces, shapes, strict=True)}
        state.update({n: b.clone() for n, b in buffers.items()})
        total = flat.new_zeros(())
        for start in range(0, len(x), chunk):
            out = functional_call(model, state, (x[start : start + chunk],))
            total = total + F.cross_entropy(out, y[start : start + chunk]) * (len(out) / len(x))
        return total

    with preserved_model_state(model, train=True):
        return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("bn", [True, False])
def test_hvp_matches_dense_hessian(bn: bool) -> None:
    model, (x, y) = tiny_cnn(bn=bn), probe_batch()
    hessian = dense_hessian(model, x, y, CHUNK)
    gen = torch.Generator().manual_seed(2)
    with preserved_model_state(model, train=True):
        op = HessianOperator(model, x, y, chunk_size=CHUNK)
        assert op.n_params == hessian.shape[0]
        for _ in range(5):
            v = torch.randn(op.n_params, generator=gen, dtype=torch.float64)
            expected = hessian @ v
            assert (op(v) - expected).norm() / expected.norm() < HVP_REL_TOL
    assert op.n_hvp == 5


def test_chunk_weights_give_the_mean_loss_without_bn() -> None:
    model, (x, y) = tiny_cnn(bn=False), probe_batch()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    whole = HessianOperator(model, x, y, chunk_size=len(x))
    uneven = HessianOperator(model, x, y, chunk_size=3)  # 3, 3, 3, 1
    assert math.isclose(whole.loss, uneven.loss, rel_tol=1e-12)
    assert (whole(v) - uneven(v)).norm() / whole(v).norm() < HVP_REL_TOL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_eigenvalue_matches_dense(dtype: torch.dtype) -> None:
    model, (x, y) = tiny_cnn(dtype=dtype), probe_batch(dtype=dtype)
    truth = float(np.linalg.eigvalsh(dense_hessian(tiny_cnn(), *probe_batch(), CHUNK).numpy())[-1])
    with preserved_model_state(model, train=True):
        op = HessianOperator(model, x, y, chunk_size=CHUNK)
        cold = top_hessian_eigenvalue(op)
        warm = top_hessian_eigenvalue(op, v0=cold.vector)
    for result in (cold, warm):
        assert result.converged and result.reason == ""
        assert abs(result.value - truth) / abs(truth) < EIG_REL_TOL
        assert result.error_bound <= EIG_REL_TOL * abs(result.value)
        slack = 1e-9 if dtype == torch.float64 else 1e-5  # fp32 HVPs of a float64 truth
        assert abs(result.value - truth) <= result.error_bound + slack * abs(truth)
    assert cold.vector.dtype == torch.float32 and cold.vector.device.type == "cpu"
    assert math.isclose(float(cold.vector.double().norm()), 1.0, rel_tol=1e-6)
    assert warm.n_hvp < cold.n_hvp


def random_spectrum_matrix(n: int, top: list[float], bulk: float, seed: int) -> torch.Tensor:
    """Symmetric ``n x n`` matrix: eigenvalues ``top`` plus a Gaussian bulk of scale ``bulk``."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    rest = torch.randn(n - len(top), generator=gen, dtype=torch.float64) * bulk
    values = torch.cat([torch.tensor(top, dtype=torch.float64), rest])
    return u @ torch.diag(values) @ u.T


@pytest.mark.parametrize(
    ("tol", "basis_dtype", "rounding"),
    [(1e-3, torch.float32, 1e-6), (1e-6, torch.float64, 1e-12)],
)
def test_lanczos_error_bound_holds_against_dense(
    tol: float, basis_dtype: torch.dtype, rounding: float
) -> None:
    """The a-posteriori bound covers the true error, which then meets the tolerance.

    Twenty random starts per spectrum (well separated, a 2% top gap, one outlier, a larger
    negative end): the bound is not rigorous for a start vector almost orthogonal to the top
    eigenvector, so it is tested on generic ones. The bound is exact arithmetic's: float32
    Lanczos vectors add rounding of ~1e-7 relative (``rounding``), far below the tolerances.
    """
    spectra = [([10.0, 9.0, 8.0], 1.0), ([5.0, 4.9, 1.0], 0.5), ([3.0], 1.0), ([3.0, -8.0], 0.5)]
    for seed, (top, bulk) in enumerate(spectra):
        matrix = random_spectrum_matrix(120, top, bulk, seed)
        truth = float(torch.linalg.eigvalsh(matrix)[-1])
        for start in range(20):
            v0 = torch.randn(120, generator=torch.Generator().manual_seed(1000 + start))
            result = lanczos_top(
                MatrixHVP(matrix), v0=v0, tol=tol, max_hvp=120, basis_dtype=basis_dtype
            )
            assert result.converged, result.reason
            error = abs(result.value - truth)
            assert result.value <= truth + rounding * abs(truth)  # a Ritz value never overshoots
            assert error <= result.error_bound + rounding * abs(truth)
            assert result.error_bound <= tol * abs(result.value)


def test_capped_gap_avoids_a_false_stop_that_the_ritz_gap_makes() -> None:
    """Tiny CNN, cold start: lambda_1 = 3.180 emerges late, behind lambda_2 = 3.051.

    With the plain Ritz gap the bound claims 1e-3 while theta sits at lambda_2 (4% low); the
    gap capped at 0.3% of |theta| keeps the run going until lambda_1 is found.
    """
    hessian = dense_hessian(tiny_cnn(), *probe_batch(), CHUNK)
    truth = float(torch.linalg.eigvalsh(hessian)[-1])
    ritz_gap = lanczos_top(MatrixHVP(hessian), gap_cap=math.inf)
    capped = lanczos_top(MatrixHVP(hessian))
    assert ritz_gap.converged and (truth - ritz_gap.value) / truth > 0.03
    assert capped.converged and (truth - capped.value) / truth < EIG_REL_TOL
    assert abs(truth - capped.value) <= capped.error_bound


def test_lanczos_basis_is_orthonormal_and_tridiagonalises() -> None:
    matrix = random_spectrum_matrix(80, [6.0, 5.0], 1.0, 7)
    result = lanczos_top(MatrixHVP(matrix), tol=1e-8, max_hvp=40, basis_dtype=torch.float64)
    q = torch.stack(result.basis, dim=1)
    assert q.dtype == torch.float64 and q.shape == (80, result.n_hvp)
    torch.testing.assert_close(
        q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-12, rtol=0
    )
    np.testing.assert_allclose((q.T @ matrix @ q).numpy(), result.tridiagonal, atol=1e-10)
    assert math.isclose(
        float(result.vector.double() @ matrix @ result.vector.double()), result.value, rel_tol=1e-6
    )


def test_warm_start_needs_fewer_hvps() -> None:
    matrix = random_spectrum_matrix(200, [10.0, 8.0, 6.0], 1.0, 8)
    cold = lanczos_top(MatrixHVP(matrix), tol=1e-3)
    gen = torch.Generator().manual_seed(9)
    nearby = matrix + 0.05 * random_spectrum_matrix(200, [], 1.0, 10)  # a later "step"
    truth = float(torch.linalg.eigvalsh(nearby)[-1])
    warm = lanczos_top(MatrixHVP(nearby), v0=cold.vector, tol=1e-3)
    fresh = lanczos_top(MatrixHVP(nearby), v0=torch.randn(200, generator=gen), tol=1e-3)
    assert warm.converged and fresh.converged
    assert warm.n_hvp < fresh.n_hvp
    assert abs(warm.value - truth) <= 1e-3 * truth


def test_eigenvalue_cap_gives_nan_with_reason() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    result = top_hessian_eigenvalue(MatrixHVP((a + a.T) / 2), max_hvp=3)
    assert math.isnan(result.value) and not result.converged and result.n_hvp == 3
    assert "max_hvp=3" in result.reason
    # the Ritz pair and the Krylov basis survive: a warm start and a deflation basis
    assert math.isfinite(result.ritz_value) and result.vector is not None
    assert len(result.basis) == 3 and result.basis[0].shape == (60,)
    assert result.basis[0].dtype == torch.float32  # the default: float32 vectors
    assert result.tridiagonal.shape == (3, 3)


def test_non_converged_lanczos_still_reports_the_trace() -> None:
    model, (x, y) = tiny_cnn(), probe_batch()
    truth = float(torch.trace(dense_hessian(tiny_cnn(), x, y, CHUNK)))
    result = evaluate_curvature(
        model,
        x,
        y,
        chunk_size=CHUNK,
        n_probes=64,
        generator=torch.Generator().manual_seed(0),
        tol=1e-9,
        max_hvp=2,
    )
    assert math.isnan(result.lambda_max) and "max_hvp=2" in result.reason
    assert math.isfinite(result.hutch_trace) and result.n_hvp == 2 + 64
    assert abs(result.hutch_trace - truth) < 4 * result.hutch_trace_sem
    assert result.eigenvector is not None


@pytest.mark.parametrize("deflate", [False, True])
def test_hutchinson_unbiased_and_sem_calibrated(deflate: bool) -> None:
    model, (x, y) = tiny_cnn(), probe_batch()
    hessian = dense_hessian(model, x, y, CHUNK)
    truth = float(torch.trace(hessian))
    eigvals, eigvecs = torch.linalg.eigh(hessian)
    kwargs = (
        {"deflation_vectors": eigvecs[:, -1:], "deflation_values": [float(eigvals[-1])]}
        if deflate
        else {}
    )
    with preserved_model_state(model, train=True):
        op = HessianOperator(model, x, y, chunk_size=CHUNK)
        runs = [
            hutchinson_trace(
                op, n_probes=N_PROBES, generator=torch.Generator().manual_seed(s), **kwargs
            )
            for s in range(N_SEEDS)
        ]
    means = np.array([r.mean for r in runs])
    sems = np.array([r.sem for r in runs])
    assert all(r.n_hvp == N_PROBES and r.reason == "" for r in runs)
    pooled_se = means.std(ddof=1) / math.sqrt(N_SEEDS)
    assert abs(means.mean() - truth) < TRACE_N_SE * pooled_se
    ratio = means.std(ddof=1) / sems.mean()
    assert 1 / SEM_CALIBRATION_FACTOR < ratio < SEM_CALIBRATION_FACTOR


def per_probe_variance(matrix: torch.Tensor) -> float:
    """Exact variance of ``z^T A z`` for Rademacher ``z``: ``2 (|A|_F^2 - sum_i A_ii^2)``."""
    return float(2 * (matrix.square().sum() - matrix.diagonal().square().sum()))


@pytest.mark.parametrize("max_hvp", [1, 4, 12])
def test_krylov_deflated_trace_unbiased_and_sem_calibrated(max_hvp: int) -> None:
    """tr(T) + Hutchinson on (I - QQ^T) H (I - QQ^T): unbiased, sem honest, over many seeds."""
    matrix = random_spectrum_matrix(100, [12.0, 9.0, 7.0, 5.0], 1.0, 11)
    truth = float(torch.trace(matrix))
    lz = lanczos_top(MatrixHVP(matrix), tol=1e-9, max_hvp=max_hvp, basis_dtype=torch.float64)
    q, t = torch.stack(lz.basis, dim=1), lz.tridiagonal
    proj = torch.eye(100, dtype=torch.float64) - q @ q.T
    deflated = proj @ matrix @ proj
    # the split is exact: tr H = tr(T) + tr(P H P)
    assert math.isclose(float(np.trace(t)) + float(torch.trace(deflated)), truth, rel_tol=1e-12)
    m = 4
    runs = [
        hutchinson_trace(
            MatrixHVP(matrix),
            n_probes=m,
            generator=torch.Generator().manual_seed(s),
            deflation_vectors=lz.basis if s % 2 else q,  # vectors or their matrix
            deflation_values=np.diag(t).tolist(),
        )
        for s in range(N_KRYLOV_SEEDS)
    ]
    means = np.array([r.mean for r in runs])
    sems = np.array([r.sem for r in runs])
    pooled_se = means.std(ddof=1) / math.sqrt(N_KRYLOV_SEEDS)
    assert abs(means.mean() - truth) < TRACE_N_SE * pooled_se
    # the estimate's spread matches the exact variance of the deflated estimator ...
    exact_sd = math.sqrt(per_probe_variance(deflated) / m)
    assert 1 / 1.15 < means.std(ddof=1) / exact_sd < 1.15
    # ... and the reported sem (E[sem^2] is exact: sample variance is unbiased)
    assert 1 / 1.15 < math.sqrt(np.mean(sems**2)) / exact_sd < 1.15
    ratio = means.std(ddof=1) / sems.mean()
    assert 1 / SEM_CALIBRATION_FACTOR < ratio < SEM_CALIBRATION_FACTOR
    if max_hvp > 1:  # deflating the outliers beats plain Hutchinson
        assert per_probe_variance(deflated) < 0.8 * per_probe_variance(matrix)


def test_evaluate_curvature_trace_unbiased_on_the_cnn() -> None:
    """End to end (HVPs, Lanczos basis, tr(T) offset): the default estimator over 60 seeds."""
    model, (x, y) = tiny_cnn(), probe_batch()
    truth = float(torch.trace(dense_hessian(tiny_cnn(), x, y, CHUNK)))
    runs = [
        evaluate_curvature(
            model, x, y, chunk_size=CHUNK, n_probes=4, generator=torch.Generator().manual_seed(s)
        )
        for s in range(60)
    ]
    means = np.array([r.hutch_trace for r in runs])
    sems = np.array([r.hutch_trace_sem for r in runs])
    assert all(r.reason == "" for r in runs)
    assert abs(means.mean() - truth) < TRACE_N_SE * means.std(ddof=1) / math.sqrt(len(runs))
    ratio = means.std(ddof=1) / math.sqrt(np.mean(sems**2))
    assert 1 / SEM_CALIBRATION_FACTOR < ratio < SEM_CALIBRATION_FACTOR


def test_deflation_lowers_sem_on_a_dominant_eigenvalue() -> None:
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(80, 80, generator=gen, dtype=torch.float64) * 0.1
    u = torch.linalg.qr(torch.randn(80, 1, generator=gen, dtype=torch.float64))[0]
    matrix = 20.0 * u @ u.T + (a + a.T) / 2
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    op = MatrixHVP(matrix)
    plain = hutchinson_trace(op, n_probes=N_PROBES, generator=torch.Generator().manual_seed(0))
    deflated = hutchinson_trace(
        op,
        n_probes=N_PROBES,
        generator=torch.Generator().manual_seed(0),
        deflation_vectors=eigvecs[:, -1:],
        deflation_values=[float(eigvals[-1])],
    )
    truth = float(torch.trace(matrix))
    assert deflated.sem < 0.5 * plain.sem
    assert abs(deflated.mean - truth) < TRACE_N_SE * deflated.sem


def test_evaluate_curvature_restores_state_and_is_deterministic() -> None:
    model, (x, y) = tiny_cnn(dtype=torch.float32), probe_batch(dtype=torch.float32)
    model[1].eval()  # a submodule in eval mode must come back in eval mode
    model[0].weight.grad = torch.randn_like(model[0].weight)
    modes_seen = []
    model[1].register_forward_hook(lambda m, i, o: modes_seen.append(m.training))
    before = snapshot(model)
    with torch.no_grad():  # callers may hold no_grad; curvature must still work
        first = evaluate_curvature(
            model, x, y, chunk_size=CHUNK, n_probes=8, generator=torch.Generator().manual_seed(0)
        )
    assert_state_equal(model, before)
    assert modes_seen and all(modes_seen)  # evaluated in train mode
    second = evaluate_curvature(
        model, x, y, chunk_size=CHUNK, n_probes=8, generator=torch.Generator().manual_seed(0)
    )
    assert first.reason == "" and math.isfinite(first.lambda_max)
    assert (first.lambda_max, first.hutch_trace, first.hutch_trace_sem, first.n_hvp) == (
        second.lambda_max,
        second.hutch_trace,
        second.hutch_trace_sem,
        second.n_hvp,
    )
    model.eval()
    before = snapshot(model)
    warm = evaluate_curvature(
        model,
        x,
        y,
        chunk_size=CHUNK,
        n_probes=8,
        generator=torch.Generator().manual_seed(0),
        v0=first.eigenvector,
    )
    assert_state_equal(model, before)
    assert warm.n_hvp < first.n_hvp
    assert abs(warm.lambda_max - first.lambda_max) / first.lambda_max < EIG_REL_TOL


def test_evaluate_curvature_ignores_an_outer_autocast() -> None:
    model, (x, y) = tiny_cnn(dtype=torch.float32), probe_batch(dtype=torch.float32)
    plain = evaluate_curvature(
        model, x, y, chunk_size=CHUNK, n_probes=4, generator=torch.Generator().manual_seed(0)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = evaluate_curvature(
            model, x, y, chunk_size=CHUNK, n_probes=4, generator=torch.Generator().manual_seed(0)
        )
    assert cast.lambda_max == plain.lambda_max and cast.hutch_trace == plain.hutch_trace


class _SqrtAtZero(nn.Module):
    """Finite loss, infinite gradient: logits + sqrt(w) with w = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.body = tiny_cnn(dtype=torch.float32)
        self.w = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + torch.sqrt(self.w)


@pytest.mark.parametrize("failure", ["nan_weights", "inf_gradient"])
def test_non_finite_gives_nan_and_reason(failure: str) -> None:
    x, y = probe_batch(dtype=torch.float32)
    if failure == "nan_weights":
        model = tiny_cnn(dtype=torch.float32)
        with torch.no_grad():
            model[4].weight[0, 0] = math.nan
    else:
        model = _SqrtAtZero()
    before = snapshot(model)
    result = evaluate_curvature(
        model, x, y, chunk_size=CHUNK, n_probes=4, generator=torch.Generator().manual_seed(0)
    )
    assert_state_equal(model, before)
    assert math.isnan(result.lambda_max) and math.isnan(result.hutch_trace)
    assert math.isnan(result.hutch_trace_sem) and result.eigenvector is None
    assert "non-finite" in result.reason


def test_bad_arguments_raise_value_error() -> None:
    model, (x, y) = tiny_cnn(), probe_batch()
    gen = torch.Generator()
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_curvature(model, x, y, chunk_size=0, n_probes=4, generator=gen)
    with pytest.raises(ValueError, match="n_probes"):
        evaluate_curvature(model, x, y, chunk_size=4, n_probes=1, generator=gen)
    with pytest.raises(ValueError, match="lengths"):
        evaluate_curvature(model, x, y[:5], chunk_size=4, n_probes=4, generator=gen)
    with pytest.raises(ValueError, match="v0"):
        evaluate_curvature(model, x, y, chunk_size=4, n_probes=4, generator=gen, v0=torch.ones(3))
    op = MatrixHVP(torch.eye(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="orthonormal"):
        hutchinson_trace(
            op,
            n_probes=4,
            generator=gen,
            deflation_vectors=torch.ones(5, 1),
            deflation_values=[1.0],
        )
    with pytest.raises(ValueError, match="both"):
        hutchinson_trace(op, n_probes=4, generator=gen, deflation_values=[1.0])
    with pytest.raises(ValueError, match="tol"):
        top_hessian_eigenvalue(op, tol=0.0)


def test_half_precision_inputs_are_cast_to_the_parameter_dtype() -> None:
    model, (x, y) = tiny_cnn(dtype=torch.float32), probe_batch(dtype=torch.float16)
    kwargs = {"chunk_size": CHUNK, "n_probes": 4}
    half = evaluate_curvature(model, x, y, generator=torch.Generator().manual_seed(0), **kwargs)
    full = evaluate_curvature(
        model, x.float(), y, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert half.reason == "" and half.lambda_max == full.lambda_max
    assert half.hutch_trace == full.hutch_trace


@pytest.mark.parametrize(("m", "t_quantile"), [(3, 4.302653), (10, 2.262157)])
def test_trace_interval_uses_the_t_quantile_of_m_minus_1_dof(m: int, t_quantile: float) -> None:
    matrix = random_spectrum_matrix(50, [5.0], 1.0, 4)
    res = hutchinson_trace(MatrixHVP(matrix), n_probes=m, generator=torch.Generator())
    assert res.ci95 == pytest.approx(t_quantile * res.sem, rel=1e-6)


def test_float32_basis_agrees_with_float64() -> None:
    matrix = random_spectrum_matrix(120, [9.0, 7.0], 1.0, 5)
    lo = lanczos_top(MatrixHVP(matrix), tol=1e-6)
    hi = lanczos_top(MatrixHVP(matrix), tol=1e-6, basis_dtype=torch.float64)
    truth = float(torch.linalg.eigvalsh(matrix)[-1])
    assert lo.basis[0].dtype == torch.float32 and hi.basis[0].dtype == torch.float64
    assert abs(lo.value - truth) <= 1e-5 * truth and abs(hi.value - truth) <= 1e-6 * truth


class DiagonalHVP:
    """A cheap HVPOperator with millions of 'parameters': H = diag(d), in float32."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.n_params = d, d.numel()
        self.device, self.dtype = d.device, d.dtype

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.d * v.to(self.dtype)


def test_float32_basis_stays_orthonormal_at_full_width_size() -> None:
    # 3M parameters (ResNet-18 narrow has 2.8M, base 11M): float32 sums over that many were off by
    # ~1e-4 and the deflated trace refused its own basis; the dots now accumulate in float64.
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(3_000_000, generator=gen)
    d[:3] = torch.tensor([50.0, 40.0, 30.0])
    op = DiagonalHVP(d)
    eig = lanczos_top(op, tol=1e-2, max_hvp=12)
    assert eig.value == pytest.approx(50.0, rel=1e-2)
    for i, u in enumerate(eig.basis):
        for j, w in enumerate(eig.basis):
            gram = float(torch.sum(u.double() * w.double()))
            assert abs(gram - (i == j)) < 1e-6
    res = hutchinson_trace(
        op,
        n_probes=2,
        generator=gen,
        deflation_vectors=eig.basis,
        deflation_values=np.diag(eig.tridiagonal).tolist(),
    )
    truth = float(d.double().sum())
    assert abs(res.mean - truth) < 4 * res.sem + 1e-6 * truth


def test_lanczos_start_is_previous_vector_plus_gradient() -> None:
    g = torch.tensor([3.0, 4.0, 0.0])
    v = torch.tensor([0.0, 0.0, 2.0])
    torch.testing.assert_close(lanczos_start(None, g), torch.tensor([0.6, 0.8, 0.0]).double())
    torch.testing.assert_close(lanczos_start(v, g), torch.tensor([0.6, 0.8, 1.0]).double())
    torch.testing.assert_close(lanczos_start(v, 0 * g), torch.tensor([0.0, 0.0, 1.0]).double())
    assert lanczos_start(None, 0 * g) is None  # Lanczos then takes its fixed cold start
    with pytest.raises(ValueError, match="v0 must have 3"):
        lanczos_start(torch.ones(4), g)


def test_evaluate_curvature_starts_from_the_probe_gradient() -> None:
    model, (x, y) = tiny_cnn(), probe_batch()
    res = evaluate_curvature(model, x, y, chunk_size=CHUNK, n_probes=2, generator=torch.Generator())
    with preserved_model_state(model, train=True):
        op = HessianOperator(model, x, y, chunk_size=CHUNK)
        direct = lanczos_top(op, v0=op.gradient)
    assert (res.lambda_max, res.n_hvp - 2) == (direct.value, direct.n_hvp)


def test_warm_evaluation_trusts_the_ritz_gap_up_to_ten_tol() -> None:
    """Warm (a previous eigenvector given): the Ritz gap is trusted up to 10 x tol, so fewer
    HVPs than the cold rule from the same start, still within tol. Cold: the 0.3% cap keeps
    the run going past lambda_2 (4% below lambda_1 on this CNN) to lambda_1."""
    model, (x, y) = tiny_cnn(), probe_batch()
    hessian = dense_hessian(model, x, y, CHUNK)
    values, vectors = torch.linalg.eigh(hessian)
    truth, tol, probes = float(values[-1]), 1e-2, 2
    cold = evaluate_curvature(
        model, x, y, chunk_size=CHUNK, n_probes=probes, generator=torch.Generator(), tol=tol
    )
    assert abs(cold.lambda_max - truth) / truth <= tol
    noise = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(3)).double()
    v0 = vectors[:, -1] + 0.5 * noise / noise.norm()
    with preserved_model_state(model, train=True):
        gradient = HessianOperator(model, x, y, chunk_size=CHUNK).gradient
    start = lanczos_start(v0, gradient)
    strict = lanczos_top(MatrixHVP(hessian), v0=start, tol=tol, gap_cap=DEFAULT_GAP_CAP)
    relaxed = lanczos_top(MatrixHVP(hessian), v0=start, tol=tol, gap_cap=10 * tol)
    warm = evaluate_curvature(
        model, x, y, chunk_size=CHUNK, n_probes=probes, generator=torch.Generator(), tol=tol, v0=v0
    )
    assert warm.n_hvp - probes == relaxed.n_hvp < strict.n_hvp
    assert abs(warm.lambda_max - truth) / truth <= tol


def test_plain_batchnorm_graph_gives_the_native_hvp_and_leaves_the_model_as_found() -> None:
    model, (x, y) = tiny_cnn(), probe_batch()
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with preserved_model_state(model, train=True):
        native = HessianOperator(model, x, y, chunk_size=CHUNK, plain_batchnorm=False)(v)
    with preserved_model_state(model, train=True):
        plain = HessianOperator(model, x, y, chunk_size=CHUNK)(v)
    torch.testing.assert_close(plain, native, rtol=1e-12, atol=1e-12)
    assert not any("forward" in vars(m) for m in model.modules())  # patched only inside
    model.eval()  # eval-mode BatchNorm (running statistics) is never replaced
    with plain_batchnorm_forward(model):
        assert "forward" not in vars(model[1])
