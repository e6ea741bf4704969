"""Normalised sharpness on a quadratic with known eigenvalues: PyTorch's own SGD converges
just below 1 and diverges just above it, heavy ball and Nesterov alike, weight decay included."""

from __future__ import annotations

import math

import pytest
import torch

from deconcnn_cli.analysis.stability import normalised_sharpness, sgd_stability_threshold

EIGENVALUES = (50.0, 3.0, 0.2)  # lambda_max = 50
STEPS = 600
MARGIN = 0.05  # 0.95 and 1.05 of the edge: growth or decay of 1.05^... is clear in 600 steps


def _final_norm(lr: float, momentum: float, nesterov: bool, wd: float) -> float:
    """|x| along the top eigenvector after SGD on f(x) = x^T diag(EIGENVALUES) x / 2 from x = 1
    (the slow directions decay at their own, much slower rate)."""
    x = torch.ones(len(EIGENVALUES), dtype=torch.float64, requires_grad=True)
    h = torch.tensor(EIGENVALUES, dtype=torch.float64)
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (h * x * x).sum()).backward()
        opt.step()
    return abs(float(x.detach()[0]))


# PyTorch refuses Nesterov without momentum (its threshold would be 2, as plain GD's)
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.5, False), (0.9, False),
                                                    (0.5, True), (0.9, True)])  # fmt: skip
@pytest.mark.parametrize("wd", [0.0, 5.0])
def test_sgd_is_stable_below_one_and_unstable_above(momentum: float, nesterov: bool, wd: float):
    lam = max(EIGENVALUES)
    edge_lr = sgd_stability_threshold(momentum, nesterov) / (lam + wd)
    for factor, stable in ((1 - MARGIN, True), (1 + MARGIN, False)):
        lr = factor * edge_lr
        s = normalised_sharpness(lam, lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
        assert s == pytest.approx(factor, rel=1e-12)
        norm = _final_norm(lr, momentum, nesterov, wd)
        assert (norm < 1e-3) if stable else (norm > 1e3), (factor, norm)


def test_thresholds_and_bad_input():
    assert sgd_stability_threshold(0.9) == pytest.approx(3.8)
    assert sgd_stability_threshold(0.9, nesterov=True) == pytest.approx(3.8 / 2.8)
    assert sgd_stability_threshold(0.0, nesterov=True) == sgd_stability_threshold(0.0) == 2.0
    assert math.isnan(normalised_sharpness(math.nan, 0.1, momentum=0.9))
    with pytest.raises(ValueError, match="momentum"):
        sgd_stability_threshold(1.0)
    with pytest.raises(ValueError, match="lr and weight_decay"):
        normalised_sharpness(1.0, -0.1, momentum=0.9)
