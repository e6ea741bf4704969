"""Fluctuations of the per-step training loss about its trend: smoothers, residuals, PSD slope.

Pure functions on numpy arrays (no I/O). The protocol is in ``docs/metrics-curve-shape.md``:
``r_t = ln L_t - ln Lhat_t`` with ``Lhat`` a *centred* moving average (a trailing EWMA lags a
falling curve and turns the trend itself into residual), ``residual_power = var(r_t)`` and
``psd_tail`` = the log-log slope of the Welch spectrum of ``r_t``.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter, welch

MIN_PSD_SAMPLES = 128  # below this one Welch segment is too noisy to give a slope (std > 0.3)
MIN_PSD_FREQUENCIES = 3  # fewest positive-power frequencies in [f_min, f_max] for a slope


def _as_1d_finite(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains non-finite values")
    return arr


def _half_width(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"window must be a positive integer number of samples, got {window!r}")
    return int(window) // 2


def centred_smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average with symmetric shrinking at the edges.

    Sample ``i`` is the mean of ``x[i - h_i : i + h_i + 1]`` with ``h = window // 2`` and
    ``h_i = min(h, i, n - 1 - i)``. The full width is ``2h + 1``, so an even ``window`` is
    rounded up to the next odd number (88 -> 89). Near the edges the window shrinks
    *symmetrically*, so it stays centred and adds no lag on a sloped curve; the price is more
    noise there (the first and last samples are returned unsmoothed).

    Parameters
    ----------
    x : np.ndarray
        1-D finite samples, one per step.
    window : int
        Full window width in samples (>= 1; 1 returns a copy of ``x``).

    Returns
    -------
    np.ndarray
        Smoothed values, same length as ``x``.

    Raises
    ------
    ValueError
        If ``x`` is not 1-D and finite or ``window`` is not a positive integer.
    """
    arr = _as_1d_finite(x, "x")
    h = _half_width(window)
    n = arr.size
    if n == 0:
        return arr.copy()
    i = np.arange(n)
    h_i = np.minimum(h, np.minimum(i, n - 1 - i))
    csum = np.concatenate(([0.0], np.cumsum(arr)))
    return (csum[i + h_i + 1] - csum[i - h_i]) / (2 * h_i + 1)


def ewma(x: np.ndarray, alpha: float) -> np.ndarray:
    """Trailing exponentially weighted moving average, ``y_0 = x_0``.

    ``y_t = alpha * x_t + (1 - alpha) * y_{t-1}``. Provided for display only: it lags a falling
    loss curve by about ``(1 - alpha) / alpha`` steps, so the protocol's residuals use
    :func:`centred_smooth` instead.

    Parameters
    ----------
    x : np.ndarray
        1-D finite samples.
    alpha : float
        Weight of the newest sample, in (0, 1].

    Returns
    -------
    np.ndarray
        Smoothed values, same length as ``x``.

    Raises
    ------
    ValueError
        If ``alpha`` is outside (0, 1] or ``x`` is not 1-D and finite.
    """
    arr = _as_1d_finite(x, "x")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if arr.size == 0:
        return arr.copy()
    y, _ = lfilter([alpha], [1.0, -(1.0 - alpha)], arr, zi=[(1.0 - alpha) * arr[0]])
    return y


def log_residuals(loss: np.ndarray, window: int, *, trim_edges: bool = True) -> np.ndarray:
    """Log residuals about the centred trend, ``r_t = ln L_t - ln Lhat_t``.

    Parameters
    ----------
    loss : np.ndarray
        1-D per-step loss, finite and > 0.
    window : int
        Full width of the centred smoother in steps (see :func:`centred_smooth`).
    trim_edges : bool, default True
        Drop the ``window // 2`` samples at each end, where the smoother's window had to
        shrink. There the trend follows the noise and the residuals are biased towards 0
        (exactly 0 at the first and last sample), which would understate the variance and
        whiten the spectrum. Trimmed, ``len(r) = len(loss) - 2 * (window // 2)``.

    Returns
    -------
    np.ndarray
        The residuals (empty when ``loss`` is too short to keep any).

    Raises
    ------
    ValueError
        If ``loss`` is not 1-D, finite and positive, or ``window`` is invalid.
    """
    arr = _as_1d_finite(loss, "loss")
    if np.any(arr <= 0):
        raise ValueError("loss must be > 0 to take its log")
    h = _half_width(window)
    r = np.log(arr) - np.log(centred_smooth(arr, window))
    if trim_edges:
        r = r[h : max(h, r.size - h)]
    return r


