"""One training run of the measurement protocol, top to bottom.

Plain PyTorch. Per-step values are accumulated on the device and flushed to the run directory
in blocks (no host sync per step). What happens after step ``t`` (flush, validation, noise,
shape, checkpoint, stop) is decided in one pure function, :func:`after_step`; the loop in
:func:`train_run` reads as the sequence of named actions it asks for. The batch at step ``t``
is a pure function of ``(seed, t)`` and every metric draws from generators seeded by the
step, so a resumed run writes exactly the rows an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deconcnn_cli.config import RunConfig
from deconcnn_cli.contract import (
    COMPLETED,
    DIVERGED,
    HEARTBEAT_EVERY_S,
    INTERRUPTED,
    TERMINAL_STATES,
    TIMED_ACTIONS,
    analysis_split,
    exit_code_for,
)
from deconcnn_cli.runenv import (
    HOLD_ENV,
    STOP_SIGNALS,
    Hold,
    gpu_share,
    hold_from_env,
    mps_state,
)
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
from deconcnn_cli.training.device import (
    Precision,
    cap_gpu_memory,
    deterministic,
    exact_fp32,
    resolve_device,
    resolve_precision,
)
from deconcnn_cli.training.models import build_model
from deconcnn_cli.training.schedule import lr_factor, warmup_steps
from deconcnn_cli.training.writer import RunWriter

__all__ = ["RunResult", "Progress", "build_optimizer", "evaluate", "lr_factor", "train_run"]

LN2 = math.log(2.0)
# fp16: GradScaler skips a step whose gradients overflowed and halves the scale; this many
# skipped steps in a row (the scale has fallen by 2^-50: no overflow left to fix) is a
# divergence, not a scale still settling (docs/run-directory.md, "Skipped fp16 steps")
MAX_SKIPPED_IN_A_ROW = 50
HOLD_POLL_S = 0.1  # how often a held run looks for its release file (or a stop signal)


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
    state: str  # completed | diverged | interrupted (or the terminal state it already had)
    steps_done: int
    reason: str | None = None
    signal_number: int | None = None
    already: bool = False  # the run was already terminal: nothing was done

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.state, self.signal_number)


# ---------------------------------------------------------------------------------------------
# The schedule and the end-of-step decision (pure)


@dataclass(frozen=True)
class Schedule:
    """The step geometry of one run and its cadences, in steps and epochs."""

    steps_per_epoch: int
    total_steps: int
    val_positions: frozenset[int]  # positions within an epoch after which validation runs
    curvature_every_steps: int  # 0 = off; else at step 0 and every N steps (before the step)
    noise_every_epochs: int
    shape_every_epochs: int
    checkpoint_every_epochs: int
    checkpoint_every_s: float  # at an epoch end, once this long since the last checkpoint
    flush_every_steps: int

    @classmethod
    def of(cls, cfg: RunConfig, spe: int) -> Schedule:
        c = cfg.cadence
        return cls(
            steps_per_epoch=spe,
            total_steps=cfg.schedule.epochs * spe,
            val_positions=frozenset(val_steps_in_epoch(spe, c.val_per_epoch)),
            curvature_every_steps=c.curvature_every_steps,
            noise_every_epochs=c.noise_every_epochs,
            shape_every_epochs=c.shape_every_epochs,
            checkpoint_every_epochs=c.checkpoint_every_epochs,
            checkpoint_every_s=60.0 * c.checkpoint_every_minutes,
            flush_every_steps=c.flush_every_steps,
        )


@dataclass(frozen=True)
class EndOfStep:
    """What happens after a step, in this order: flush, validate, noise, shape, hold,
    checkpoint, stop."""

    flush: bool = False
    validate: bool = False
    noise: bool = False
    shape: bool = False
    checkpoint: bool = False
    stop: str | None = None  # COMPLETED, INTERRUPTED or None (go on)
    hold: bool = False  # wait for $DECON_HOLD's release file or a stop signal (a test hook)


def curvature_due(step: int, s: Schedule) -> bool:
    """Curvature runs before step ``step`` (at step 0 and every ``curvature_every_steps``)."""
    return bool(s.curvature_every_steps) and step % s.curvature_every_steps == 0


def after_step(
    step: int,
    s: Schedule,
    *,
    buffered: int,
    stop_requested: bool,
    since_checkpoint_s: float = math.inf,
    hold_due: bool = False,
) -> EndOfStep:
    """The actions after step ``step`` (counted from 0) with ``buffered`` unflushed rows.

    - validation at the epoch's validation positions; noise and shape at their epoch ends;
    - the final step completes the run (even when a stop was asked for at that moment);
    - otherwise a requested stop interrupts it, with a checkpoint at ``step + 1``;
    - a checkpoint at every ``checkpoint_every_epochs`` epoch end once
      ``since_checkpoint_s`` (the attempt's seconds since its last checkpoint, or since it
      started) reached ``checkpoint_every_s``; and always at a stop and at the final step;
    - a flush whenever the block is full, and before anything that reads the per-step rows
      or must find them on disk: validation, noise, shape, a checkpoint, a stop, and the
      curvature evaluation before the next step (so no metric row lies past a divergence);
    - ``hold_due`` (``$DECON_HOLD`` names ``step + 1``, a test hook): hold, unless the run
      completes or stops here; flushed first, so status.json shows the step the run waits at.
    """
    spe = s.steps_per_epoch
    position, done_epochs = step % spe, step // spe + 1
    epoch_end = position == spe - 1
    validate = position in s.val_positions
    noise = epoch_end and bool(s.noise_every_epochs) and done_epochs % s.noise_every_epochs == 0
    shape = epoch_end and bool(s.shape_every_epochs) and done_epochs % s.shape_every_epochs == 0
    if step >= s.total_steps - 1:
        stop: str | None = COMPLETED
    else:
        stop = INTERRUPTED if stop_requested else None
    hold = hold_due and stop is None
    on_cadence = epoch_end and done_epochs % s.checkpoint_every_epochs == 0
    checkpoint = (on_cadence and since_checkpoint_s >= s.checkpoint_every_s) or stop is not None
    flush = buffered > 0 and (
        buffered >= s.flush_every_steps
        or validate
        or noise
        or shape
        or checkpoint
        or stop is not None
        or curvature_due(step + 1, s)
        or hold
    )
    return EndOfStep(flush, validate, noise, shape, checkpoint, stop, hold)


def val_steps_in_epoch(spe: int, per_epoch: int) -> set[int]:
    """Positions (0-based, within an epoch) after which validation runs; the last is spe-1."""
    return {math.ceil(q * spe / per_epoch) - 1 for q in range(1, per_epoch + 1)}


def build_optimizer(
    cfg: RunConfig, model: torch.nn.Module, *, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD or AdamW as the config says. ``fused``: the single-kernel CUDA implementation,
    which also takes GradScaler's inf flag on the device (no host sync per fp16 step)."""
    o = cfg.optim
    kind = {"fused": True} if fused else {}
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            **kind,
        )
    return torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, **kind
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


