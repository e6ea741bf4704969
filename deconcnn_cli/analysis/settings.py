"""The analysis settings a run's curve-shape fits used, as one plain record. No torch, no I/O.

``summary.json`` records them (``analysis_settings``); the export states them per sweep,
generates its column descriptions from them and refuses to pool runs whose settings differ
into one H1/H2 number. :func:`settings_id` names a set of settings in a table cell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from deconcnn_cli.analysis.knee import KNEE_BIN_WIDTH_LOG_T, KNEE_MIN_BIC_GAIN, KNEE_MIN_POINTS
from deconcnn_cli.analysis.powerlaw import DEFAULT_N_BINS, MIN_BINS

SETTINGS_VERSION = 1  # bumped when a key is added or a definition changes


def smooth_window_steps(steps_per_epoch: int) -> int:
    """Centred smoother / burn-in window: about a quarter epoch, odd, at least 3 steps."""
    w = max(3, int(steps_per_epoch) // 4)
    return w if w % 2 else w + 1


def analysis_settings(
    alpha_early_epochs: tuple[float, float] | list[float],
    burn_in_ce_nats: float,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """Every setting behind ``burn_in_step``, ``alpha_*``, ``power_law_r2*`` and the knee.

    Parameters
    ----------
    alpha_early_epochs : (float, float)
        ``[start, end)`` of the early fit, in epochs (``analysis.alpha_early_epochs``).
    burn_in_ce_nats : float
        Burn-in threshold on the smoothed train CE (``analysis.burn_in_ce_nats``).
    steps_per_epoch : int
        Optimizer steps per epoch of the run: sets the smoothing window (a quarter epoch),
        which is recorded in steps; the epochs themselves are the data's, not a setting.

    Returns
    -------
    dict
        JSON-ready: plain numbers, lists and strings, the same keys for every run.
    """
    start, end = (float(v) for v in alpha_early_epochs)
    return {
        "settings_version": SETTINGS_VERSION,
        "time_axes": ["step", "lr"],
        "step_time": "t = step + 1",
        "lr_time": "tau_t = sum of the scheduled lr of steps 0..t",
        "alpha_early_epochs": [start, end],
        "alpha_full_window": "burn_in_step to the last finite step",
        "burn_in_ce_nats": float(burn_in_ce_nats),
        "burn_in_smoothing": "centred moving average",
        "burn_in_smooth_window_steps": smooth_window_steps(steps_per_epoch),
        "fit_bins": DEFAULT_N_BINS,
        "fit_min_bins": MIN_BINS,
        "fit_binning": "log-uniform bins of t; mean loss per bin, then ln",
        "knee_bin_width_log_t": KNEE_BIN_WIDTH_LOG_T,
        "knee_min_points": KNEE_MIN_POINTS,
        "knee_min_bic_gain": KNEE_MIN_BIC_GAIN,
    }


def settings_id(settings: Mapping[str, Any]) -> str:
    """A short stable name for a set of settings: 8 hex digits of its canonical JSON's sha256."""
    canonical = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]
