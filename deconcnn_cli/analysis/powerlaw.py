"""Loss-curve shape: power-law, offset and exponential fits on log-binned loss; burn-in.

Pure functions on numpy arrays (no I/O). Conventions, used everywhere here:

- ``t = step + 1``, the number of optimizer steps taken (steps count from 0 and ``ln t`` needs
  ``t > 0``). :func:`burn_in_step`, :func:`alpha_early` and :func:`alpha_full` take *steps*
  and convert; the ``fit_*`` functions take ``t``. The knee has its own module, :mod:`.knee`.
- Fits use the loss averaged in log-uniform bins of ``t`` (:func:`log_uniform_bins`): average
  L in a bin, *then* take the log. Uniform-in-t points would give late training almost all the
  weight in a log-log fit.
- Goodness of fit (R^2, RMSE, AIC, BIC) is computed in log space on the binned points.
- Invalid input raises ``ValueError``; "not defined yet" is ``None`` (the ``alpha_*`` helpers).

Definitions and the reasons behind each choice: ``docs/metrics-curve-shape.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from deconcnn_cli.analysis.spectral import centred_smooth

DEFAULT_N_BINS = 20  # log-uniform bins per fit window, whatever its length
MIN_BINS = 3  # fewest non-empty bins for a 2-parameter fit (one residual degree of freedom)
MIN_BINS_OFFSET = 4  # the offset form has 3 parameters
OFFSET_F_SCALE = 0.1  # soft_l1 scale in log space: residuals beyond ~10% are down-weighted


@dataclass(frozen=True)
class PowerLawFit:
    """``L(t) ~ prefactor * t**(-exponent)``: OLS line through (ln t, ln mean L) bins.

    ``exponent_se`` is the OLS standard error of the slope, ``sqrt(RSS / (n - 2) / Sxx)`` on
    the ``n_points`` bins: conditional on the binning, and assuming independent residuals of
    equal variance (docs/metrics-curve-shape.md says when that understates the spread).
    """

    exponent: float
    prefactor: float
    r2: float
    rmse: float
    n_points: int
    aic: float
    bic: float
    exponent_se: float = math.nan


@dataclass(frozen=True)
class OffsetPowerLawFit:
    """``L(t) = prefactor * t**(-exponent) + offset``: robust fit on the same bins."""

    exponent: float
    prefactor: float
    offset: float
    r2: float
    n_points: int


@dataclass(frozen=True)
class ExponentialFit:
    """``L(t) ~ prefactor * exp(-rate * t)``: OLS line through (t, ln mean L) bins."""

    rate: float
    prefactor: float
    r2: float
    rmse: float
    n_points: int
    aic: float
    bic: float


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_curve(t: np.ndarray, loss: np.ndarray, t_name: str = "t") -> tuple[np.ndarray, ...]:
    t_arr = np.asarray(t, dtype=np.float64)
    l_arr = np.asarray(loss, dtype=np.float64)
    if t_arr.ndim != 1 or t_arr.shape != l_arr.shape:
        raise ValueError(
            f"{t_name} and loss must be 1-D of equal length: {t_arr.shape}, {l_arr.shape}"
        )
    if t_arr.size == 0:
        raise ValueError(f"{t_name} and loss are empty")
    if not (np.all(np.isfinite(t_arr)) and np.all(np.isfinite(l_arr))):
        raise ValueError(f"{t_name} and loss must be finite")
    if np.any(l_arr < 0):
        raise ValueError("loss must be >= 0")
    return t_arr, l_arr


def _bins(t: np.ndarray, loss: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Centres, means and counts of the non-empty log-uniform bins."""
    t_arr, l_arr = _check_curve(t, loss)
    if np.any(t_arr <= 0):
        raise ValueError("t must be > 0 for log-uniform bins (use t = step + 1)")
    n_bins = _check_int(n_bins, "n_bins", 1)
    log_t = np.log(t_arr)
    lo, hi = log_t.min(), log_t.max()
    idx = np.zeros(t_arr.size, dtype=np.int64)
    if hi > lo:
        idx = np.clip(np.floor((log_t - lo) / (hi - lo) * n_bins).astype(np.int64), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    full = counts > 0
    mean_log_t = np.bincount(idx, weights=log_t, minlength=n_bins)[full] / counts[full]
    mean_loss = np.bincount(idx, weights=l_arr, minlength=n_bins)[full] / counts[full]
    return np.exp(mean_log_t), mean_loss, counts[full]


def log_uniform_bins(
    t: np.ndarray, loss: np.ndarray, n_bins: int = DEFAULT_N_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Average the loss in ``n_bins`` log-uniform bins of ``t``; drop empty bins.

    Bin ``k`` holds ``ln t`` in ``[lo + k w, lo + (k + 1) w)``, ``w = (ln max t - ln min t) /
    n_bins``, the last bin closed. Empty bins (common at small ``t``, where a bin is narrower
    than the spacing of integer steps) are dropped. The centre is the geometric mean of the
    ``t`` in the bin (the mean of the regressor ``ln t``): for a power law sampled uniformly in
    ``t``, both it and the bin's mean loss scale with the bin's left edge, so averaging only
    rescales the prefactor (by ``1 + O((alpha w)**2)``) and leaves the exponent unbiased.

    Parameters
    ----------
    t : np.ndarray
        1-D positive times (``step + 1``).
    loss : np.ndarray
        1-D finite losses (>= 0), same length as ``t``.
    n_bins : int, default DEFAULT_N_BINS
        Number of bins (>= 1) before empty ones are dropped.

    Returns
    -------
    t_centres, loss_means : tuple of np.ndarray
        One entry per non-empty bin, increasing in ``t``. The mean comes first; the caller takes
        the log (the mean of logs is lower, by an amount that depends on the noise).

    Raises
    ------
    ValueError
        If the arrays differ in shape, are empty or non-finite, ``t <= 0``, ``loss < 0`` or
        ``n_bins < 1``.
    """
    centres, means, _ = _bins(t, loss, n_bins)
    return centres, means


def _binned_logs(t: np.ndarray, loss: np.ndarray, n_bins: int, min_bins: int) -> tuple:
    """ln centre, ln mean loss, counts and means; ValueError below ``min_bins`` bins."""
    centres, means, counts = _bins(t, loss, _check_int(n_bins, "n_bins", min_bins))
    if centres.size < min_bins:
        raise ValueError(f"need at least {min_bins} non-empty bins of t, got {centres.size}")
    if np.any(means <= 0):
        raise ValueError("a bin has mean loss 0, whose log is undefined")
    return np.log(centres), np.log(means), counts, means


def _ic(rss: float, n: int, n_params: int) -> tuple[float, float]:
    """Gaussian AIC, BIC with ``n_params`` mean parameters plus the noise variance."""
    log_mse = math.log(max(rss / n, 1e-300))  # floor: an exact fit stays finite
    k = n_params + 1
    return n * log_mse + 2 * k, n * log_mse + k * math.log(n)


def _line_fit(x: np.ndarray, y: np.ndarray, n_params: int = 2) -> tuple[float, ...]:
    """OLS of y on x: intercept, slope, R^2, RMSE, AIC, BIC (x centred for conditioning)."""
    if x[-1] == x[0]:
        raise ValueError("all t are equal: the slope is not defined")
    xc = x - x.mean()
    slope = float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))
    intercept = float(y.mean() - slope * x.mean())
    rss = float(np.sum((y - intercept - slope * x) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - rss / ss_tot if ss_tot > 0 else float("nan")
    return (intercept, slope, r2, math.sqrt(rss / y.size), *_ic(rss, y.size, n_params))


def fit_power_law(t: np.ndarray, loss: np.ndarray, *, n_bins: int = DEFAULT_N_BINS) -> PowerLawFit:
    """Fit ``L ~ prefactor * t**(-exponent)``: OLS of ln(bin mean L) on ln(bin centre).

    Parameters
    ----------
    t, loss : np.ndarray
        As in :func:`log_uniform_bins`.
    n_bins : int, default DEFAULT_N_BINS
        Log-uniform bins before dropping empty ones (>= 3).

    Returns
    -------
    PowerLawFit
        ``r2``, ``rmse`` in log space on the bins; ``aic``/``bic`` count 3 parameters, as
        :func:`fit_exponential` does, so the two compare directly.

    Raises
    ------
    ValueError
        On invalid input, or fewer than 3 non-empty bins (use :func:`alpha_early` or
        :func:`alpha_full` for ``None`` instead).
    """
    x, y, _, _ = _binned_logs(t, loss, n_bins, MIN_BINS)
    b0, b1, r2, rmse, aic, bic = _line_fit(x, y)
    xc = x - x.mean()
    se = math.sqrt(rmse**2 * x.size / (x.size - 2) / float(np.dot(xc, xc)))
    return PowerLawFit(-b1, math.exp(b0), r2, rmse, int(x.size), aic, bic, se)


def fit_exponential(
    t: np.ndarray, loss: np.ndarray, *, n_bins: int = DEFAULT_N_BINS
) -> ExponentialFit:
    """Fit ``L ~ prefactor * exp(-rate * t)``: OLS of ln(bin mean L) on the bin centre.

    Same binned points and parameter count as :func:`fit_power_law`, so the lower AIC/BIC of
    the two is the better description of the curve.

    Parameters
    ----------
    t, loss : np.ndarray
        As in :func:`log_uniform_bins`.
    n_bins : int, default DEFAULT_N_BINS
        Log-uniform bins before dropping empty ones (>= 3).

    Returns
    -------
    ExponentialFit
        ``rate`` per unit of ``t`` (per step); goodness of fit in log space on the bins.

    Raises
    ------
    ValueError
        On invalid input or fewer than 3 non-empty bins.
    """
    x, y, _, _ = _binned_logs(t, loss, n_bins, MIN_BINS)
    b0, b1, r2, rmse, aic, bic = _line_fit(np.exp(x), y)
    return ExponentialFit(-b1, math.exp(b0), r2, rmse, int(x.size), aic, bic)


def fit_power_law_offset(
    t: np.ndarray,
    loss: np.ndarray,
    *,
    n_bins: int = DEFAULT_N_BINS,
    f_scale: float = OFFSET_F_SCALE,
) -> OffsetPowerLawFit:
    """Fit ``L = a * t**(-alpha) + c`` to the binned loss by robust least squares.

    Residuals are in log space, ``ln(a t^-alpha + c) - ln(mean L)`` (each bin weighs the same
    relative error, as in the pure fit), with scipy's ``soft_l1`` loss so a few off-trend bins
    do not drag the fit. Bounds ``a > 0``, ``alpha >= 0``, ``0 <= c < min(bin mean L)``. Starts
    from the pure power law with ``c`` at 0, 50% and 90% of that minimum; the lowest cost wins.

    Parameters
    ----------
    t, loss : np.ndarray
        As in :func:`log_uniform_bins`.
    n_bins : int, default DEFAULT_N_BINS
        Log-uniform bins; at least 4 must be non-empty (3 parameters).
    f_scale : float, default OFFSET_F_SCALE
        Log-space residual at which ``soft_l1`` turns from quadratic to linear.

    Returns
    -------
    OffsetPowerLawFit
        ``r2`` is the ordinary R^2 of ln(mean L) on the bins.

    Raises
    ------
    ValueError
        On invalid input or fewer than 4 non-empty bins.
    """
    if not f_scale > 0:
        raise ValueError(f"f_scale must be > 0, got {f_scale!r}")
    x, y, _, means = _binned_logs(t, loss, n_bins, MIN_BINS_OFFSET)
    _, b1, *_ = _line_fit(x, y)
    alpha0, c_max = max(-b1, 0.0), float(means.min()) * (1.0 - 1e-9)

    def residuals(p: np.ndarray) -> np.ndarray:
        return np.log(np.exp(p[0] - p[1] * x) + p[2]) - y

    best = None
    for c0 in (0.0, 0.5 * c_max, 0.9 * c_max):
        log_a0 = math.log(means[0] - c0) + alpha0 * x[0]  # start through the first bin
        res = least_squares(
            residuals,
            np.array([log_a0, alpha0, c0]),
            bounds=([-np.inf, 0.0, 0.0], [np.inf, np.inf, c_max]),
            loss="soft_l1",
            f_scale=f_scale,
        )
        if best is None or res.cost < best.cost:
            best = res
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residuals(best.x) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    log_a, alpha, c = (float(v) for v in best.x)
    return OffsetPowerLawFit(alpha, math.exp(log_a), c, r2, int(x.size))


def _check_steps(steps: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s_arr, l_arr = _check_curve(steps, loss, t_name="steps")
    if np.any(s_arr < 0) or np.any(np.diff(s_arr) <= 0):
        raise ValueError("steps must be >= 0 and strictly increasing")
    return s_arr, l_arr


def burn_in_step(
    steps: np.ndarray, loss: np.ndarray, *, window_steps: int, threshold: float = 1.0
) -> int | None:
    """First step where the centred-smoothed training loss is ``<= threshold`` (nats).

    Only steps whose full centred window is present are eligible (not the last
    ``window_steps // 2``), so the answer never changes as more steps arrive: once found, it is
    final.

    Parameters
    ----------
    steps : np.ndarray
        1-D step indices, >= 0 and strictly increasing, one per loss sample.
    loss : np.ndarray
        1-D finite per-step training cross-entropy (nats).
    window_steps : int
        Full width of :func:`centred_smooth`, in samples (the protocol: a quarter epoch).
    threshold : float, default 1.0
        Loss level (nats).

    Returns
    -------
    int or None
        The step, or None when the smoothed loss has not (yet) reached ``threshold``.

    Raises
    ------
    ValueError
        On invalid input.
    """
    s_arr, l_arr = _check_steps(steps, loss)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    smooth = centred_smooth(l_arr, window_steps)
    eligible = smooth[: max(0, smooth.size - int(window_steps) // 2)]
    hits = np.flatnonzero(eligible <= threshold)
    return int(s_arr[hits[0]]) if hits.size else None


def _fit_or_none(
    steps: np.ndarray, loss: np.ndarray, n_bins: int, clock: np.ndarray | None = None
) -> PowerLawFit | None:
    """Power law on ``t = step + 1``, or on ``clock`` (its samples at 0 are left out)."""
    _check_int(n_bins, "n_bins", MIN_BINS)
    t = steps + 1.0 if clock is None else clock
    keep = t > 0
    t, loss = t[keep], loss[keep]
    if t.size < MIN_BINS or _bins(t, loss, n_bins)[0].size < MIN_BINS:
        return None
    return fit_power_law(t, loss, n_bins=n_bins)


def _check_clock(clock: np.ndarray | None, steps: np.ndarray) -> np.ndarray | None:
    if clock is None:
        return None
    c_arr = np.asarray(clock, dtype=np.float64)
    if c_arr.shape != steps.shape:
        raise ValueError(f"clock must have the shape of steps {steps.shape}, got {c_arr.shape}")
    if not np.all(np.isfinite(c_arr)) or np.any(c_arr < 0) or np.any(np.diff(c_arr) < 0):
        raise ValueError("clock must be finite, >= 0 and non-decreasing")
    return c_arr


def lr_time(lr_per_step: np.ndarray) -> np.ndarray:
    """Cumulative learning rate ``tau_s = sum_{u <= s} lr_u``: the time axis of the lr fits.

    Under a schedule the loss is closer to a function of ``tau`` than of the step count (a
    step at lr 0 moves nothing); fitting against ``tau`` takes the schedule's own bend out of
    the curve. Like ``t = step + 1``, ``tau`` at step ``s`` includes step ``s``'s own lr.

    Parameters
    ----------
    lr_per_step : np.ndarray
        1-D learning rate of steps 0, 1, ... (finite, >= 0).

    Returns
    -------
    np.ndarray
        ``np.cumsum(lr_per_step)`` in float64 (0 while the lr is 0, e.g. step 0 of a warmup
        from 0; the fits leave those samples out).

    Raises
    ------
    ValueError
        If ``lr_per_step`` is not 1-D, or has a negative or non-finite entry.
    """
    lr = np.asarray(lr_per_step, dtype=np.float64)
    if lr.ndim != 1 or not np.all(np.isfinite(lr)) or np.any(lr < 0):
        raise ValueError("lr_per_step must be 1-D, finite and >= 0")
    return np.cumsum(lr)


def alpha_early(
    steps: np.ndarray,
    loss: np.ndarray,
    *,
    steps_per_epoch: int,
    epoch_window: tuple[float, float] = (5.0, 15.0),
    n_bins: int = DEFAULT_N_BINS,
    require_complete: bool = True,
    clock: np.ndarray | None = None,
) -> PowerLawFit | None:
    """Power-law fit (``t = step + 1``, or ``clock``) over the steps in epochs ``[start, end)``.

    Step ``s`` is in epoch ``s / steps_per_epoch``, so the window is
    ``ceil(start * spe) <= s < ceil(end * spe)``.

    Parameters
    ----------
    steps, loss : np.ndarray
        As in :func:`burn_in_step`.
    steps_per_epoch : int
        Optimizer steps per epoch (>= 1).
    epoch_window : tuple of float, default (5.0, 15.0)
        ``(start, end)`` in epochs, ``0 <= start < end``.
    n_bins : int, default DEFAULT_N_BINS
        Log-uniform bins (>= 3).
    require_complete : bool, default True
        The protocol: None until the window's first and last step are logged (the run has
        reached epoch ``end``); from then on the value is fixed. With False, fit whatever part
        of the window is logged so far (the value changes as the window fills).
    clock : np.ndarray, optional
        The fit's time axis, one value per step (e.g. :func:`lr_time`); finite, >= 0,
        non-decreasing. Default ``t = step + 1``. The window is still chosen in steps; samples
        at clock 0 are left out.

    Returns
    -------
    PowerLawFit or None
        None when incomplete (see above) or when the window fills fewer than 3 bins.

    Raises
    ------
    ValueError
        On invalid input.
    """
    s_arr, l_arr = _check_steps(steps, loss)
    spe = _check_int(steps_per_epoch, "steps_per_epoch", 1)
    start, end = epoch_window
    if not 0.0 <= start < end:
        raise ValueError(f"epoch_window must satisfy 0 <= start < end, got {epoch_window!r}")
    first, stop = math.ceil(start * spe), math.ceil(end * spe)
    if require_complete and (s_arr[0] > first or s_arr[-1] < stop - 1):
        return None
    sel = (s_arr >= first) & (s_arr < stop)
    c_arr = _check_clock(clock, s_arr)
    return _fit_or_none(s_arr[sel], l_arr[sel], n_bins, None if c_arr is None else c_arr[sel])


def alpha_full(
    steps: np.ndarray,
    loss: np.ndarray,
    *,
    burn_in: int | None,
    n_bins: int = DEFAULT_N_BINS,
    clock: np.ndarray | None = None,
) -> PowerLawFit | None:
    """Power-law fit (``t = step + 1``, or ``clock``) from step ``burn_in`` to the last step.

    Parameters
    ----------
    steps, loss : np.ndarray
        As in :func:`burn_in_step`.
    burn_in : int or None
        From :func:`burn_in_step`.
    n_bins : int, default DEFAULT_N_BINS
        Log-uniform bins (>= 3).
    clock : np.ndarray, optional
        As in :func:`alpha_early`.

    Returns
    -------
    PowerLawFit or None
        None when ``burn_in`` is None (the run has no burn-in, hence no ``alpha_full``) or the
        steps from it fill fewer than 3 bins.

    Raises
    ------
    ValueError
        On invalid input.
    """
    s_arr, l_arr = _check_steps(steps, loss)
    if burn_in is None:
        return None
    sel = s_arr >= burn_in
    c_arr = _check_clock(clock, s_arr)
    return _fit_or_none(s_arr[sel], l_arr[sel], n_bins, None if c_arr is None else c_arr[sel])
