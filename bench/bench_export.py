"""``decon export`` on a loss_lin_slope-sized sweep: wall time and peak memory.

Writes a synthetic sweep root in the documented format (docs/sweep-root.md): 216 runs
(4 variants x 3 lr x 3 wd x 6 seeds), each with full streams of a 50-epoch CIFAR run
(352 steps an epoch: 17,600 per-step rows, 200 validation rows, curvature every 500 steps,
noise every 2 epochs, shape every epoch) and a summary. One run is generated and copied
(the export reads every file either way). Then runs ``decon export`` as a real subprocess and
measures its wall time and its own peak RSS (``wait4``), with and without the time series.
Targets: < 30 s and < 2 GB.

    python bench/bench_export.py [--runs 216] [--steps 17600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ holds the writer

from deconcnn_cli import contract  # noqa: E402
from tests.export.synthetic import LRS, VARIANTS, WDS, write_manifest, write_run  # noqa: E402

TARGET_S = 30.0
TARGET_GB = 2.0


def make_sweep(root: Path, n_runs: int, steps: int, spe: int) -> None:
    runs = {}
    for variant in VARIANTS:
        for lr in LRS:
            for wd in WDS:
                for seed in range(6):
                    runs[f"{variant}_lr{lr:g}_wd{wd:g}_s{seed}"] = {
                        "variant": variant, "lr": lr, "weight_decay": wd, "seed": seed,
                    }  # fmt: skip
    runs = dict(list(runs.items())[:n_runs])
    write_manifest(root, runs, grid="loss_lin_slope")
    ids = list(runs)
    summary = {"state": "completed", "alpha_early": 0.31, "alpha_full": 0.28,
               "power_law_r2": 0.991, "best_val_ce": 0.52, "best_val_epoch": 48.25,
               "burn_in_step": 400, "knee_epoch": None}  # fmt: skip
    template = write_run(root, ids[0], steps=steps, steps_per_epoch=spe, summary=summary)
    for run_id in ids[1:]:
        shutil.copytree(template, root / "runs" / run_id)


def timed_export(root: Path, out: Path, *flags: str) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of one ``decon export`` subprocess."""
    cmd = [sys.executable, "-m", "deconcnn_cli", "export", str(out), "--root", str(root),
           *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss * 1024 / 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=216)
    ap.add_argument("--steps", type=int, default=17_600)
    ap.add_argument("--spe", type=int, default=352)
    ap.add_argument("--keep", type=Path, default=None, help="write the sweep here and keep it")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="bench-export-"))
    root = base / "sweep"
    try:
        t0 = time.perf_counter()
        make_sweep(root, args.runs, args.steps, args.spe)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1024**2
        rows = len(contract.read_stream(contract.stream_path(next((root / "runs").iterdir()),
                                                             "step")))  # fmt: skip
        print(f"sweep: {args.runs} runs x {rows} steps, {size:.0f} MB on disk, "
              f"written in {time.perf_counter() - t0:.1f}s")  # fmt: skip
        print(f"{'export':<34} {'wall s':>8} {'peak GB':>8}  targets < {TARGET_S:g} s, "
              f"< {TARGET_GB:g} GB")  # fmt: skip
        cases = [
            ("csv, table only, --no-verify", ("--no-timeseries", "--no-verify")),
            ("csv, table only (verify)", ("--no-timeseries",)),
            ("csv + time series (verify)", ()),
        ]
        try:
            import pyarrow  # noqa: F401

            cases.append(("parquet + time series (verify)", ("--format", "parquet")))
        except ImportError:
            print("(parquet skipped: pyarrow not installed)")
        for i, (label, flags) in enumerate(cases):
            out = base / f"out{i}" / "results.csv"
            out.parent.mkdir()
            if "parquet" in flags:
                out = out.with_suffix(".parquet")
            wall, peak = timed_export(root, out, *flags)
            ok = "ok" if wall < TARGET_S and peak < TARGET_GB else "MISSED"
            print(f"{label:<34} {wall:8.2f} {peak:8.3f}  {ok}")
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
