"""Glue between the loop and the pure analysis core: inputs on the cadences, rows out.

Every random draw here (probe batch, Hutchinson probes, noise batches) comes from a generator
seeded by ``(seed, stream, step)``, so metrics are reproducible and a resume replays them.
A metric that fails is logged as NaN with a reason; it never stops training.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deconcnn_cli.analysis import hessian, noise, powerlaw, settings, spectral, stability
from deconcnn_cli.analysis.knee import find_knee
from deconcnn_cli.analysis.progress import EvaluationStopped, ProgressFn, report
from deconcnn_cli.config import RunConfig
from deconcnn_cli.contract import STREAMS, parse_cell, read_stream
from deconcnn_cli.fileio import atomic_write_json
from deconcnn_cli.training.data import (
    DataSplits,
    augment_batch,
    derive_seed,
    normalize,
    val_batches,
)
from deconcnn_cli.training.device import Precision, exact_fp32
from deconcnn_cli.training.schedule import lr_per_step
from deconcnn_cli.training.writer import RunWriter

NAN = float("nan")


def guarded(
    writer: RunWriter,
    stream: str,
    step: int,
    fn: Callable[..., dict[str, Any]],
    *args: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    """``fn(*args, **kwargs)`` with TF32 off, or a row of NaN plus a warning event if it raises.

    The one failure path of every metric (curvature, noise, shape): a failure is data, never a
    crash. A CUDA out-of-memory error (two runs sharing a card) frees the cached memory the
    failed evaluation left before training goes on; the event names the exception class. An
    evaluation abandoned on the caller's request (``EvaluationStopped``) is no failure: it
    passes through, and no row is made.
    """
    try:
        with exact_fp32():
            return fn(*args, **kwargs)
    except EvaluationStopped:
        raise
    except Exception as exc:
        name = type(exc).__name__
        oom = isinstance(exc, torch.cuda.OutOfMemoryError)
        message = "CUDA out of memory (cache freed)" if oom else str(exc)
    # Out of the except block: the exception, its traceback and the failed evaluation's
    # tensors in its frames are released only here, so only now can the cache be freed.
    if oom:
        free_cuda_cache()
    writer.log_event(
        "warning", f"{stream} metrics failed: {name}: {message}", step=step, exception_type=name
    )
    return {c: NAN for c in STREAMS[stream] if c not in ("step", "epoch")} | {"step": step}


def free_cuda_cache() -> None:
    """Collect what the failed evaluation left and return the cached blocks to the driver."""
    gc.collect()
    torch.cuda.empty_cache()


def probe_batch(splits: DataSplits, cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed curvature probe batch: ``n_probe`` training images, no augmentation."""
    n = min(cfg.analysis.n_probe, splits.n_train)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "probe", 0))
    rows = torch.randperm(splits.n_train, generator=gen)[:n].sort().values.to(splits.train_x.device)
    return normalize(splits.train_x[rows], splits.mean, splits.std), splits.train_y[rows]


def curvature_row(
    model: torch.nn.Module,
    probe: tuple[torch.Tensor, torch.Tensor],
    cfg: RunConfig,
    step: int,
    state: dict[str, Any],
    progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    x, y = probe
    # drawn on the CPU, then moved: the same probes on any card (a CUDA generator's stream can
    # depend on the card's multiprocessor count), so a requeue onto another GPU changes nothing
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "hutchinson", step))
    res = hessian.evaluate_curvature(
        model,
        x,
        y,
        chunk_size=cfg.data.batch_size,
        n_probes=cfg.analysis.hutchinson_probes,
        generator=gen,
        v0=state.get("eigenvector"),
        tol=cfg.analysis.lanczos_tol,
        max_hvp=cfg.analysis.lanczos_max_hvp,
        precision=cfg.analysis.hvp_precision,
        progress=progress,
    )
    row = {
        "step": step,
        "lambda_max": res.lambda_max,
        "hutch_trace": res.hutch_trace,
        "hutch_trace_sem": res.hutch_trace_sem,
        "hutch_trace_ci95": res.hutch_trace_ci95,
        "n_hvp": res.n_hvp,
        "_warnings": [f"curvature: {res.reason}"] if res.reason else [],
    }
    vector = res.eigenvector if res.eigenvector is not None else state.get("eigenvector")
    return row, {**state, "eigenvector": vector}


def sharpness_cell(cfg: RunConfig, lambda_max: float, lr: float) -> float | None:
    """``sharpness_norm`` of a curvature row: λmax (+ coupled wd) x the step's lr over SGD's
    stability threshold; None (not defined) for AdamW, whose threshold involves its
    preconditioner (docs/metrics-curvature-noise.md)."""
    o = cfg.optim
    if o.name != "sgd":
        return None
    return stability.normalised_sharpness(
        lambda_max, lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )


