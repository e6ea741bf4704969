"""fp16 bookkeeping: which steps GradScaler skipped, and when skipping is a divergence.

GradScaler skips a step whose gradients overflowed and halves its scale. The flag it skips
on stays on the device until the block's one host sync; :class:`SkipCounter` then counts the
skips, and :data:`MAX_SKIPPED_IN_A_ROW` skips in a row (the scale has fallen by 2^-50: no
overflow left to fix) end the run as diverged (docs/run-directory.md, "Skipped fp16 steps").
The two reads of GradScaler's state use its private API; they live here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deconcnn_cli.tbevents import FP16_TAGS
from deconcnn_cli.training.writer import RunWriter

MAX_SKIPPED_IN_A_ROW = 50


def overflow_flag(
    scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device
) -> torch.Tensor:
    """1 where this step's unscaled gradients held an inf/NaN (GradScaler will skip the step),
    as a 0-d device tensor: read after ``scaler.unscale_(optimizer)``, with no host sync."""
    found = scaler._found_inf_per_device(optimizer).values()
    return torch.stack([f.to(device) for f in found]).amax()


def loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The current loss scale as a device tensor (no host sync)."""
    return scaler._get_scale_async()


@dataclass
class SkipCounter:
    """Skipped fp16 steps: in a row and in total (kept in every checkpoint)."""

    in_a_row: int = 0
    total: int = 0

    @classmethod
    def restored(cls, counters: dict[str, Any] | None) -> SkipCounter:
        counters = counters or {}
        return cls(int(counters.get("in_a_row", 0)), int(counters.get("total", 0)))

    def state(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def count(self, step: int, flag: float) -> str | None:
        """Count step ``step`` (``flag`` > 0: skipped); the divergence reason when this skip
        makes :data:`MAX_SKIPPED_IN_A_ROW` in a row, else None."""
        if flag > 0:
            self.in_a_row += 1
            self.total += 1
        else:
            self.in_a_row = 0
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            return (
                f"{self.in_a_row} fp16 steps in a row skipped (inf/NaN gradients) up to "
                f"step {step}: the loss scale cannot recover"
            )
        return None

    def record(
        self, writer: RunWriter, rows: list[dict[str, Any]], flags: list[float], scale: float
    ) -> None:
        """A block's skipped steps: an event naming them, and the totals with the loss scale
        in status.json (written at every flush of an fp16 run)."""
        skipped = [r["step"] for r, f in zip(rows, flags, strict=False) if f > 0]
        if skipped:
            writer.log_event(
                "warning",
                f"fp16: {len(skipped)} step(s) skipped (inf/NaN gradients), loss scale now "
                f"{scale:g}",
                steps=skipped,
                loss_scale=scale,
                skipped_in_a_row=self.in_a_row,
            )
        writer.write_status(
            skipped_steps=self.total, skipped_in_a_row=self.in_a_row, loss_scale=scale
        )
        curves = dict(zip(FP16_TAGS, (scale, self.total), strict=True))  # TensorBoard's train/
        writer.events.scalars([(rows[-1]["step"], curves)])
