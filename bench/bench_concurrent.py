"""N concurrent `decon train` runs on this machine: the default thread count vs every split.

Several runs share a node (two per GPU on the cluster; the local executor runs several at
once). This bench starts N real `decon train` subprocesses at once, for each thread setting:

- ``default``: no ``--threads``; the launcher sets ``DECON_CONCURRENT_RUNS=N`` as the local
  executor does, so each run takes CPUs / N threads (``contract.default_threads``);
- ``--threads t`` for every t from 1 to the CPU count (t = CPUs is torch's own default,
  what runs got before ``--threads`` existed).

Combined throughput = steps done / (last attempt end - first attempt start), read from the
runs' own ``attempts.jsonl`` and ``status.json`` (an attempt starts once its data is loaded,
so Python start-up and data loading are left out). A batch still running after
``--batch-timeout`` seconds is stopped there and measured on the steps it has flushed (an
oversubscribed split can be 30x slower; no need to wait it out). Settings are interleaved
rep by rep; medians are compared. Prints the ratio of the default to the best split (target >= 0.9).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_concurrent.py [--runs N] [--reps R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deconcnn_cli.contract import read_attempts
from deconcnn_cli.fileio import read_json

REPO = Path(__file__).resolve().parent.parent
WORK = [  # training-bound: analysis cadences off, width 1/4 at 16 px, 4 epochs of 13 steps
    "-p",
    "smoke",
    "--epochs",
    "4",
    "--set",
    "model.width_mult=0.25",
    "--set",
    "cadence.curvature_every_steps=0",
    "--set",
    "cadence.noise_every_epochs=0",
    "--set",
    "cadence.shape_every_epochs=0",
    "--quiet",
]


def run_batch(n_runs: int, threads: int | None, timeout_s: float) -> float:
    """Start ``n_runs`` runs at once; return their combined steps per second."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["DECON_CONCURRENT_RUNS"] = str(n_runs)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for seed in range(n_runs):
            args = ["train", "-v", "base", *WORK, "--seed", str(seed), "--root", tmp]
            if threads is not None:
                args += ["--threads", str(threads)]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "deconcnn_cli", *args],
                    cwd=REPO,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        stopped_at = time.time()
        for p in procs:
            if p.poll() is None:
                p.kill()
            _, err = p.communicate()
            if p.returncode not in (0, -9):
                raise SystemExit(f"a run failed ({p.returncode}): {err.decode()[-2000:]}")
        starts, ends, steps = [], [], 0
        for run in Path(tmp).iterdir():
            lines = read_attempts(run)
            starts.append(lines[0]["start_unix"])
            ends.append(lines[-1]["end_unix"] if lines[-1].get("event") == "end" else stopped_at)
            steps += int((read_json(run / "status.json") or {}).get("step") or 0)
        return steps / (max(ends) - min(starts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpus = len(os.sched_getaffinity(0))
    parser.add_argument("--runs", type=int, default=cpus, help="concurrent runs (default: CPUs)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch-timeout", type=float, default=90.0, help="seconds per batch")
    a = parser.parse_args()
    settings: list[int | None] = [None, *range(1, cpus + 1)]
    rates: dict[int | None, list[float]] = {s: [] for s in settings}
    for rep in range(a.reps):
        for s in settings:
            rates[s].append(run_batch(a.runs, s, a.batch_timeout))
            label = "default" if s is None else f"--threads {s}"
            print(f"rep {rep}: {label:12s} {rates[s][-1]:6.2f} steps/s combined", flush=True)
    med = {s: statistics.median(v) for s, v in rates.items()}
    best = max((s for s in settings if s is not None), key=lambda s: med[s])
    print(f"\n{a.runs} concurrent runs on {cpus} CPUs, {a.reps} reps, medians (steps/s):")
    for s in settings:
        label = "default" if s is None else f"--threads {s}"
        print(f"  {label:12s} {med[s]:6.2f}  ratio to best split {med[s] / med[best]:.3f}")
    print(f"default / best split (--threads {best}): {med[None] / med[best]:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