def noise_batches(
    splits: DataSplits, cfg: RunConfig, step: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``noise_k`` independent training-size batches, augmented as training batches are."""
    device = splits.train_x.device
    b = min(cfg.data.batch_size, splits.n_train)
    out = []
    for i in range(cfg.analysis.noise_k):
        seed = derive_seed(cfg.seed, f"noise{i}", step)
        gen = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on any card
        rows = torch.randperm(splits.n_train, generator=gen)[:b].to(device)
        x = splits.train_x[rows]
        if cfg.data.augmentation == "crop_flip":
            x = augment_batch(x, gen, out_size=cfg.data.image_size)
        out.append((normalize(x, splits.mean, splits.std), splits.train_y[rows]))
    return out


def noise_row(
    model: torch.nn.Module,
    splits: DataSplits,
    cfg: RunConfig,
    step: int,
    losses: list[float],
    spe: int,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    res = noise.gradient_noise(model, noise_batches(splits, cfg, step), progress=progress)
    window = _smooth_window(spe)
    # 2 epochs of residuals: the smoother trims window // 2 samples at each end
    tail = np.asarray(losses[-(2 * spe + 2 * (window // 2)) :], dtype=np.float64)
    if len(tail) > window + 1 and np.all(np.isfinite(tail)) and np.all(tail > 0):
        r = spectral.log_residuals(tail, window)
        rp, slope = spectral.residual_power(tail, window=window), spectral.psd_tail(r)
    else:
        rp, slope = NAN, NAN
    return {
        "step": step,
        "grad_noise_trace": res.grad_noise_trace,
        "gradient_variance": res.gradient_variance,
        "grad_norm_sq_unbiased": res.grad_norm_sq_unbiased,
        "grad_noise_scale": res.grad_noise_scale,
        "residual_power": rp,
        "psd_tail": slope,
    }


def _smooth_window(spe: int) -> int:
    """Centred smoother / burn-in window (:func:`settings.smooth_window_steps`)."""
    return settings.smooth_window_steps(spe)


def run_analysis_settings(cfg: RunConfig, spe: int) -> dict[str, Any]:
    """The settings :func:`shape_row` fits with, for ``summary.json`` (``analysis_settings``)."""
    a = cfg.analysis
    return settings.analysis_settings(a.alpha_early_epochs, a.burn_in_ce_nats, spe)


def _knee_cells(steps: np.ndarray, loss: np.ndarray, burn: int | None, spe: int) -> dict:
    """``knee_epoch`` and ``knee_censored`` over the alpha_full window (burn-in to the end)."""
    if burn is None:
        return {"knee_epoch": None, "knee_censored": None}
    keep = steps >= burn
    try:
        knee = find_knee(steps[keep] + 1.0, loss[keep])
    except ValueError:  # fewer bins than two segments need: not defined yet
        return {"knee_epoch": None, "knee_censored": None}
    epoch = None if knee.breakpoint_t is None else (knee.breakpoint_t - 1) / spe
    return {"knee_epoch": epoch, "knee_censored": int(knee.censored)}


def shape_row(losses: list[float], cfg: RunConfig, spe: int) -> dict[str, Any]:
    """Loss-curve shape so far: burn-in, alpha_early/alpha_full in step and lr time, knee.

    Cells are None ("not defined yet": no burn-in, window incomplete or too short) or a
    number; a computation that fails raises, and :func:`guarded` logs NaN with the reason.
    """
    steps = np.arange(len(losses))
    loss = np.asarray(losses, dtype=np.float64)
    tau = powerlaw.lr_time(lr_per_step(cfg, spe, len(losses)))
    window = _smooth_window(spe)
    a = cfg.analysis
    burn = powerlaw.burn_in_step(steps, loss, window_steps=window, threshold=a.burn_in_ce_nats)
    early, early_lr = (
        powerlaw.alpha_early(
            steps, loss, steps_per_epoch=spe, epoch_window=a.alpha_early_epochs, clock=clock
        )
        for clock in (None, tau)
    )
    full, full_lr = (powerlaw.alpha_full(steps, loss, burn_in=burn, clock=c) for c in (None, tau))
    offset = None
    if full is not None and full.n_points >= powerlaw.MIN_BINS_OFFSET:
        keep = steps >= burn
        offset = powerlaw.fit_power_law_offset(steps[keep] + 1.0, loss[keep])
    return {
        "burn_in_step": burn,
        "alpha_early": early.exponent if early else None,
        "alpha_early_r2": early.r2 if early else None,
        "alpha_full": full.exponent if full else None,
        "power_law_r2": full.r2 if full else None,
        "power_law_rmse": full.rmse if full else None,
        "offset_alpha": offset.exponent if offset else None,
        "offset_c": offset.offset if offset else None,
        "offset_r2": offset.r2 if offset else None,
        "alpha_early_lr": early_lr.exponent if early_lr else None,
        "alpha_full_lr": full_lr.exponent if full_lr else None,
        "power_law_r2_lr": full_lr.r2 if full_lr else None,
        **_knee_cells(steps, loss, burn, spe),
        "alpha_early_se": early.exponent_se if early else None,
        "alpha_full_se": full.exponent_se if full else None,
        "alpha_early_lr_se": early_lr.exponent_se if early_lr else None,
        "alpha_full_lr_se": full_lr.exponent_se if full_lr else None,
    }


def read_step_losses(writer: RunWriter) -> list[float]:
    """Per-step train losses already on disk (after a resume's truncation)."""
    return [float(r["loss_train_nats"]) for r in read_stream(writer.streams["step"].path)]


def _finite_prefix(losses: list[float]) -> list[float]:
    """The losses before the first non-finite one (a diverged run's last row is not)."""
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            return losses[:i]
    return losses


# the shape stream's fits, without its position and the offset-form fit: one list (contract.py)
SUMMARY_SHAPE_KEYS = tuple(
    c for c in STREAMS["shape"] if c not in ("step", "epoch") and not c.startswith("offset_")
)


def write_summary(
    writer: RunWriter, cfg: RunConfig, state: str, steps_done: int, spe: int, losses: list[float]
) -> dict[str, Any]:
    """``summary.json``: the run's final numbers, from its streams and its per-step losses.

    The shape metrics are those of the whole (finite) curve. ``None`` (JSON null) means "not
    defined" (no burn-in, window never complete, no validation), NaN "could not be computed"
    (its reason is in events.jsonl); docs/metrics.md lists the keys.
    """
    val = read_stream(writer.streams["val"].path)
    step_rows = read_stream(writer.streams["step"].path)
    best_ce, best_epoch = (NAN, NAN) if val else (None, None)
    finite = [(parse_cell(r["loss_val_nats"]), float(r["epoch"])) for r in val]
    finite = [(c, e) for c, e in finite if c is not None and math.isfinite(c)]
    if finite:
        best_ce, best_epoch = min(finite)
    curve = _finite_prefix(losses)
    shape = guarded(writer, "shape", steps_done - 1, shape_row, curve, cfg, spe)
    burn = shape.get("burn_in_step")
    burn_in_loss = burn  # None (no burn-in) or NaN (shape failed) carry over
    if isinstance(burn, int):  # the smoothed CE that crossed the threshold
        smooth = spectral.centred_smooth(np.asarray(curve, dtype=np.float64), _smooth_window(spe))
        burn_in_loss = float(smooth[burn])
    summary = {
        "state": state,
        "steps_done": steps_done,
        "epochs_done": steps_done / spe,
        "final_loss_train_nats": losses[-1] if losses else None,
        "final_acc_train": parse_cell(step_rows[-1]["acc_train"]) if step_rows else None,
        "final_loss_val_nats": parse_cell(val[-1]["loss_val_nats"]) if val else None,
        "final_acc_val": parse_cell(val[-1]["acc_val"]) if val else None,
        "best_val_ce": best_ce,
        "best_val_epoch": best_epoch,
        **{k: shape.get(k) for k in SUMMARY_SHAPE_KEYS},
        "burn_in_loss": burn_in_loss,
        "precision": writer.status.get("precision"),
        "attempts": writer.status.get("attempt"),
        "analysis_settings": run_analysis_settings(cfg, spe),
    }
    if isinstance(summary["knee_censored"], int):  # 0/1 in shape.csv, a bool in JSON
        summary["knee_censored"] = bool(summary["knee_censored"])
    summary = {k: NAN if isinstance(v, float) and math.isinf(v) else v for k, v in summary.items()}
    atomic_write_json(writer.run_dir / "summary.json", summary)
    return summary


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    splits: DataSplits,
    batch_size: int,
    prec: Precision,
    progress: ProgressFn | None = None,
) -> tuple[float, float]:
    """Mean CE (nats) and accuracy over the full validation split, in eval mode.

    ``progress`` is told ``("batches", done, n)`` before each batch; a True answer raises
    ``EvaluationStopped`` (the model's mode restored)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=splits.val_x.device, dtype=torch.float64)
    correct = torch.zeros((), device=splits.val_x.device, dtype=torch.int64)
    n_batches = math.ceil(splits.n_val / batch_size)
    try:
        for i, (x, y) in enumerate(val_batches(splits, batch_size)):
            report(progress, "batches", i, n_batches)
            with prec.autocast():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
    finally:
        model.train(was_training)
    n = splits.n_val
    return (loss_sum / n).item(), (correct.double() / n).item()


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
