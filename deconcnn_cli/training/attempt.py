"""One attempt of a run: its model, optimizer, data and buffers, restored from the newest
checkpoint, and the named actions the loop (:mod:`deconcnn_cli.training.loop`) performs:
curvature, a training step, a flush, validation, noise, shape, a hold, a checkpoint."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deconcnn_cli.analysis.progress import STILL_WORKING, ProgressFn, report
from deconcnn_cli.config import RunConfig
from deconcnn_cli.contract import (
    TIMED_ACTIONS,
    analysis_split,
)
from deconcnn_cli.runenv import (
    HOLD_ENV,
    Hold,
)
from deconcnn_cli.training import measure
from deconcnn_cli.training.checkpoint import (
    load_latest_checkpoint,
    restore_rng_states,
    save_checkpoint,
)
from deconcnn_cli.training.data import (
    load_splits,
    steps_per_epoch,
    train_batch,
)
from deconcnn_cli.training.device import (
    resolve_precision,
)
from deconcnn_cli.training.evaluation import Watch
from deconcnn_cli.training.fp16 import SkipCounter, loss_scale, overflow_flag
from deconcnn_cli.training.models import build_model
from deconcnn_cli.training.schedule import (
    Schedule,
)
from deconcnn_cli.training.setup import (
    build_optimizer,
    lr_scheduler,
    share_gpu_memory,
    stored_precision,
    use_fused,
)
from deconcnn_cli.training.signals import StopSignals, wait_for_release
from deconcnn_cli.training.writer import RunWriter

LN2 = math.log(2.0)


RESUMED_AT = "resumed at step"  # Progress.phase of the first report of a resumed attempt


@dataclass(frozen=True)
class Progress:
    """What the loop reports to its caller after each flush, and before a long action."""

    steps_done: int
    total_steps: int
    epoch: float
    loss_train_nats: float
    steps_per_s: float
    phase: str = ""  # non-empty: what runs now ("curvature at step 0: Lanczos 3/40, ..., 9s")


class Attempt:
    """Model, optimizer, data and buffers of one attempt, restored from the newest checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        writer: RunWriter,
        device: torch.device,
        stops: StopSignals,
    ) -> None:
        self.cfg, self.run_dir, self.writer, self.device = cfg, run_dir, writer, device
        self.stops = stops
        checkpoint, skipped = load_latest_checkpoint(run_dir)  # on the CPU
        self.prec = resolve_precision(
            cfg.precision, self.device, stored_precision(checkpoint, writer)
        )
        share_gpu_memory(writer, self.device)
        with stops.raising():  # a stop while loading (or downloading) ends the attempt at once
            self.splits = load_splits(
                cfg.data.dataset,
                cfg.data.data_dir,
                val_fraction=cfg.data.val_fraction,
                split_seed=cfg.data.split_seed,
                image_size=cfg.data.image_size,
                download=cfg.data.download,
                device=self.device,
            )
        spe = steps_per_epoch(self.splits.n_train, cfg.data.batch_size)
        self.sched = Schedule.of(cfg, spe)

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, self.splits.num_classes).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fused = use_fused(self.device, checkpoint)
        self.optimizer = build_optimizer(cfg, self.model, fused=self.fused)
        self.scheduler = lr_scheduler(cfg, self.optimizer, spe)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.prec.use_scaler)
        self.probe = measure.probe_batch(self.splits, cfg)
        self.analysis_state: dict[str, Any] = {"eigenvector": None}
        self.start_step = 0
        self.last_checkpoint_step: int | None = None
        # end-of-step evaluations a stop cut short: {"step", "actions", "grad_norm"}, repeated
        # before the next step (a checkpoint's, or this attempt's when a stop cuts one short)
        self.pending: dict[str, Any] | None = None
        self.last_grad_norm = torch.zeros((), device=self.device)
        self._restore(checkpoint, skipped)

        self.losses = measure.read_step_losses(writer)
        self.buf_loss: list[torch.Tensor] = []  # 0-d device tensors: no sync per step
        self.buf_correct: list[torch.Tensor] = []
        self.buf_skipped: list[torch.Tensor] = []  # fp16: 1 where GradScaler skipped the step
        # fp16 skip counters as of the resumed checkpoint (replayed steps are counted again)
        self.skips = SkipCounter.restored((checkpoint or {}).get("skip_counters"))
        self.diverged_reason: str | None = None
        self.buf_rows: list[dict[str, Any]] = []  # host-known fields of the buffered steps
        self.t_block, self.steps_block = time.perf_counter(), 0
        self.steps_done = self.start_step
        self.t_attempt = time.perf_counter()  # restarted when the loop begins
        self.checkpoint_clock = time.monotonic()  # when the last checkpoint (or start) was
        self.n_checkpoints = 0
        self.seconds = dict.fromkeys(TIMED_ACTIONS, 0.0)  # wall time of this attempt's actions

    def _restore(self, state: dict[str, Any] | None, skipped: list[str]) -> None:
        """Resume from the newest valid checkpoint; cut the streams and events back to it."""
        for note in skipped:
            self.writer.log_event("warning", f"skipped checkpoint {note}")
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.analysis_state = {
                k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                for k, v in state["analysis"].items()
            }
            restore_rng_states(state["rng"])
            self.start_step = self.last_checkpoint_step = state["next_step"]
            self.pending = state.get("pending")
            if self.pending is not None:  # validation's grad_norm is that of the pending step
                self.last_grad_norm = self.pending["grad_norm"].to(self.device)
        self.writer.truncate_before(self.start_step)  # replayed rows are never doubled

    @contextlib.contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Add the block's wall time to ``seconds[kind]``. Every timed action ends with a
        host sync (its results are Python floats or a saved file), so on a GPU the time is
        the device's too; training steps are not timed (the rest of the wall time)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] += time.perf_counter() - t0

    def timing(self) -> dict[str, float]:
        """This attempt's wall time, the seconds of each timed action, and the analysis
        overhead: (curvature + noise + shape) / (everything else), as the benches define it
        (docs/run-directory.md, "Timing")."""
        timing = {
            "wall_s": round(time.perf_counter() - self.t_attempt, 3),
            **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()},
            "checkpoints": self.n_checkpoints,  # saved by this attempt (checkpoint_s is theirs)
        }
        analysis, rest = analysis_split(timing)
        return {**timing, "analysis_overhead": round(analysis / rest, 5) if rest > 0 else None}

    @contextlib.contextmanager
    def evaluating(
        self, action: str, title: str, show: Callable[[str], None] | None, *, quiet_s: float = 0.0
    ) -> Iterator[Watch]:
        """One evaluation (``action``, one of the timed actions): status.json names it while it
        runs (``decon monitor`` shows it), its time is counted, and the :class:`Watch` it
        yields is its ``progress``: a line for ``show`` (after ``quiet_s``: validation and
        shape usually end at once) and a stop once a stop signal came."""
        self.writer.write_status(action=action)
        watch = Watch(title, lambda: self.stops.requested, show, first_after_s=quiet_s)
        try:
            with self.timed(action):
                yield watch
        finally:
            self.writer.write_status(action=None)

    # ---- actions, in the order the loop takes them
    def measure_curvature(self, step: int, progress: ProgressFn | None = None) -> None:
        def evaluate_curvature() -> dict[str, Any]:
            row, self.analysis_state = measure.curvature_row(
                self.model, self.probe, self.cfg, step, self.analysis_state, progress
            )
            return row

        row = measure.guarded(self.writer, "curvature", step, evaluate_curvature)
        lr_step = self.optimizer.param_groups[0]["lr"]  # the scheduled lr of step `step`
        row["sharpness_norm"] = measure.sharpness_cell(self.cfg, row["lambda_max"], lr_step)
        self.writer.streams["curvature"].append(
            [{**row, "epoch": step / self.sched.steps_per_epoch}]
        )
        for warning in row.get("_warnings", []):
            self.writer.log_event("warning", warning, step=step)

    def train_step(self, step: int) -> None:
        cfg, spe = self.cfg, self.sched.steps_per_epoch
        x, y = train_batch(
            self.splits,
            step=step,
            steps_per_epoch=spe,
            batch_size=cfg.data.batch_size,
            seed=cfg.seed,
            augment=cfg.data.augmentation == "crop_flip",
            image_size=cfg.data.image_size,
        )
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        lr_now = self.optimizer.param_groups[0]["lr"]
        with self.prec.autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        if self.prec.use_scaler:  # the overflow flag GradScaler will skip on, kept on the device
            self.buf_skipped.append(overflow_flag(self.scaler, self.optimizer, self.device))
        params = self.model.parameters()
        if cfg.grad_clip_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        elif step % spe in self.sched.val_positions:
            self.last_grad_norm = measure.global_norm(
                [p.grad for p in params if p.grad is not None]
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

        self.buf_loss.append(loss.detach())
        self.buf_correct.append((logits.detach().argmax(1) == y).sum())
        self.buf_rows.append(
            {
                "step": step,
                "epoch": (step + 1) / spe,
                "lr": lr_now,
                "wd": cfg.optim.weight_decay,
                "_batch": y.shape[0],
            }
        )
        self.steps_block += 1

    def flush(self, on_progress: Callable[[Progress], None] | None) -> int | None:
        """Write the buffered per-step rows; return the first non-finite step, if any."""
        if not self.buf_rows:
            return None
        n = len(self.buf_rows)
        parts = [torch.stack(self.buf_loss).float(), torch.stack(self.buf_correct).float()]
        fp16 = bool(self.buf_skipped)
        if fp16:  # the skipped flags, and the loss scale after the block
            parts += [torch.stack(self.buf_skipped).float(), loss_scale(self.scaler)]
        flat = torch.cat([t.reshape(-1).float() for t in parts]).tolist()  # the one host sync
        losses, correct, flags = flat[:n], flat[n : 2 * n], flat[2 * n : 3 * n]
        self.buf_loss.clear()
        self.buf_correct.clear()
        self.buf_skipped.clear()
        rows, bad = self.buf_rows, None
        for i, row in enumerate(rows):
            nats = losses[i]
            row.update(
                loss_train_nats=nats,
                loss_train_bits=nats / LN2,
                acc_train=correct[i] / row.pop("_batch"),
            )
            if not math.isfinite(nats):
                bad, rows = row["step"], rows[: i + 1]
                self.diverged_reason = f"non-finite training loss at step {bad}"
                break
            if fp16 and (why := self.skips.count(row["step"], flags[i])) is not None:
                bad, rows, self.diverged_reason = row["step"], rows[: i + 1], why
                break
        if fp16:
            self.skips.record(self.writer, rows, flags, flat[-1])
        self.writer.streams["step"].append(rows)
        self.losses.extend(r["loss_train_nats"] for r in rows)
        elapsed = time.perf_counter() - self.t_block
        rate = self.steps_block / elapsed if elapsed > 0 else 0.0
        self.steps_done = rows[-1]["step"] + 1
        spe, total = self.sched.steps_per_epoch, self.sched.total_steps
        self.writer.write_status(
            step=self.steps_done,
            epoch=self.steps_done / spe,
            steps_per_s=rate,
            timing=self.timing(),
        )
        if on_progress is not None:
            last = rows[-1]["loss_train_nats"]
            on_progress(Progress(self.steps_done, total, self.steps_done / spe, last, rate))
        self.buf_rows, self.t_block, self.steps_block = [], time.perf_counter(), 0
        return bad

    def validate(self, step: int, progress: ProgressFn | None = None) -> None:
        loss_val, acc_val = measure.evaluate(
            self.model, self.splits, self.cfg.data.batch_size, self.prec, progress
        )
        weight_norm = measure.global_norm([p.detach() for p in self.model.parameters()])
        row = {
            "step": step,
            "epoch": (step + 1) / self.sched.steps_per_epoch,
            "loss_val_nats": loss_val,
            "acc_val": acc_val,
            "grad_norm": float(self.last_grad_norm),
            "weight_norm": float(weight_norm),
        }
        self.writer.streams["val"].append([row])

    def measure_noise(self, step: int, progress: ProgressFn | None = None) -> None:
        spe = self.sched.steps_per_epoch
        args = (self.model, self.splits, self.cfg, step, self.losses, spe, progress)
        row = measure.guarded(self.writer, "noise", step, measure.noise_row, *args)
        self.writer.streams["noise"].append([{**row, "epoch": (step + 1) // spe}])

    def measure_shape(self, step: int, progress: ProgressFn | None = None) -> None:
        report(progress, STILL_WORKING, 0, 0)  # numpy fits, seconds at most: a stop before them
        spe = self.sched.steps_per_epoch
        row = measure.guarded(
            self.writer, "shape", step, measure.shape_row, self.losses, self.cfg, spe
        )
        self.writer.streams["shape"].append([{**row, "step": step, "epoch": (step + 1) // spe}])

    def hold(self, step: int, hold: Hold, stops: StopSignals) -> None:
        """After step ``step``, wait until ``hold.release_file`` exists or a stop signal came
        ($DECON_HOLD, a test hook: a signal sent now certainly finds the run mid-training).
        The heartbeat goes on. The event is tied to ``step``: kept by a resume after it."""
        self.writer.log_event(
            "info",
            f"held after {step + 1} steps ({HOLD_ENV}) until {hold.release_file} exists "
            "or a stop signal comes",
            step=step,
        )
        wait_for_release(hold, stops)
        self.t_block = time.perf_counter()  # the next block's steps/s leaves the wait out

    def checkpoint(self, next_step: int) -> None:
        """Save the state for resuming at ``next_step``, with :attr:`pending` (the end-of-step
        evaluations of ``next_step - 1`` a stop cut short) when there are any."""
        pending = {} if self.pending is None else {"pending": self.pending}
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "analysis": self.analysis_state,
            "config": self.cfg.model_dump(mode="json"),
            "precision": self.prec.name,
            "optimizer_fused": self.fused,
            "skip_counters": self.skips.state(),
            **pending,
        }
        save_checkpoint(self.run_dir, next_step, state)
        self.last_checkpoint_step = next_step
        self.checkpoint_clock = time.monotonic()
        self.n_checkpoints += 1
        self.writer.write_status(last_checkpoint_step=next_step)
