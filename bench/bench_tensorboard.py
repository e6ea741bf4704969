"""The cost of a run's TensorBoard event files: per training step, and in bytes for 50 epochs.

A 50-epoch CIFAR-10 run's stream rows at the protocol's cadences (17,600 step rows in blocks
of 200, 200 validations, 36 curvature, 25 noise and 50 shape evaluations: bench/_common.py)
go through the run's real writer (``RunEvents.rows``, what ``MetricStream.append`` calls) to
a real event file, with the events on and, side by side, off (the hook that is left: a no-op
call). Interleaved with them, training steps of the benches' model (ResNet-18 at ``--width``,
32 px, batch 128) on this machine. Prints the event cost per training step, its ratio to a
step, and the event file's size for the 50-epoch run (measured whole, not extrapolated), with
the step time at which the cost would reach 0.5% (a GPU's step).

    python bench/bench_tensorboard.py [--reps 5] [--width 0.25] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import CIFAR_SPE, CIFAR_STEPS, N_CURV, N_NOISE, N_SHAPE, N_VAL, Trajectory

from deconcnn_cli import tbevents
from deconcnn_cli.contract import STREAMS, TENSORBOARD_DIR
from deconcnn_cli.training.tensorboard import RunEvents

BLOCK = 200  # cadence.flush_every_steps


def run_rows(seed: int = 0) -> list[tuple[str, list[dict]]]:
    """The (stream, rows) appends of a 50-epoch run, in the order a run makes them."""
    rng = np.random.default_rng(seed)
    appends: list[tuple[str, list[dict]]] = []
    for start in range(0, CIFAR_STEPS, BLOCK):
        steps = range(start, min(start + BLOCK, CIFAR_STEPS))
        appends.append(("step", [_row("step", s, rng) for s in steps]))
    for name, n in (("val", N_VAL), ("curvature", N_CURV), ("noise", N_NOISE), ("shape", N_SHAPE)):
        for s in np.linspace(0, CIFAR_STEPS - 1, n).astype(int):
            appends.append((name, [_row(name, int(s), rng)]))
    return appends


def _row(stream: str, step: int, rng: np.random.Generator) -> dict:
    row = {c: float(rng.random()) for c in STREAMS[stream]}
    return {**row, "step": step, "epoch": (step + 1) / CIFAR_SPE}


def write_run(mode: str, folder: Path, appends: list[tuple[str, list[dict]]]) -> float:
    """Seconds to hand a whole run's rows to a RunEvents in ``mode`` (opened and closed)."""
    events = RunEvents(folder, mode, lambda *a, **k: print("event:", a, k))
    t0 = time.perf_counter()
    events.open(purge_step=0)
    for stream, rows in appends:
        events.rows(stream, rows)
    events.close()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=5, help="training steps timed per rep")
    args = ap.parse_args()
    assert tbevents.available() is None, tbevents.available()
    appends = run_rows()
    traj = Trajectory(args.width, lr=0.05)
    traj.step()  # warm-up
    on_s, off_s, step_s, size = [], [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                traj.step()
            step_s.append((time.perf_counter() - t0) / args.steps)
            run_dir = Path(tmp, f"on{rep}")
            on_s.append(write_run("on", run_dir, appends))
            off_s.append(write_run("off", Path(tmp, f"off{rep}"), appends))
            size = sum(p.stat().st_size for p in (run_dir / TENSORBOARD_DIR).iterdir())
    step = statistics.median(step_s)
    per_step = (statistics.median(on_s) - statistics.median(off_s)) / CIFAR_STEPS
    crc = "google_crc32c (C)" if _has_c_crc() else "tensorboard's pure-Python CRC"
    print(f"training step (width {args.width}, CPU): {step * 1e3:.1f} ms (median of {args.reps})")
    print(f"events of a 50-epoch run: on {statistics.median(on_s):.3f} s, off "
          f"{statistics.median(off_s):.4f} s  ({crc})")  # fmt: skip
    print(f"event cost per training step: {per_step * 1e6:.1f} us = "
          f"{per_step / step:.3%} of a step (target <= 0.5%)")  # fmt: skip
    print(f"a step of {per_step / 0.005 * 1e3:.2f} ms or longer keeps it <= 0.5% (a GPU's step)")
    print(f"event file of the 50-epoch run: {size / 1e6:.2f} MB = {size / CIFAR_STEPS:.0f} "
          "bytes per step (target <= 5 MB)")  # fmt: skip


def _has_c_crc() -> bool:
    try:
        import google_crc32c  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
