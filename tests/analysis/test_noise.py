"""Tests for deconcnn_cli.analysis.noise: unbiasedness on known populations, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deconcnn_cli.analysis.noise import gradient_noise, noise_statistics
from tests.analysis.models import assert_state_equal, probe_batch, snapshot, tiny_cnn

N_SE = 3.0  # mean of an estimate over draws within this many standard errors of the truth
EXACT_REL_TOL = 1e-10  # float64 identities (streaming vs two-pass, formulas)
K = 8
B = 4
N_DRAWS = 4000


def _population(n: int = 50, dim: int = 20, seed: int = 0) -> torch.Tensor:
    """Fixed per-example gradients with a non-zero mean."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64) + 0.3


def test_estimates_are_unbiased_on_a_known_population() -> None:
    population = _population()
    mean = population.mean(dim=0)
    sigma_trace = float(((population - mean) ** 2).sum(dim=1).mean())  # tr(Sigma), 1/N
    true_noise_trace = sigma_trace / B  # sampling with replacement: Cov(g) = Sigma / B
    true_norm_sq = float(mean @ mean)
    gen = torch.Generator().manual_seed(1)
    index = torch.randint(0, len(population), (N_DRAWS, K, B), generator=gen)
    minibatch_grads = population[index].mean(dim=2)  # (draws, K, P)
    results = [noise_statistics(g, batch_size=B) for g in minibatch_grads]
    for field, truth in (
        ("grad_noise_trace", true_noise_trace),
        ("grad_norm_sq_unbiased", true_norm_sq),
    ):
        values = np.array([getattr(r, field) for r in results])
        standard_error = values.std(ddof=1) / math.sqrt(N_DRAWS)
        assert abs(values.mean() - truth) < N_SE * standard_error, field


def test_statistics_follow_the_metrics_formulas() -> None:
    grads = torch.randn(K, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads += 0.5
    result = noise_statistics(grads, batch_size=B)
    g_bar = grads.mean(dim=0)
    trace = float(((grads - g_bar) ** 2).sum()) / (K - 1)
    norm_sq = (K * float(g_bar @ g_bar) - float((grads**2).sum(dim=1).mean())) / (K - 1)
    assert math.isclose(result.grad_noise_trace, trace, rel_tol=EXACT_REL_TOL)
    assert math.isclose(result.gradient_variance, trace / 30, rel_tol=EXACT_REL_TOL)
    assert math.isclose(result.grad_norm_sq_unbiased, norm_sq, rel_tol=EXACT_REL_TOL)
    assert math.isclose(result.grad_noise_scale, B * trace / norm_sq, rel_tol=EXACT_REL_TOL)
    assert (result.k, result.batch_size, result.n_params, result.reason) == (K, B, 30, "")


def test_noise_scale_is_nan_when_the_norm_estimate_is_not_positive() -> None:
    g = torch.randn(4, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = noise_statistics(torch.cat([g, -g]), batch_size=B)  # mean exactly zero
    assert result.grad_norm_sq_unbiased < 0 and math.isnan(result.grad_noise_scale)
    assert result.grad_noise_trace > 0 and result.reason


def _batches(x: torch.Tensor, y: torch.Tensor, k: int, size: int) -> list:
    return [(x[i * size : (i + 1) * size], y[i * size : (i + 1) * size]) for i in range(k)]


def test_linear_softmax_matches_per_example_gradients() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(4)
        model = nn.Linear(5, 3).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6 * 8, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6 * 8,), generator=gen)
    batch_grads = []
    for xb, yb in _batches(x, y, 6, 8):
        per_example = []
        for xi, yi in zip(xb, yb, strict=True):
            loss = F.cross_entropy(model(xi[None]), yi[None])
            grads = torch.autograd.grad(loss, list(model.parameters()))
            per_example.append(torch.cat([g.reshape(-1) for g in grads]))
        batch_grads.append(torch.stack(per_example).mean(dim=0))
    expected = noise_statistics(torch.stack(batch_grads), batch_size=8)
    result = gradient_noise(model, _batches(x, y, 6, 8))
    for field in ("grad_noise_trace", "grad_norm_sq_unbiased", "grad_noise_scale"):
        assert math.isclose(getattr(result, field), getattr(expected, field), rel_tol=1e-9)
    assert (result.k, result.batch_size, result.n_params) == (6, 8, 18)


def test_bn_model_uses_train_mode_and_restores_state() -> None:
    model = tiny_cnn()
    model[1].eval()  # per-module mode must come back
    model[4].bias.grad = torch.ones_like(model[4].bias)
    x, y = probe_batch(n=4 * 5)
    expected_grads = []
    reference = tiny_cnn()
    reference.train()
    for xb, yb in _batches(x, y, 4, 5):
        loss = F.cross_entropy(reference(xb), yb)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        expected_grads.append(torch.cat([g.reshape(-1) for g in grads]))
    expected = noise_statistics(torch.stack(expected_grads), batch_size=5)
    before = snapshot(model)
    result = gradient_noise(model, iter(_batches(x, y, 4, 5)))  # a one-shot iterator works
    assert_state_equal(model, before)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast must not apply
        assert gradient_noise(model, _batches(x, y, 4, 5)) == result
    assert math.isclose(result.grad_noise_trace, expected.grad_noise_trace, rel_tol=1e-9)
    assert math.isclose(
        result.grad_norm_sq_unbiased, expected.grad_norm_sq_unbiased, rel_tol=1e-9, abs_tol=1e-12
    )


def test_non_finite_loss_gives_nan_and_reason() -> None:
    model = tiny_cnn()
    with torch.no_grad():
        model[4].bias[0] = math.inf
    before = snapshot(model)
    x, y = probe_batch(n=3 * 4)
    result = gradient_noise(model, _batches(x, y, 3, 4))
    assert_state_equal(model, before)
    assert math.isnan(result.grad_noise_trace) and math.isnan(result.grad_noise_scale)
    assert math.isnan(result.gradient_variance) and "non-finite" in result.reason


def test_bad_arguments_raise_value_error() -> None:
    model = tiny_cnn()
    x, y = probe_batch(n=8)
    with pytest.raises(ValueError, match="k >= 2"):
        gradient_noise(model, _batches(x, y, 1, 4))
    with pytest.raises(ValueError, match="size"):
        gradient_noise(model, [(x[:4], y[:4]), (x[4:7], y[4:7])])
    with pytest.raises(ValueError, match="shape"):
        noise_statistics(torch.zeros(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        noise_statistics(torch.zeros(3, 4), batch_size=0)
