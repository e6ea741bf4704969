"""Smoothers, log residuals and the PSD slope, against references and known spectra."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import welch

from deconcnn_cli.analysis.spectral import (
    centred_smooth,
    ewma,
    log_residuals,
    psd_tail,
    residual_power,
)

REFERENCE_TOL = 1e-10
PSD_WHITE_TOL = 0.3  # |slope| on white noise
PSD_WALK_TOL = 0.3  # |slope + 2| on a random walk
PSD_LOG_F_TOL = 0.15  # ln f regressor against its exact expectation
PURE_RESIDUAL_MAX = 1e-6  # residual power of a noiseless power law (noise gives ~1e-3)
REL_TOL_RESIDUAL_POWER = 0.1
N_PSD = 4096  # 31 Welch segments: the slope's standard deviation is ~0.04


def _naive_centred(x: np.ndarray, window: int) -> np.ndarray:
    h, n = window // 2, len(x)
    out = np.empty(n)
    for i in range(n):
        k = min(h, i, n - 1 - i)
        out[i] = np.mean(x[i - k : i + k + 1])
    return out


@pytest.mark.parametrize("window", [1, 2, 5, 88, 89, 1000])
def test_centred_smooth_matches_naive_loop(window: int) -> None:
    x = np.random.default_rng(window).standard_normal(300)
    np.testing.assert_allclose(centred_smooth(x, window), _naive_centred(x, window), atol=1e-12)


def test_centred_smooth_keeps_a_line_and_has_no_lag() -> None:
    line = 3.0 - 0.01 * np.arange(500)
    np.testing.assert_allclose(centred_smooth(line, 51), line, atol=1e-12)
    # A trailing EWMA lags a falling line by (1 - alpha) / alpha steps.
    assert ewma(line, 0.1)[-1] - line[-1] == pytest.approx(0.01 * 9, rel=1e-6)


def test_ewma_matches_recursion() -> None:
    x = np.random.default_rng(0).standard_normal(200)
    ref = np.empty_like(x)
    ref[0] = x[0]
    for i in range(1, x.size):
        ref[i] = 0.3 * x[i] + 0.7 * ref[i - 1]
    np.testing.assert_allclose(ewma(x, 0.3), ref, rtol=REFERENCE_TOL)


@pytest.mark.parametrize(("bad", "message"), [(0, "positive integer"), (2.5, "positive integer")])
def test_bad_window_raises(bad: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        centred_smooth(np.ones(10), bad)  # type: ignore[arg-type]


def test_log_residuals_trim_and_definition() -> None:
    loss = np.exp(np.random.default_rng(1).normal(0.0, 0.1, 400))
    full = log_residuals(loss, 21, trim_edges=False)
    np.testing.assert_allclose(full, np.log(loss) - np.log(_naive_centred(loss, 21)), atol=1e-12)
    assert abs(full[0]) < 1e-12 and abs(full[-1]) < 1e-12  # the shrunk window is the sample
    np.testing.assert_array_equal(log_residuals(loss, 21), full[10:-10])
    with pytest.raises(ValueError, match="> 0"):
        log_residuals(np.array([1.0, 0.0, 1.0]), 3)


def test_residual_power_of_pure_power_law_is_tiny() -> None:
    t = np.arange(1000, 3001, dtype=float)
    assert residual_power(2.0 * t**-0.5, window=353) < PURE_RESIDUAL_MAX
    assert residual_power(2.0 * t**-0.5, window=89) < PURE_RESIDUAL_MAX


@pytest.mark.parametrize("sigma", [0.03, 0.1])
def test_residual_power_measures_multiplicative_noise(sigma: float) -> None:
    t = np.arange(1000, 3001, dtype=float)
    noise = np.random.default_rng(2).normal(0.0, sigma, t.size)
    window = 89  # white noise about a width-w mean keeps (1 - 1/w) of its variance
    expected = sigma**2 * (1 - 1 / window)
    assert residual_power(2.0 * t**-0.5 * np.exp(noise), window=window) == pytest.approx(
        expected, rel=REL_TOL_RESIDUAL_POWER
    )
    with pytest.raises(ValueError, match="len\\(loss\\)"):
        residual_power(np.ones(50), window=89)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psd_tail_white_noise_is_flat(seed: int) -> None:
    r = np.random.default_rng(seed).standard_normal(N_PSD)
    assert abs(psd_tail(r)) < PSD_WHITE_TOL
    assert abs(psd_tail(r, discrete_frequency=False)) < PSD_WHITE_TOL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_psd_tail_random_walk_is_minus_two(seed: int) -> None:
    walk = np.cumsum(np.random.default_rng(seed).standard_normal(N_PSD))
    assert psd_tail(walk) == pytest.approx(-2.0, abs=PSD_WALK_TOL)


def test_psd_tail_log_f_regressor_matches_its_exact_expectation() -> None:
    walk = np.cumsum(np.random.default_rng(3).standard_normal(N_PSD))
    f = np.arange(129) / 256
    band = (f >= 0.02) & (f <= 0.5)
    exact = np.polyfit(np.log(f[band]), -np.log(4 * np.sin(np.pi * f[band]) ** 2), 1)[0]
    assert exact == pytest.approx(-1.71, abs=0.02)  # the walk flattens towards Nyquist
    assert psd_tail(walk, discrete_frequency=False) == pytest.approx(exact, abs=PSD_LOG_F_TOL)


def test_psd_tail_matches_scipy_reference() -> None:
    r = np.random.default_rng(4).standard_normal(1000)
    f, p = welch(r, window="hann", nperseg=256, noverlap=128, detrend="linear")
    band = (f >= 0.02) & (f <= 0.5)
    ref = np.polyfit(np.log(2 * np.sin(np.pi * f[band])), np.log(p[band]), 1)[0]
    assert psd_tail(r) == pytest.approx(ref, rel=REFERENCE_TOL)


def test_psd_tail_short_or_degenerate_input_is_nan() -> None:
    rng = np.random.default_rng(5)
    assert np.isnan(psd_tail(rng.standard_normal(100)))  # < 128 samples
    assert np.isfinite(psd_tail(rng.standard_normal(200)))  # one segment of 200
    assert np.isnan(psd_tail(np.ones(1000)))
    assert np.isnan(psd_tail(np.linspace(0.0, 1.0, 1000)))
    with pytest.raises(ValueError, match="f_min"):
        psd_tail(rng.standard_normal(1000), f_min=0.3, f_max=0.2)


def test_residual_pipeline_separates_white_from_walk_noise() -> None:
    rng = np.random.default_rng(6)
    t = np.arange(5000, 5000 + 704 + 88, dtype=float)  # 2 epochs of 352 steps + the window
    white = 2.0 * t**-0.5 * np.exp(0.1 * rng.standard_normal(t.size))
    walk = 2.0 * t**-0.5 * np.exp(0.02 * np.cumsum(rng.standard_normal(t.size)))
    assert abs(psd_tail(log_residuals(white, 89))) < PSD_WHITE_TOL
    assert psd_tail(log_residuals(walk, 89)) == pytest.approx(-2.0, abs=PSD_WALK_TOL)
