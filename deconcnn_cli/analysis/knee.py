"""Knee of a loss curve: a continuous two-segment log-log line against one line, by BIC.

Pure functions on numpy arrays (no I/O); ``t = step + 1`` as in :mod:`.powerlaw`. The knee is
searched on its own binning, not on the 20 bins of the power-law fits: bins of a fixed width
in ``ln t`` (``bin_width_log_t``, 2% of ``t``), so its resolution is the same anywhere in the
window and a breakpoint can be found up to a few percent of ``t`` from either end. The late
bins of a real run still average hundreds of steps each. A best breakpoint on the edge of the
searchable range is *censored*: reported as such, never as the knee.

Definitions, measured false-knee rates and recovery: ``docs/metrics-curve-shape.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from deconcnn_cli.analysis.powerlaw import MIN_BINS, _binned_logs, _check_curve, _check_int, _ic

KNEE_BIN_WIDTH_LOG_T = 0.01  # knee resolution: bins 1% wide in t, anywhere in the window
KNEE_MIN_POINTS = 4  # fewest binned points on each side of a breakpoint
KNEE_MIN_BIC_GAIN = 10.0  # "very strong" (Kass & Raftery); the search inflates the bare gain


@dataclass(frozen=True)
class KneeFit:
    """One vs two log-log segments.

    ``breakpoint_t`` is the knee (in units of ``t``) when two segments win by more than the
    BIC margin *and* the best breakpoint lies inside the searchable range; None otherwise.
    ``censored`` is True when two segments win but the best breakpoint is the first or the
    last candidate (``search_lo_t`` / ``search_hi_t``): the data say the curve bends, not
    where. ``candidate_t`` and the exponents describe the best two-segment fit whether or not
    it wins; ``bic_one``/``bic_two`` are the (count-weighted) criteria, lower is better.
    """

    breakpoint_t: float | None
    candidate_t: float
    censored: bool
    search_lo_t: float
    search_hi_t: float
    exponent_before: float
    exponent_after: float
    bic_one: float
    bic_two: float
    n_points: int


def knee_n_bins(t: np.ndarray, bin_width_log_t: float = KNEE_BIN_WIDTH_LOG_T) -> int:
    """Number of log-uniform bins of width about ``bin_width_log_t`` between min and max ``t``.

    Parameters
    ----------
    t : np.ndarray
        1-D positive finite times.
    bin_width_log_t : float, default KNEE_BIN_WIDTH_LOG_T
        Target width of one bin in ``ln t`` (> 0).

    Returns
    -------
    int
        ``max(1, ceil(ln(max t / min t) / bin_width_log_t))``.

    Raises
    ------
    ValueError
        If ``t`` is empty, non-finite or not positive, or the width is not positive.
    """
    t_arr = np.asarray(t, dtype=np.float64)
    if t_arr.size == 0 or not np.all(np.isfinite(t_arr)) or np.any(t_arr <= 0):
        raise ValueError("t must be non-empty, finite and > 0")
    if not (math.isfinite(bin_width_log_t) and bin_width_log_t > 0):
        raise ValueError(f"bin_width_log_t must be > 0, got {bin_width_log_t!r}")
    span = math.log(float(t_arr.max()) / float(t_arr.min()))
    return max(1, math.ceil(span / bin_width_log_t - 1e-9))


def hinge_wrss(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, xb: float | None
) -> tuple[float, np.ndarray]:
    """Weighted RSS and coefficients of ``y = b0 + b1 x [+ b2 max(0, x - xb)]``.

    Parameters
    ----------
    x, y, w : np.ndarray
        Regressor, response and weights (1-D, equal length, ``w > 0``).
    xb : float or None
        The hinge; None fits one line.

    Returns
    -------
    wrss, coef : float, np.ndarray
        ``sum(w * residual**2)`` and ``[b0, b1]`` or ``[b0, b1, b2]``.
    """
    cols = [np.ones_like(x), x] + ([np.maximum(0.0, x - xb)] if xb is not None else [])
    design, sw = np.column_stack(cols), np.sqrt(w)
    coef, *_ = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)
    return float(np.sum(w * (y - design @ coef) ** 2)), coef


def find_knee(
    t: np.ndarray,
    loss: np.ndarray,
    *,
    bin_width_log_t: float = KNEE_BIN_WIDTH_LOG_T,
    min_points_per_segment: int = KNEE_MIN_POINTS,
    min_bic_gain: float = KNEE_MIN_BIC_GAIN,
) -> KneeFit:
    """Continuous two-segment line vs one line through (ln t, ln mean L), chosen by BIC.

    The loss is averaged in log-uniform bins about ``bin_width_log_t`` wide in ``ln t``
    (:func:`knee_n_bins`; empty bins dropped), and each bin is weighted by the number of steps
    it averages (its mean's variance is ~1/count for per-step noise). The breakpoint is
    searched over the bin centres that leave ``min_points_per_segment`` points on each side,
    then refined continuously between the neighbouring centres. BIC counts 3 parameters for
    one line and 5 for two (two slopes, intercept, breakpoint, variance); two segments win
    when ``bic_one - bic_two > min_bic_gain``. If they win at the first or last candidate the
    result is censored (``breakpoint_t`` None, ``censored`` True): a bend at or beyond the
    searchable range cannot be placed. Nothing is rescaled to the unit square (as kneedle
    does), so a pure power law has no knee whatever the range of ``t``.

    Parameters
    ----------
    t, loss : np.ndarray
        1-D, equal length: positive times (``step + 1``) and finite losses (>= 0).
    bin_width_log_t : float, default KNEE_BIN_WIDTH_LOG_T
        Resolution of the search, in ``ln t`` (> 0).
    min_points_per_segment : int, default KNEE_MIN_POINTS
        Fewest binned points on each side of the breakpoint (>= 2).
    min_bic_gain : float, default KNEE_MIN_BIC_GAIN
        BIC improvement two segments need to win (>= 0).

    Returns
    -------
    KneeFit
        ``breakpoint_t`` in units of ``t``; epoch = ``(t_b - 1) / steps_per_epoch``.

    Raises
    ------
    ValueError
        On invalid input or fewer than ``2 * min_points_per_segment`` non-empty bins.
    """
    m = _check_int(min_points_per_segment, "min_points_per_segment", 2)
    if not min_bic_gain >= 0:
        raise ValueError(f"min_bic_gain must be >= 0, got {min_bic_gain!r}")
    t_arr, l_arr = _check_curve(t, loss)
    n_bins = max(knee_n_bins(t_arr, bin_width_log_t), 2 * m)
    x, y, counts, _ = _binned_logs(t_arr, l_arr, n_bins, max(MIN_BINS, 2 * m))
    n, w = x.size, counts / counts.mean()
    bic_one = _ic(hinge_wrss(x, y, w, None)[0], n, n_params=2)[1]
    # Candidate x[j] leaves points 0..j (j + 1 >= m) left and j..n-1 (n - j >= m) right.
    first, last = m - 1, n - m
    wrss = [hinge_wrss(x, y, w, x[i])[0] for i in range(first, last + 1)]
    j = first + int(np.argmin(wrss))
    xb = float(x[j])
    lo, hi = x[max(j - 1, first)], x[min(j + 1, last)]
    if hi > lo:
        res = minimize_scalar(
            lambda v: hinge_wrss(x, y, w, v)[0], bounds=(lo, hi), method="bounded"
        )
        if res.fun < hinge_wrss(x, y, w, xb)[0]:
            xb = float(res.x)
    rss_two, coef = hinge_wrss(x, y, w, xb)
    bic_two = _ic(rss_two, n, n_params=4)[1]
    wins = bic_one - bic_two > min_bic_gain
    on_edge = j in (first, last)
    t_b = math.exp(xb)
    return KneeFit(
        breakpoint_t=t_b if wins and not on_edge else None,
        candidate_t=t_b,
        censored=bool(wins and on_edge),
        search_lo_t=math.exp(float(x[first])),
        search_hi_t=math.exp(float(x[last])),
        exponent_before=float(-coef[1]),
        exponent_after=float(-(coef[1] + coef[2])),
        bic_one=bic_one,
        bic_two=bic_two,
        n_points=int(n),
    )
