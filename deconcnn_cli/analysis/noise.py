"""Gradient noise from k independent mini-batch gradients (METRICS.md, "Gradient noise").

With ``g_1 .. g_k`` the mean cross-entropy gradients (no weight-decay term) of k mini-batches
of the training batch size ``B``, and ``g_bar`` their mean:

- ``grad_noise_trace = sum_i |g_i - g_bar|^2 / (k - 1)``, unbiased for ``tr(Sigma) / B``;
- ``gradient_variance = grad_noise_trace / P`` (P trainable parameters);
- ``grad_norm_sq_unbiased = (k |g_bar|^2 - mean_i |g_i|^2) / (k - 1)``, unbiased for ``|G|^2``;
  algebraically equal to ``|g_bar|^2 - grad_noise_trace / k``, the form computed here;
- ``grad_noise_scale = B * grad_noise_trace / grad_norm_sq_unbiased`` (McCandlish et al. 2018,
  ``B_simple``), NaN when the denominator is <= 0.

Pure functions: no I/O, no printing; ``.grad``, buffers and modes are left as found.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sized
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deconcnn_cli.analysis.hessian import _to_device, preserved_model_state
from deconcnn_cli.analysis.progress import ProgressFn, checked_graph, report


@dataclass(frozen=True)
class NoiseResult:
    """Gradient-noise statistics of one evaluation; NaN values come with a ``reason``."""

    grad_noise_trace: float
    gradient_variance: float
    grad_norm_sq_unbiased: float
    grad_noise_scale: float
    k: int
    batch_size: int
    n_params: int
    reason: str = ""  # "" on success


def noise_statistics(grads: torch.Tensor, batch_size: int) -> NoiseResult:
    """Noise statistics from a stack of k flattened mini-batch gradients.

    Parameters
    ----------
    grads : torch.Tensor
        Shape ``(k, P)``, k >= 2; row i is the gradient of mini-batch i. Computed in float64.
    batch_size : int
        The mini-batch size ``B`` every row was computed with.

    Returns
    -------
    NoiseResult
        NaN values with a reason if ``grads`` holds non-finite entries.
    """
    if grads.ndim != 2:
        raise ValueError(f"grads must have shape (k, P), got {tuple(grads.shape)}")
    k, n_params = grads.shape
    _check_sizes(k, batch_size, n_params)
    g = grads.detach().to(torch.float64)
    if not bool(torch.isfinite(g).all()):
        return _failed(k, batch_size, n_params, "non-finite gradient")
    mean = g.mean(dim=0)
    sum_sq_dev = float(((g - mean) ** 2).sum())
    return _from_moments(float(mean @ mean), sum_sq_dev, k, batch_size, n_params)


def gradient_noise(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    progress: ProgressFn | None = None,
) -> NoiseResult:
    """Gradient-noise statistics of ``model`` at its current parameters.

    Each batch's mean cross-entropy gradient is taken with the model in train mode (BN uses
    batch statistics) via ``torch.autograd.grad``, so ``.grad`` is untouched; buffers and
    per-module modes are restored afterwards. fp32 forward without autocast; gradients are
    accumulated in float64 with Welford's update (memory: two float64 vectors of size P).

    Parameters
    ----------
    model : nn.Module
        Eager model; batches are moved to its parameters' device (floating inputs also
        to their dtype).
    batches : iterable of (inputs, targets)
        k >= 2 independent mini-batches, all of the training batch size ``B``.
    progress : callable, optional
        Told ``("batches", done, k)`` before each batch (``k`` 0 when ``batches`` has no
        length) and asked often inside each forward and backward pass (:mod:`.progress`); a
        True answer raises :class:`~deconcnn_cli.analysis.progress.EvaluationStopped`.

    Returns
    -------
    NoiseResult
        NaN values with a reason on a non-finite loss or gradient; never raises for that.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device = params[0].device
    n_params = sum(p.numel() for p in params)
    mean = torch.zeros(n_params, dtype=torch.float64, device=device)
    sum_sq_dev = torch.zeros((), dtype=torch.float64, device=device)
    k, batch_size = 0, 0
    n_batches = len(batches) if isinstance(batches, Sized) else 0
    autocast_off = torch.autocast(device.type, enabled=False)
    with preserved_model_state(model, train=True), autocast_off:
        for inputs, targets in batches:
            if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
                raise ValueError(
                    f"inputs and targets need the same non-zero length, got "
                    f"{inputs.shape[0]} and {targets.shape[0]}"
                )
            if k > 0 and inputs.shape[0] != batch_size:
                raise ValueError(f"all batches must have size {batch_size}, got {inputs.shape[0]}")
            batch_size = inputs.shape[0]
            report(progress, "batches", k, n_batches)
            k += 1
            x, y = _to_device(inputs, device, params[0].dtype), targets.to(device)
            with checked_graph(model, progress):
                g = _flat_gradient(model, params, x, y)
            if not bool(torch.isfinite(g).all()):
                return _failed(k, batch_size, n_params, f"non-finite loss or gradient in batch {k}")
            delta = g - mean
            mean += delta / k
            sum_sq_dev += delta @ (g - mean)
    _check_sizes(k, batch_size, n_params)
    return _from_moments(float(mean @ mean), float(sum_sq_dev), k, batch_size, n_params)


def _flat_gradient(
    model: nn.Module, params: list[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    with torch.enable_grad(), torch.autocast(inputs.device.type, enabled=False):
        loss = F.cross_entropy(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def _from_moments(
    mean_norm_sq: float, sum_sq_dev: float, k: int, batch_size: int, n_params: int
) -> NoiseResult:
    trace = sum_sq_dev / (k - 1)
    norm_sq = mean_norm_sq - trace / k  # == (k |g_bar|^2 - mean_i |g_i|^2) / (k - 1)
    scale = batch_size * trace / norm_sq if norm_sq > 0 else math.nan
    reason = "" if norm_sq > 0 else "grad_norm_sq_unbiased <= 0: noise dominates the mean"
    return NoiseResult(
        grad_noise_trace=trace,
        gradient_variance=trace / n_params,
        grad_norm_sq_unbiased=norm_sq,
        grad_noise_scale=scale,
        k=k,
        batch_size=batch_size,
        n_params=n_params,
        reason=reason,
    )


def _failed(k: int, batch_size: int, n_params: int, reason: str) -> NoiseResult:
    nan = math.nan
    return NoiseResult(nan, nan, nan, nan, k, batch_size, n_params, reason)


def _check_sizes(k: int, batch_size: int, n_params: int) -> None:
    if k < 2:
        raise ValueError(f"need k >= 2 mini-batch gradients, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_params < 1:
        raise ValueError(f"need at least one parameter, got {n_params}")