def residual_power(loss: np.ndarray, *, window: int) -> float:
    """Variance of the log residuals about the centred trend (edges trimmed).

    ``var(r_t)`` with ``ddof=0`` over :func:`log_residuals` with ``trim_edges=True``. For a
    smooth curve it is ~0 (a symmetric window removes any locally linear trend exactly and
    leaves ``window**2 / 24`` times the curvature), so it measures step-to-step noise.

    Parameters
    ----------
    loss : np.ndarray
        1-D per-step loss, finite and > 0 (the protocol passes the last 2 epochs, plus
        ``window // 2`` steps before them when available).
    window : int
        Full smoother width in steps.

    Returns
    -------
    float
        The residual variance, in squared nats of log-loss.

    Raises
    ------
    ValueError
        If fewer than 2 residuals remain after trimming (``len(loss) < 2 * (window // 2) + 2``)
        or the input is invalid.
    """
    r = log_residuals(loss, window, trim_edges=True)
    if r.size < 2:
        raise ValueError(
            f"residual_power needs len(loss) >= 2 * (window // 2) + 2 = "
            f"{2 * (int(window) // 2) + 2}, got {np.asarray(loss).size}"
        )
    return float(np.var(r))


def psd_tail(
    r: np.ndarray,
    *,
    nperseg: int = 256,
    f_min: float = 0.02,
    f_max: float = 0.5,
    discrete_frequency: bool = True,
) -> float:
    """Log-log slope of the Welch spectrum of the residuals over ``[f_min, f_max]``.

    Welch: Hann window, ``nperseg`` samples per segment, 50% overlap, linear detrend per
    segment, one-sided density. The slope is the OLS slope of ``ln P`` against
    ``ln(2 sin(pi f))`` (``discrete_frequency=True``, the Geweke-Porter-Hudak regressor) or
    against ``ln f`` (``False``). The two agree for ``f << 0.5`` since
    ``2 sin(pi f) = 2 pi f (1 + O(f^2))``, but only the first gives exactly 0 for white noise and
    -2 for a discrete random walk, whose spectrum is ``1 / (4 sin^2(pi f))``: against ``ln f``
    the walk flattens towards Nyquist and the slope over [0.02, 0.5] is about -1.7.

    Parameters
    ----------
    r : np.ndarray
        1-D finite residual series, one sample per step.
    nperseg : int, default 256
        Welch segment length. If ``len(r) < nperseg``, one segment of ``len(r)`` samples is used
        provided ``len(r) >= MIN_PSD_SAMPLES`` (128); below that the result is NaN.
    f_min, f_max : float, default 0.02, 0.5
        Frequency band in cycles/step, ``0 < f_min < f_max <= 0.5`` (both ends included).
    discrete_frequency : bool, default True
        Regress on ``ln(2 sin(pi f))`` instead of ``ln f`` (see above).

    Returns
    -------
    float
        The slope; NaN when ``r`` is too short or fewer than 3 frequencies in the band have
        power above rounding level (e.g. a constant or linear ``r``).

    Raises
    ------
    ValueError
        If ``r`` is not 1-D and finite, ``nperseg < 8``, or the band is invalid.
    """
    arr = _as_1d_finite(r, "r")
    if isinstance(nperseg, bool) or not isinstance(nperseg, int | np.integer) or nperseg < 8:
        raise ValueError(f"nperseg must be an integer >= 8, got {nperseg!r}")
    if not 0.0 < f_min < f_max <= 0.5:
        raise ValueError(f"need 0 < f_min < f_max <= 0.5 cycles/step, got {f_min!r}, {f_max!r}")
    n_seg = int(nperseg)
    if arr.size < n_seg:
        if arr.size < MIN_PSD_SAMPLES:
            return float("nan")
        n_seg = arr.size
    f, p = welch(arr, window="hann", nperseg=n_seg, noverlap=n_seg // 2, detrend="linear")
    # Power at rounding level (a constant or linear r after detrending) is not a spectrum.
    floor = (64 * np.finfo(np.float64).eps * float(np.max(np.abs(arr)))) ** 2
    keep = (f >= f_min) & (f <= f_max) & (p > floor)
    if np.count_nonzero(keep) < MIN_PSD_FREQUENCIES:
        return float("nan")
    x = np.log(2.0 * np.sin(np.pi * f[keep])) if discrete_frequency else np.log(f[keep])
    y = np.log(p[keep])
    xc = x - x.mean()
    return float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
