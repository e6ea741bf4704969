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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from deconcnn_cli.analysis.progress import EvaluationStopped
from deconcnn_cli.config import RunConfig
from deconcnn_cli.contract import (
    COMPLETED,
    DIVERGED,
    HEARTBEAT_EVERY_S,
    INTERRUPTED,
    TERMINAL_STATES,
    exit_code_for,
)
from deconcnn_cli.runenv import (
    HOLD_ENV,
    hold_from_env,
    mps_state,
)
from deconcnn_cli.training import measure
from deconcnn_cli.training.attempt import RESUMED_AT, Attempt, Progress
from deconcnn_cli.training.device import (
    deterministic,
    exact_fp32,
    resolve_device,
)
from deconcnn_cli.training.schedule import (
    EndOfStep,
    after_step,
    curvature_due,
)
from deconcnn_cli.training.signals import StopDuringSetup, StopSignals
from deconcnn_cli.training.writer import RunWriter

__all__ = ["RunResult", "train_run"]


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
    stop the run within seconds: at the next step boundary, or inside an evaluation, which is
    abandoned (the checkpoint holds the state before it; a resume repeats it), or while the
    data loads (no checkpoint: nothing to save). A second SIGINT ends the attempt at once,
    ``interrupted`` without a checkpoint. The caller's handlers are restored afterwards,
    unless ``keep_signal_handlers`` (``decon train``, which exits when the run returns: a
    late SIGTERM then leaves the exit code of the run, not a kill).
    """
    writer = RunWriter(
        run_dir, heartbeat_every_s=heartbeat_every_s, tensorboard=cfg.logging.tensorboard
    )
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
                run = Attempt(cfg, run_dir, writer, device, stops)
                return _train(run, stops, stop_after_steps, on_progress)
        except (StopDuringSetup, KeyboardInterrupt) as exc:
            return _stopped_at_once(writer, exc)
        except BaseException as exc:
            writer.record_failure(exc, steps_done=int(writer.status.get("step") or 0))
            raise
        finally:
            writer.stop_heartbeat()
            torch.set_num_threads(threads_before)


def _stopped_at_once(writer: RunWriter, exc: BaseException) -> RunResult:
    """``interrupted`` without a checkpoint: a stop while the data loaded, or a second SIGINT
    (the resume starts from the last checkpoint, the streams cut back to it)."""
    steps = int(writer.status.get("step") or 0)
    if isinstance(exc, StopDuringSetup):
        sig = exc.signal_number
        reason = f"signal {signal.Signals(sig).name} while loading data"
    else:
        sig = signal.SIGINT
        reason = "a second SIGINT: stopped at once, without a checkpoint"
        writer.log_event("warning", f"{reason} (a resume starts from the last checkpoint)")
    result = RunResult(INTERRUPTED, steps, reason, sig)
    writer.finish(
        state=INTERRUPTED, steps_done=steps, exit_code=result.exit_code, reason=reason, action=None
    )
    return result


def _train(
    run: Attempt,
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
    run: Attempt,
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

    def evaluate(action: str, step: int, title: str, done_steps: int) -> bool:
        """Run one evaluation with its progress line; False if a stop cut it short."""
        show = None if on_progress is None else lambda line: announce(line, done_steps)
        with run.evaluating(action, title, show, quiet_s=QUIET_S.get(action, 0.0)) as watch:
            try:
                getattr(run, EVALUATIONS[action])(step, watch)
            except EvaluationStopped:
                return False
            finally:
                if watch.shown:
                    announce("training ...", done_steps)
        return True

    def after_step_evaluations(step: int, actions: list[str]) -> list[str]:
        """The end-of-step evaluations of ``step``, in order; those a stop cut short."""
        spe = s.steps_per_epoch
        for i, action in enumerate(actions):
            at = f"step {step + 1}" if action == "validation" else f"epoch {(step + 1) // spe}"
            if not evaluate(action, step, f"{TITLES[action]} at {at}", step + 1):
                return actions[i:]
        return []

    run.model.train()
    run.t_attempt = time.perf_counter()
    if run.start_step:
        announce(f"{RESUMED_AT} {run.start_step}", run.start_step)
    if run.pending is not None:  # the resumed checkpoint's evaluations come first
        step = run.start_step - 1
        left = after_step_evaluations(step, list(run.pending["actions"]))
        if left:
            return _cut_short(run, stops, step, left)
        run.pending = None
    for step in range(run.start_step, s.total_steps):
        if curvature_due(step, s) and not evaluate(
            "curvature", step, f"curvature at step {step}", step
        ):
            return _cut_short(run, stops, step, ["curvature"])
        run.train_step(step)

        plan = decide(step)
        bad = run.flush(on_progress) if plan.flush else None
        if bad is None:
            wanted = (plan.validate, plan.noise, plan.shape)
            due = [a for a, on in zip(AFTER_STEP, wanted, strict=True) if on]
            left = after_step_evaluations(step, due)
            if left:
                return _cut_short(run, stops, step, left)
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


# the evaluations after a step, in order, as the loop names them (and times them)
AFTER_STEP = ("validation", "noise", "shape")
EVALUATIONS = {  # action -> the Attempt method that performs it, (step, progress)
    "curvature": "measure_curvature",
    "validation": "validate",
    "noise": "measure_noise",
    "shape": "measure_shape",
}
TITLES = {"curvature": "curvature", "validation": "validation", "noise": "gradient noise"}
TITLES["shape"] = "loss-curve shape"
QUIET_S = {"validation": 2.0, "shape": 2.0}  # a progress line only once this long


def _cut_short(run: Attempt, stops: StopSignals, step: int, actions: list[str]) -> RunResult:
    """A stop abandoned ``actions[0]`` of ``step`` (nothing of it written): an event says so,
    and the checkpoint holds the state from before it, so the resumed run repeats it there.
    The curvature runs before its step (the checkpoint is at ``step``); the evaluations after
    a step are kept as the checkpoint's ``pending`` (at ``step + 1``), with the grad norm the
    validation row needs."""
    sig = stops.received[0] if stops.received else None
    by = f"signal {signal.Signals(sig).name}" if sig else "a stop"
    next_step = step if actions == ["curvature"] else step + 1
    if next_step > step:
        run.pending = {"step": step, "actions": actions, "grad_norm": run.last_grad_norm.detach()}
    run.writer.log_event(  # no `step` key: the resume that repeats it keeps the event
        "info",
        f"{actions[0]} at step {step} cut short by {by}: nothing of it written, the resumed run "
        "repeats it",
        action=actions[0],
        at_step=step,
    )
    with run.timed("checkpoint"):
        run.checkpoint(next_step)
    return RunResult(INTERRUPTED, next_step, by, sig)
