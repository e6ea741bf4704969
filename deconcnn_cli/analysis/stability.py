"""Edge of stability: the top Hessian eigenvalue against SGD's stability threshold. Pure.

On a quadratic with curvature ``h``, PyTorch's SGD (``v <- beta v + g``, dampening 0) is stable
only while ``lr h < 2 (1 + beta)`` (heavy ball), or ``lr h < 2 (1 + beta) / (1 + 2 beta)`` with
``nesterov=True`` (the step is ``g + beta v``). Both are where one eigenvalue of the two-step
recurrence on ``(x, lr v)`` reaches -1. The normalised sharpness divides ``lr h`` by that
threshold: 1 is the edge of stability (Cohen et al. 2021). Coupled weight decay adds ``wd``
to every eigenvalue of the objective SGD descends. Derivation and caveats:
``docs/metrics-curvature-noise.md``.
"""

from __future__ import annotations

import math


def sgd_stability_threshold(momentum: float, nesterov: bool = False) -> float:
    """Largest ``lr * h`` at which PyTorch's SGD is stable on a quadratic of curvature ``h``.

    Parameters
    ----------
    momentum : float
        ``beta`` in [0, 1).
    nesterov : bool, default False
        PyTorch's Nesterov form (update ``g + beta v``).

    Returns
    -------
    float
        ``2 (1 + beta)``, or ``2 (1 + beta) / (1 + 2 beta)`` with Nesterov.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    edge = 2 * (1 + momentum)
    return edge / (1 + 2 * momentum) if nesterov else edge


def normalised_sharpness(
    lambda_max: float,
    lr: float,
    *,
    momentum: float,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> float:
    """``(lambda_max + weight_decay) * lr / threshold``: 1 at the edge of stability.

    Parameters
    ----------
    lambda_max : float
        Top eigenvalue of the loss Hessian (cross-entropy alone); NaN stays NaN.
    lr : float
        The learning rate of the step (the scheduled one, not the peak).
    momentum, nesterov
        As :func:`sgd_stability_threshold`.
    weight_decay : float, default 0
        SGD's coupled weight decay: ``wd * ||w||^2 / 2`` adds ``wd`` to every eigenvalue.
    """
    if lr < 0 or weight_decay < 0:
        raise ValueError(f"lr and weight_decay must be >= 0, got {lr!r}, {weight_decay!r}")
    if not math.isfinite(lambda_max):
        return math.nan
    return (lambda_max + weight_decay) * lr / sgd_stability_threshold(momentum, nesterov)
