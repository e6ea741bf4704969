"""Setting up an attempt: the optimizer and its lr schedule as the config says, the choices an
earlier attempt made that a resume keeps (precision, fused optimizer), and the GPU memory
share of a run that shares its card."""

from __future__ import annotations

from typing import Any

import torch

from deconcnn_cli.config import RunConfig
from deconcnn_cli.runenv import gpu_share
from deconcnn_cli.training.device import cap_gpu_memory
from deconcnn_cli.training.optim import zero_momentum_buffers
from deconcnn_cli.training.schedule import lr_factor, warmup_steps
from deconcnn_cli.training.writer import RunWriter


def build_optimizer(
    cfg: RunConfig, model: torch.nn.Module, *, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD or AdamW as the config says. ``fused``: the single-kernel CUDA implementation,
    which also takes GradScaler's inf flag on the device (no host sync per fp16 step). SGD's
    momentum buffers start as zeros, so a skipped first fp16 step leaves it finite
    (``training.optim``); a resumed run loads its checkpoint's state over them."""
    o = cfg.optim
    kind = {"fused": True} if fused else {}
    if o.name == "sgd":
        return zero_momentum_buffers(
            torch.optim.SGD(
                model.parameters(),
                lr=o.lr,
                momentum=o.momentum,
                nesterov=o.nesterov,
                weight_decay=o.weight_decay,
                **kind,
            )
        )
    return torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, **kind
    )


def stored_precision(checkpoint: dict[str, Any] | None, writer: RunWriter) -> str | None:
    """The precision an earlier attempt chose: the resumed checkpoint's (its weights, scaler
    and RNG state are of that precision), else status.json's; None at a first start. When
    status.json lost it or disagrees, a warning event says so."""
    recorded = writer.status.get("precision")
    saved = (checkpoint or {}).get("precision")
    if saved is not None and saved != recorded:
        why = f"status.json said {recorded}" if recorded else "status.json did not carry it"
        writer.log_event(
            "warning", f"resuming in {saved}, the checkpoint's precision ({why})", precision=saved
        )
    return saved or recorded


def use_fused(device: torch.device, checkpoint: dict[str, Any] | None) -> bool:
    """Whether the optimizer is torch's fused one: on CUDA, chosen at the first start and kept
    for every attempt (the resumed checkpoint's choice: its optimizer state is of that kind)."""
    stored = (checkpoint or {}).get("optimizer_fused")
    fresh = device.type == "cuda"
    return fresh and (stored if isinstance(stored, bool) else fresh)


def lr_scheduler(
    cfg: RunConfig, optimizer: torch.optim.Optimizer, spe: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The protocol's schedule (``schedule.lr_factor``) on ``optimizer``, in optimizer steps."""
    warmup, total = warmup_steps(cfg, spe), cfg.schedule.epochs * spe
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total)
    )


def share_gpu_memory(writer: RunWriter, device: torch.device) -> None:
    """Cap the CUDA allocator at this run's share of a card that ``$DECON_GPU_SHARE`` runs
    share, and say so in events.jsonl (nothing on the CPU or when the card is its own)."""
    share = gpu_share()
    fraction = cap_gpu_memory(device, share)
    if fraction is not None:
        writer.log_event(
            "info",
            f"{share} runs share this GPU: CUDA memory capped at {fraction:.1%} of it",
            gpu_memory_fraction=fraction,
        )