# ---------------------------------------------------------------------------------------------
# Stop signals


class StopSignals:
    """Records SIGTERM / SIGUSR2 / SIGINT from the first line of a run (SLURM sends USR2, whose
    default action kills); the loop stops at the next step boundary."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @contextlib.contextmanager
    def installed(self, *, keep: bool = False) -> Iterator[StopSignals]:
        """Record stop signals inside the block; afterwards restore the previous handlers, or
        with ``keep`` ignore these signals (``SIG_IGN``, which also holds while the interpreter
        shuts down): for a process that exits once the run has ended, where a signal that
        comes after the run was recorded must not turn its exit code into a kill."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                s: signal.signal(s, lambda n, _f: self.received.append(n)) for s in STOP_SIGNALS
            }
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, signal.SIG_IGN if keep else handler)


def _stored_precision(checkpoint: dict[str, Any] | None, writer: RunWriter) -> str | None:
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


# ---------------------------------------------------------------------------------------------
# The run: its state and the named actions the loop performs


class _Run:
    """Model, optimizer, data and buffers of one attempt, restored from the newest checkpoint."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, writer: RunWriter, device: torch.device
    ) -> None:
        self.cfg, self.run_dir, self.writer, self.device = cfg, run_dir, writer, device
        checkpoint, skipped = load_latest_checkpoint(run_dir)  # on the CPU
        self.prec = resolve_precision(
            cfg.precision, self.device, _stored_precision(checkpoint, writer)
        )
        share = gpu_share()
        fraction = cap_gpu_memory(self.device, share)
        if fraction is not None:
            writer.log_event(
                "info",
                f"{share} runs share this GPU: CUDA memory capped at {fraction:.1%} of it",
                gpu_memory_fraction=fraction,
            )
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
        warmup, total = warmup_steps(cfg, spe), self.sched.total_steps

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, self.splits.num_classes).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        # fused on CUDA, chosen at the first start and kept for every attempt: the resumed
        # checkpoint's choice (its optimizer state is of that kind), else a fresh one
        stored_fused = (checkpoint or {}).get("optimizer_fused")
        fresh = self.device.type == "cuda"
        self.fused = fresh and (stored_fused if isinstance(stored_fused, bool) else fresh)
        self.optimizer = build_optimizer(cfg, self.model, fused=self.fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup_steps=warmup, total_steps=total)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.prec.use_scaler)
        self.probe = measure.probe_batch(self.splits, cfg)
        self.analysis_state: dict[str, Any] = {"eigenvector": None}
        self.start_step = 0
        self.last_checkpoint_step: int | None = None
        self._restore(checkpoint, skipped)

        self.losses = measure.read_step_losses(writer)
        self.buf_loss: list[torch.Tensor] = []  # 0-d device tensors: no sync per step
        self.buf_correct: list[torch.Tensor] = []
        self.buf_skipped: list[torch.Tensor] = []  # fp16: 1 where GradScaler skipped the step
        # fp16 skip counters as of the resumed checkpoint (replayed steps are counted again)
        counters = (checkpoint or {}).get("skip_counters") or {}
        self.skipped_in_a_row = int(counters.get("in_a_row", 0))
        self.skipped_total = int(counters.get("total", 0))
        self.diverged_reason: str | None = None
        self.buf_rows: list[dict[str, Any]] = []  # host-known fields of the buffered steps
        self.t_block, self.steps_block = time.perf_counter(), 0
        self.last_grad_norm = torch.zeros((), device=self.device)
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

    # ---- actions, in the order the loop takes them
    def measure_curvature(self, step: int) -> None:
        def evaluate_curvature() -> dict[str, Any]:
            row, self.analysis_state = measure.curvature_row(
                self.model, self.probe, self.cfg, step, self.analysis_state
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
            found = self.scaler._found_inf_per_device(self.optimizer).values()
            self.buf_skipped.append(torch.stack([f.to(self.device) for f in found]).amax())
        params = self.model.parameters()
        if cfg.grad_clip_norm is not None:
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        elif step % spe in self.sched.val_positions:
            self.last_grad_norm = global_norm([p.grad for p in params if p.grad is not None])
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
            parts += [torch.stack(self.buf_skipped).float(), self.scaler._get_scale_async()]
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
            if fp16 and self._count_skipped(row["step"], flags[i]) is not None:
                bad, rows = row["step"], rows[: i + 1]
                break
        if fp16:
            self._record_skipped(rows, flags, flat[-1])
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

    def _count_skipped(self, step: int, flag: float) -> int | None:
        """Track fp16 steps skipped in a row; the step that makes it a divergence, if any."""
        if flag > 0:
            self.skipped_in_a_row += 1
            self.skipped_total += 1
        else:
            self.skipped_in_a_row = 0
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            self.diverged_reason = (
                f"{self.skipped_in_a_row} fp16 steps in a row skipped (inf/NaN gradients) up to "
                f"step {step}: the loss scale cannot recover"
            )
            return step
        return None

    def _record_skipped(self, rows: list[dict[str, Any]], flags: list[float], scale: float) -> None:
        """Skipped fp16 steps of this block: an event naming them, and the totals with the
        loss scale in status.json (written at every flush of an fp16 run)."""
        skipped = [r["step"] for r, f in zip(rows, flags, strict=False) if f > 0]
        if skipped:
            self.writer.log_event(
                "warning",
                f"fp16: {len(skipped)} step(s) skipped (inf/NaN gradients), loss scale now "
                f"{scale:g}",
                steps=skipped,
                loss_scale=scale,
                skipped_in_a_row=self.skipped_in_a_row,
            )
        self.writer.write_status(
            skipped_steps=self.skipped_total,
            skipped_in_a_row=self.skipped_in_a_row,
            loss_scale=scale,
        )

    def validate(self, step: int) -> None:
        loss_val, acc_val = evaluate(self.model, self.splits, self.cfg.data.batch_size, self.prec)
        weight_norm = global_norm([p.detach() for p in self.model.parameters()])
        row = {
            "step": step,
            "epoch": (step + 1) / self.sched.steps_per_epoch,
            "loss_val_nats": loss_val,
            "acc_val": acc_val,
            "grad_norm": float(self.last_grad_norm),
            "weight_norm": float(weight_norm),
        }
        self.writer.streams["val"].append([row])

    def measure_noise(self, step: int) -> None:
        spe = self.sched.steps_per_epoch
        args = (self.model, self.splits, self.cfg, step, self.losses, spe)
        row = measure.guarded(self.writer, "noise", step, measure.noise_row, *args)
        self.writer.streams["noise"].append([{**row, "epoch": (step + 1) // spe}])

    def measure_shape(self, step: int) -> None:
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
        while not stops.requested and not hold.release_file.exists():
            time.sleep(HOLD_POLL_S)
        self.t_block = time.perf_counter()  # the next block's steps/s leaves the wait out

    def checkpoint(self, next_step: int) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "analysis": self.analysis_state,
            "config": self.cfg.model_dump(mode="json"),
            "precision": self.prec.name,
            "optimizer_fused": self.fused,
            "skip_counters": {"total": self.skipped_total, "in_a_row": self.skipped_in_a_row},
        }
        save_checkpoint(self.run_dir, next_step, state)
        self.last_checkpoint_step = next_step
        self.checkpoint_clock = time.monotonic()
        self.n_checkpoints += 1
        self.writer.write_status(last_checkpoint_step=next_step)


# ---------------------------------------------------------------------------------------------
# The run, top to bottom


def train_run(
    cfg: RunConfig,
    run_dir: Path,
    *,
    threads: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    stop_after_steps: int | None = None,
    heartbeat_every_s: float = HEARTBEAT_EVERY_S,
    keep_signal_handlers: bool = False,
) -> RunResult:
    """Train (or resume) the run in ``run_dir``; the directory must already hold its config.

    The caller owns the directory (:func:`deconcnn_cli.training.rundir.own_run`). Every
    attempt is recorded from its first line: a failure anywhere (data loading, checkpoint
    restore, a step) leaves ``failed`` with the exception in status.json, an ``error`` event
    with its traceback, and the attempt's end line, then re-raises. SIGTERM/SIGUSR2/SIGINT
    stop the run at the next step boundary; the caller's handlers are restored afterwards,
    unless ``keep_signal_handlers`` (``decon train``, which exits when the run returns: a
    late SIGTERM then leaves the exit code of the run, not a kill).
    """
    writer = RunWriter(run_dir, heartbeat_every_s=heartbeat_every_s)
    if writer.status.get("state") in TERMINAL_STATES:  # re-checked by the owner: nothing to do
        state = writer.status["state"]
        return RunResult(state, int(writer.status.get("step") or 0), already=True)
    stops = StopSignals()
    threads_before = torch.get_num_threads()
    with stops.installed(keep=keep_signal_handlers):
        writer.begin(threads=threads)
        try:
            if threads:
                torch.set_num_threads(threads)  # restored below: the caller's process is theirs
            if threads and writer.previous_threads and writer.previous_threads != threads:
                writer.log_event(
                    "warning",
                    f"{threads} threads, the previous attempt had {writer.previous_threads}: "
                    "CPU results can differ in the last bits from an uninterrupted run",
                )
            for orphan in writer.remove_orphans():
                writer.log_event("warning", f"removed orphan temp file {orphan}")
            device = resolve_device(cfg.device)
            with deterministic(device):
                run = _Run(cfg, run_dir, writer, device)
                return _train(run, stops, stop_after_steps, on_progress)
        except BaseException as exc:
            writer.record_failure(exc, steps_done=int(writer.status.get("step") or 0))
            raise
        finally:
            writer.stop_heartbeat()
            torch.set_num_threads(threads_before)


def _train(
    run: _Run,
    stops: StopSignals,
    stop_after_steps: int | None,
    on_progress: Callable[[Progress], None] | None,
) -> RunResult:
    writer, s = run.writer, run.sched
    mps = mps_state()
    writer.record_start(resumed_from_step=run.start_step, device=str(run.device), **mps)
    if run.device.type == "cuda" and mps.get("mps_reason"):
        writer.log_event("info", f"not under CUDA MPS: {mps['mps_reason']}")
    writer.write_status(
        step=run.start_step,
        epoch=run.start_step / s.steps_per_epoch,
        total_steps=s.total_steps,
        steps_per_epoch=s.steps_per_epoch,
        precision=run.prec.name,
        device=str(run.device),
        optimizer_fused=run.fused,
        **mps,
        last_checkpoint_step=run.last_checkpoint_step,
        steps_per_s=None,
    )

    if stops.requested and run.start_step < s.total_steps:  # a signal during set-up
        sig = stops.received[0]
        result = RunResult(INTERRUPTED, run.start_step, f"signal {signal.Signals(sig).name}", sig)
    else:
        fp32_training = exact_fp32() if run.prec.name == "fp32" else contextlib.nullcontext()
        with fp32_training:
            result = _loop(run, stops, stop_after_steps, on_progress)
    if result.state in (COMPLETED, DIVERGED):
        spe = s.steps_per_epoch
        measure.write_summary(writer, run.cfg, result.state, result.steps_done, spe, run.losses)
    writer.finish(
        state=result.state,
        steps_done=result.steps_done,
        exit_code=result.exit_code,
        reason=result.reason,
        step=result.steps_done,
        epoch=result.steps_done / s.steps_per_epoch,
        timing=run.timing(),
    )
    return result


def _loop(
    run: _Run,
    stops: StopSignals,
    stop_after_steps: int | None,
    on_progress: Callable[[Progress], None] | None,
) -> RunResult:
    """Steps from the resume point until the schedule, a stop or a divergence ends the run."""
    s = run.sched
    hold = hold_from_env()

    def decide(step: int) -> EndOfStep:
        asked = stops.requested or (stop_after_steps is not None and step + 1 >= stop_after_steps)
        since = time.monotonic() - run.checkpoint_clock
        hold_due = hold is not None and step + 1 in hold.at_steps
        return after_step(
            step,
            s,
            buffered=len(run.buf_rows),
            stop_requested=asked,
            since_checkpoint_s=since,
            hold_due=hold_due,
        )

    def announce(phase: str, step: int) -> None:
        """Tell the caller what runs now (a cold Lanczos at step 0 can take minutes)."""
        if on_progress is not None:
            spe = s.steps_per_epoch
            on_progress(Progress(step, s.total_steps, step / spe, math.nan, 0.0, phase=phase))

    run.model.train()
    run.t_attempt = time.perf_counter()
    for step in range(run.start_step, s.total_steps):
        if curvature_due(step, s):
            announce(f"curvature at step {step} ...", step)
            with run.timed("curvature"):
                run.measure_curvature(step)
            announce("training ...", step)
        run.train_step(step)

        plan = decide(step)
        bad = run.flush(on_progress) if plan.flush else None
        if bad is None:
            if plan.validate:
                with run.timed("validation"):
                    run.validate(step)
            if plan.noise:
                announce(f"gradient noise at epoch {(step + 1) // s.steps_per_epoch} ...", step + 1)
                with run.timed("noise"):
                    run.measure_noise(step)
            if plan.shape:
                with run.timed("shape"):
                    run.measure_shape(step)
            if plan.hold and hold is not None:
                announce(f"held after {step + 1} steps ({HOLD_ENV}) ...", step + 1)
                run.hold(step, hold, stops)
            if plan.stop is None and stops.requested:  # arrived during this step's work
                plan = decide(step)
                bad = run.flush(on_progress) if plan.flush else None
        if bad is not None:
            reason = run.diverged_reason or f"non-finite training loss at step {bad}"
            return RunResult(DIVERGED, bad + 1, reason)
        if plan.checkpoint:
            with run.timed("checkpoint"):
                run.checkpoint(step + 1)
        if plan.stop == INTERRUPTED:
            sig = stops.received[0] if stops.received else None
            reason = f"signal {signal.Signals(sig).name}" if sig else "stop_after_steps"
            return RunResult(INTERRUPTED, step + 1, reason, sig)
        if plan.stop == COMPLETED:
            return RunResult(COMPLETED, step + 1)
    return RunResult(COMPLETED, s.total_steps)  # every step was already done (resumed at the end)
