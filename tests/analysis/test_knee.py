"""Knee search: breaks located anywhere in 50-epoch-shaped windows, false knees, censoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.signal import lfilter

from deconcnn_cli.analysis.knee import (
    KNEE_BIN_WIDTH_LOG_T,
    KNEE_MIN_BIC_GAIN,
    find_knee,
    hinge_wrss,
    knee_n_bins,
)

SPE = 352  # CIFAR-10 steps per epoch
STEPS = 50 * SPE  # a 50-epoch run: t = 1 .. 17,600
KNEE_STEP_REL_TOL = 0.25  # the protocol: a clear break is located within +-25% of its step
EXPONENT_ABS_TOL = 0.1  # segment exponents on 10% AR(1) per-step noise
MAX_FALSE_KNEE_RATE = 0.05  # the protocol: <= 5% false knees on pure power laws
N_FALSE_KNEE_SEEDS = 100
REFERENCE_RSS_REL_TOL = 1e-9  # find_knee's optimum vs a dense brute-force search
SIGMA, RHO = 0.1, 0.5  # realistic per-step noise: 10% multiplicative, AR(1) correlated

WINDOWS = {  # (first t, last t) of the fitted windows a run uses
    "from step 0": (1, STEPS),
    "alpha_full from burn-in at step 500": (501, STEPS),
}
EARLY_WINDOW = (5 * SPE + 1, 15 * SPE)  # alpha_early: epochs [5, 15)


def _noise(seed: int, n: int, sigma: float = SIGMA, rho: float = RHO) -> np.ndarray:
    """Multiplicative lognormal per-step noise with AR(1) correlation ``rho`` in log space."""
    e = np.random.default_rng(seed).standard_normal(n) * math.sqrt(1 - rho**2)
    return np.exp(sigma * lfilter([1.0], [1.0, -rho], e))


def _two_regime(t: np.ndarray, t_knee: float, before: float, after: float) -> np.ndarray:
    return 2.0 * np.where(t < t_knee, t**-before, t_knee**-before * (t / t_knee) ** -after)


def _window(lo: int, hi: int) -> np.ndarray:
    return np.arange(lo, hi + 1, dtype=np.float64)


def _assert_located(knee, t_knee: float) -> None:
    assert knee.breakpoint_t is not None and not knee.censored
    step_found, step_true = knee.breakpoint_t - 1, t_knee - 1
    assert abs(step_found - step_true) <= KNEE_STEP_REL_TOL * step_true


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize(("before", "after"), [(0.3, 0.8), (0.8, 0.3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_break_is_located_anywhere_in_the_window(
    window: str, fraction: float, before: float, after: float, seed: int
) -> None:
    lo, hi = WINDOWS[window]
    t = _window(lo, hi)
    t_knee = lo + fraction * (hi - lo)  # 10%, 50%, 90% of the window's steps
    knee = find_knee(t, _two_regime(t, t_knee, before, after) * _noise(seed, t.size))
    _assert_located(knee, t_knee)
    if fraction == 0.5:  # near an end, one segment spans ~0.1 in ln t: its slope is loose
        assert knee.exponent_before == pytest.approx(before, abs=EXPONENT_ABS_TOL)
        assert knee.exponent_after == pytest.approx(after, abs=EXPONENT_ABS_TOL)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("seed", [0, 1])
def test_break_in_the_alpha_early_window(fraction: float, seed: int) -> None:
    # The early window spans only a factor 3 in t: a break in its first or last 10% bends
    # the curve by less than 10% per-step noise hides (docs/metrics-curve-shape.md).
    lo, hi = EARLY_WINDOW
    t = _window(lo, hi)
    t_knee = lo + fraction * (hi - lo)
    _assert_located(find_knee(t, _two_regime(t, t_knee, 0.3, 0.8) * _noise(seed, t.size)), t_knee)


def test_a_late_break_is_not_reported_at_the_old_search_edge() -> None:
    # The case: true break at epoch 40, burn-in at step 500. The 20-bin search could
    # only reach epoch ~27 and reported a confident knee there.
    t = _window(501, STEPS)
    t_knee = 40 * SPE + 1.0
    knee = find_knee(t, _two_regime(t, t_knee, 0.3, 0.8) * _noise(7, t.size))
    _assert_located(knee, t_knee)
    assert (knee.breakpoint_t - 1) / SPE == pytest.approx(40, rel=KNEE_STEP_REL_TOL)


@pytest.mark.parametrize("window", [*WINDOWS.values(), EARLY_WINDOW], ids=[*WINDOWS, "alpha_early"])
@pytest.mark.parametrize(("sigma", "rho"), [(0.1, 0.5), (0.3, 0.0)])
def test_false_knee_rate_on_pure_power_laws(window: tuple[int, int], sigma: float, rho: float):
    t = _window(*window)
    knees = [
        find_knee(t, 2.0 * t**-0.5 * _noise(1000 + seed, t.size, sigma, rho))
        for seed in range(N_FALSE_KNEE_SEEDS)
    ]
    false_knees = sum(k.breakpoint_t is not None for k in knees)
    assert false_knees <= MAX_FALSE_KNEE_RATE * N_FALSE_KNEE_SEEDS


@pytest.mark.parametrize("where", ["after the range", "before the range"])
def test_best_breakpoint_on_the_edge_is_censored(where: str) -> None:
    t = _window(501, STEPS)
    # a sharp bend in the last (first) ~1% of t: beyond the last (first) candidate
    t_knee = 17_300.0 if where == "after the range" else 512.0
    before, after = (0.3, 10.0) if where == "after the range" else (30.0, 0.3)
    knee = find_knee(t, _two_regime(t, t_knee, before, after) * _noise(3, t.size))
    assert knee.breakpoint_t is None and knee.censored
    assert knee.bic_one - knee.bic_two > KNEE_MIN_BIC_GAIN
    edge = knee.search_hi_t if where == "after the range" else knee.search_lo_t
    assert knee.candidate_t == pytest.approx(edge, rel=2 * KNEE_BIN_WIDTH_LOG_T)


def test_search_range_reaches_within_a_few_bins_of_both_ends() -> None:
    t = _window(501, STEPS)
    knee = find_knee(t, 2.0 * t**-0.5 * _noise(0, t.size))
    assert not knee.censored and knee.breakpoint_t is None
    # 4 bins of 1% in t: the last candidate is ~4% of t before the end (95% of the steps).
    assert knee.search_hi_t > 0.95 * STEPS
    assert knee.search_lo_t < 1.05 * 501
    assert knee.n_points == knee_n_bins(t)  # every 1% bin is populated from t = 500 on


def _naive_bins(t: np.ndarray, loss: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    edges = np.geomspace(t.min(), t.max(), n_bins + 1)
    rows = []
    for k in range(n_bins):
        last = k == n_bins - 1
        inside = (t >= edges[k]) & ((t <= edges[k + 1]) if last else (t < edges[k + 1]))
        if inside.any():
            rows.append((np.mean(np.log(t[inside])), np.log(np.mean(loss[inside])), inside.sum()))
    return tuple(np.array(c, dtype=np.float64) for c in zip(*rows, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_dense_brute_force_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = _window(int(rng.integers(1, 200)), int(rng.integers(3000, 9000)))
    loss = _two_regime(t, float(rng.uniform(0.3, 0.7) * t[-1]), 0.4, 0.9) * _noise(seed, t.size)
    knee = find_knee(t, loss)
    x, y, counts = _naive_bins(t, loss, knee_n_bins(t))
    w = counts / counts.mean()

    def wrss(xb: float) -> float:  # plain normal equations, no shared code
        design = np.column_stack([np.ones_like(x), x, np.maximum(0.0, x - xb)])
        coef = np.linalg.solve(design.T @ (w[:, None] * design), design.T @ (w * y))
        return float(np.sum(w * (y - design @ coef) ** 2))

    grid = np.linspace(math.log(knee.search_lo_t), math.log(knee.search_hi_t), 4000)
    best = min(grid, key=wrss)
    assert knee.n_points == x.size
    assert abs(math.log(knee.candidate_t) - best) <= KNEE_BIN_WIDTH_LOG_T
    found = hinge_wrss(x, y, w, math.log(knee.candidate_t))[0]
    assert found <= wrss(best) * (1 + REFERENCE_RSS_REL_TOL)


def test_knee_n_bins_follows_the_resolution() -> None:
    assert knee_n_bins(np.array([1.0, math.e])) == 100
    assert knee_n_bins(np.array([1.0, math.e]), 0.5) == 2
    assert knee_n_bins(np.array([3.0, 3.0])) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bin_width_log_t": 0.0}, "bin_width_log_t"),
        ({"min_points_per_segment": 1}, "min_points_per_segment"),
        ({"min_bic_gain": -1.0}, "min_bic_gain"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    t = _window(1, 1000)
    with pytest.raises(ValueError, match=message):
        find_knee(t, t**-0.5, **kwargs)


def test_too_few_bins_raise() -> None:
    with pytest.raises(ValueError, match="non-empty bins"):
        find_knee(np.arange(1.0, 6.0), np.ones(5))
