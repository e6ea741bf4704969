"""One training run of the measurement protocol, top to bottom.

Plain PyTorch. Per-step values are accumulated on the device and flushed to the run directory
in blocks (no host sync per step); cadenced work (validation, curvature, noise, loss-curve
shape, checkpoints) is written inline where it happens. The batch at step ``t`` is a pure
function of ``(seed, t)``, so a resumed run replays exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deconcnn_cli.config import RunConfig
from deconcnn_cli.training import measure
from deconcnn_cli.training.checkpoint import (
    load_latest_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from deconcnn_cli.training.data import (
    DataSplits,
    load_splits,
    steps_per_epoch,
    train_batch,
    val_batches,
)
from deconcnn_cli.training.metrics import RunWriter
from deconcnn_cli.training.models import build_model
from deconcnn_cli.training.rundir import Precision, resolve_device, resolve_precision

LN2 = math.log(2.0)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


@dataclass(frozen=True)
class Progress:
    step: int  # steps completed
    total_steps: int
    epoch: float
    loss_train_nats: float
    steps_per_s: float
    phase: str = ""  # non-empty: what runs now instead of steps ("curvature at step 0 ...")


@dataclass(frozen=True)
class RunResult:
    state: str  # completed | diverged | interrupted
    steps_done: int
    reason: str | None = None
    signal_number: int | None = None


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (from 0): linear warmup from 0 over
    ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))


def val_steps_in_epoch(spe: int, per_epoch: int) -> set[int]:
    """Positions (0-based, within an epoch) after which validation runs; the last is spe-1."""
    return {math.ceil(q * spe / per_epoch) - 1 for q in range(1, per_epoch + 1)}


def build_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, splits: DataSplits, batch_size: int, prec: Precision
) -> tuple[float, float]:
    """Mean CE (nats) and accuracy over the full validation split, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=splits.val_x.device, dtype=torch.float64)
    correct = torch.zeros((), device=splits.val_x.device, dtype=torch.int64)
    for x, y in val_batches(splits, batch_size):
        with prec.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    n = splits.n_val
    return (loss_sum / n).item(), (correct.double() / n).item()


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def train_run(
    cfg: RunConfig,
    run_dir: Path,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    stop_after_steps: int | None = None,
) -> RunResult:
    """Train (or resume) the run in ``run_dir``; the directory must already hold its config."""
    device = resolve_device(cfg.device)
    prec = resolve_precision(cfg.precision, device)
    writer = RunWriter(run_dir)
    splits = load_splits(
        cfg.data.dataset,
        cfg.data.data_dir,
        val_fraction=cfg.data.val_fraction,
        split_seed=cfg.data.split_seed,
        image_size=cfg.data.image_size,
        download=cfg.data.download,
        device=device,
    )
    spe = steps_per_epoch(splits.n_train, cfg.data.batch_size)
    total_steps = cfg.schedule.epochs * spe
    warmup_steps = round(cfg.schedule.warmup_epochs * spe)
    val_positions = val_steps_in_epoch(spe, cfg.cadence.val_per_epoch)
    cad = cfg.cadence

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup_steps, total_steps=total_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=prec.use_scaler)
    probe = measure.probe_batch(splits, cfg)
    analysis_state: dict[str, Any] = {"eigenvector": None}

    # ---- resume from the newest valid checkpoint, if any
    start_step = 0
    state, skipped = load_latest_checkpoint(run_dir, map_location=device)
    for note in skipped:
        writer.log_event("warning", f"skipped checkpoint {note}")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        analysis_state = state["analysis"]
        restore_rng_states(state["rng"])
        start_step = state["next_step"]
    writer.truncate_before(start_step)  # rows past the checkpoint are replayed, never doubled
    losses = measure.read_step_losses(writer)
    attempt = writer.start_attempt(resumed_from_step=start_step)
    writer.write_status(
        state="running",
        step=start_step,
        epoch=start_step / spe,
        total_steps=total_steps,
        steps_per_epoch=spe,
        attempt=attempt,
        reason=None,
        precision=prec.name,
        device=str(device),
    )

    def checkpoint(next_step: int) -> None:
        save_checkpoint(
            run_dir,
            next_step,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "analysis": analysis_state,
                "config": cfg.model_dump(mode="json"),
            },
        )
        writer.status["last_checkpoint_step"] = next_step

    stop_signal: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda n, _f: stop_signal.append(n)) for s in STOP_SIGNALS}

    buf_loss: list[torch.Tensor] = []  # 0-d device tensors: no copy kernel, no sync per step
    buf_correct: list[torch.Tensor] = []
    buf_rows: list[dict[str, Any]] = []  # host-known fields of the buffered steps
    t_block, steps_block = time.perf_counter(), 0
    last_grad_norm = torch.zeros((), device=device)

    def flush() -> int | None:
        """Write the buffered per-step rows; return the first non-finite step, if any."""
        nonlocal buf_rows, t_block, steps_block
        if not buf_rows:
            return None
        host = torch.stack([torch.stack(buf_loss), torch.stack(buf_correct).float()]).tolist()
        buf_loss.clear()  # the .tolist() above is the block's one host sync
        buf_correct.clear()
        bad = None
        for i, row in enumerate(buf_rows):
            nats = host[0][i]
            row.update(
                loss_train_nats=nats,
                loss_train_bits=nats / LN2,
                acc_train=host[1][i] / row.pop("_batch"),
            )
            if not math.isfinite(nats):
                bad = row["step"]
                buf_rows = buf_rows[: i + 1]
                break
        writer.streams["step"].append(buf_rows)
        losses.extend(r["loss_train_nats"] for r in buf_rows)
        elapsed = time.perf_counter() - t_block
        rate = steps_block / elapsed if elapsed > 0 else 0.0
        last = buf_rows[-1]
        writer.write_status(step=last["step"] + 1, epoch=(last["step"] + 1) / spe, steps_per_s=rate)
        if on_progress is not None:
            on_progress(
                Progress(
                    last["step"] + 1,
                    total_steps,
                    (last["step"] + 1) / spe,
                    last["loss_train_nats"],
                    rate,
                )
            )
        buf_rows, t_block, steps_block = [], time.perf_counter(), 0
        return bad

    def announce(phase: str, step: int) -> None:
        """Tell the caller what runs now (a cold Lanczos at step 0 can take minutes)."""
        if on_progress is not None:
            on_progress(Progress(step, total_steps, step / spe, math.nan, 0.0, phase=phase))

    result: RunResult | None = None
    model.train()
    try:
        for step in range(start_step, total_steps):
            epoch, position = divmod(step, spe)

            if cad.curvature_every_steps and step % cad.curvature_every_steps == 0:
                announce(f"curvature at step {step} ...", step)
                row, analysis_state = measure.curvature_row(model, probe, cfg, step, analysis_state)
                announce("training ...", step)
                writer.streams["curvature"].append([{**row, "epoch": step / spe}])
                for warning in row.pop("_warnings", []):
                    writer.log_event("warning", warning, step=step)

            x, y = train_batch(
                splits,
                step=step,
                steps_per_epoch=spe,
                batch_size=cfg.data.batch_size,
                seed=cfg.seed,
                augment=cfg.data.augmentation == "crop_flip",
                image_size=cfg.data.image_size,
            )
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            lr_now = optimizer.param_groups[0]["lr"]
            with prec.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if cfg.grad_clip_norm is not None:
                last_grad_norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.grad_clip_norm
                )
            elif position in val_positions:
                last_grad_norm = global_norm(
                    [p.grad for p in model.parameters() if p.grad is not None]
                )
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            buf_loss.append(loss.detach())
            buf_correct.append((logits.detach().argmax(1) == y).sum())
            buf_rows.append(
                {
                    "step": step,
                    "epoch": (step + 1) / spe,
                    "lr": lr_now,
                    "wd": cfg.optim.weight_decay,
                    "_batch": y.shape[0],
                }
            )
            steps_block += 1

            epoch_end = position == spe - 1
            must_flush = (
                len(buf_rows) == cad.flush_every_steps
                or position in val_positions
                or step == total_steps - 1
                or bool(stop_signal)
            )
            if must_flush and (bad := flush()) is not None:
                result = RunResult(
                    "diverged", bad + 1, reason=f"non-finite training loss at step {bad}"
                )
                break

            if position in val_positions:
                loss_val, acc_val = evaluate(model, splits, cfg.data.batch_size, prec)
                weight_norm = global_norm([p.detach() for p in model.parameters()])
                writer.streams["val"].append(
                    [
                        {
                            "step": step,
                            "epoch": (step + 1) / spe,
                            "loss_val_nats": loss_val,
                            "acc_val": acc_val,
                            "grad_norm": float(last_grad_norm),
                            "weight_norm": float(weight_norm),
                        }
                    ]
                )

            if epoch_end:
                done_epochs = epoch + 1
                if cad.noise_every_epochs and done_epochs % cad.noise_every_epochs == 0:
                    announce(f"gradient noise at epoch {done_epochs} ...", step + 1)
                    row = measure.guarded(
                        writer,
                        "noise",
                        step,
                        measure.noise_row,
                        model,
                        splits,
                        cfg,
                        step,
                        losses,
                        spe,
                    )
                    writer.streams["noise"].append([{**row, "epoch": done_epochs}])
                if cad.shape_every_epochs and done_epochs % cad.shape_every_epochs == 0:
                    row = measure.guarded(
                        writer, "shape", step, measure.shape_row, losses, cfg, spe
                    )
                    writer.streams["shape"].append([{**row, "step": step, "epoch": done_epochs}])
                if done_epochs % cad.checkpoint_every_epochs == 0 or step == total_steps - 1:
                    checkpoint(step + 1)

            if stop_signal or (stop_after_steps is not None and step + 1 >= stop_after_steps):
                if not epoch_end:
                    checkpoint(step + 1)
                sig = stop_signal[0] if stop_signal else None
                reason = f"signal {signal.Signals(sig).name}" if sig else "stop_after_steps"
                result = RunResult("interrupted", step + 1, reason=reason, signal_number=sig)
                break
        else:
            result = RunResult("completed", total_steps)
    except BaseException as exc:
        writer.write_status(state="failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    writer.write_status(
        state=result.state,
        reason=result.reason,
        step=result.steps_done,
        epoch=result.steps_done / spe,
    )
    if result.state in ("completed", "diverged"):
        measure.write_summary(writer, cfg, result.state, result.steps_done, spe, losses)
    return result
