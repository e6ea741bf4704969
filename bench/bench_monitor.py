"""Wall time of ``decon monitor`` on synthetic sweeps of 216 and 10,000 runs.

Writes each sweep (manifest, ``runs/<id>/status.json`` + ``attempts.jsonl``; 2 runs per GPU
job, arrays of at most 1,000 tasks) and a fake ``squeue``/``sacct`` pair on PATH that answers
for every job and logs each call. Then runs the real CLI in a subprocess: a cold refresh (the
scheduler is queried) and a warm one (a second shell within the cache TTL), both ``--json``,
and the table a person reads at 80 columns (``table80``, warm). Prints wall times,
the scheduler calls each refresh made, and the targets (< 1 s at 216 runs, < 5 s at 10,000;
one batched query per refresh). Torch is never loaded. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_monitor.py [--sizes 216 10000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deconcnn_cli.fileio import atomic_write_json  # noqa: E402

TARGET_S = {216: 1.0, 10_000: 5.0}
ARRAY_MAX = 1000
BASE_JOB = 700_000


def _slurm_time(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(unix))


def write_sweep(root: Path, n_runs: int) -> list[str]:
    """A sweep of ``n_runs`` in a realistic mix; returns the job ids (one per 2 runs)."""
    now = time.time()
    run_ids = [f"base_lr0.1_wd0.001_s{i}_{i:010x}" for i in range(n_runs)]
    jobs, job_ids = [], []
    for k in range(0, n_runs, 2):
        task = k // 2
        jid = f"{BASE_JOB + task // ARRAY_MAX}_{task % ARRAY_MAX}"
        jobs.append({"job_id": jid, "run_ids": run_ids[k : k + 2]})
        job_ids.append(jid)
    manifest = {
        "schema_version": 1,
        "grid": f"bench{n_runs}",
        "grid_hash": "0" * 16,
        "code_version": "0.0.0+gbench",
        "created_unix": now - 86400,
        "runs": {r: {"variant": "base", "config": {}} for r in run_ids},
        "submissions": [
            {
                "time_unix": now - 86400,
                "executor": "slurm",
                "resources": "rtx8000",
                "code_version": "0.0.0+gbench",
                "jobs": jobs,
            }
        ],
    }
    (root / "runs").mkdir(parents=True)
    atomic_write_json(root / "sweep.json", manifest)
    for i, rid in enumerate(run_ids):
        kind = i % 20  # 12 completed, 6 running, 1 failed, 1 never started
        if kind == 19:
            continue
        state = "completed" if kind < 12 else ("running" if kind < 18 else "failed")
        d = root / "runs" / rid
        d.mkdir()
        step = 17_600 if state == "completed" else 352 * (i % 50)
        (d / "status.json").write_text(
            json.dumps(
                {
                    "state": state,
                    "step": step,
                    "epoch": step / 352,
                    "total_steps": 17_600,
                    "steps_per_epoch": 352,
                    "attempt": 1,
                    "heartbeat_unix": now - 5,
                    "steps_per_s": 11.0,
                    "exception_type": "ValueError" if state == "failed" else None,
                }
            )
        )
        lines = [{"attempt": 1, "start_unix": now - 7200, "host": "gpu1", "pid": 1}]
        if state != "running":
            lines.append({"attempt": 1, "event": "end", "state": state, "end_unix": now - 60})
        (d / "attempts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return job_ids


def write_fake_scheduler(bin_dir: Path, job_ids: list[str]) -> Path:
    sub = _slurm_time(time.time() - 86000)
    sacct, squeue = [], []
    for n, jid in enumerate(job_ids):
        i = n * 2
        if i % 20 >= 12 and i % 20 < 18:
            squeue.append(f"{jid}|RUNNING|None|gpu{n % 50}|{sub}")
            sacct.append(f"{jid}|RUNNING|0:0|None|gpu{n % 50}|{sub}|01:00:00")
        else:
            sacct.append(f"{jid}|COMPLETED|0:0|None|gpu{n % 50}|{sub}|05:00:00")
    bin_dir.mkdir(parents=True)
    calls = bin_dir / "calls.log"
    calls.touch()
    for name, lines in (("squeue", squeue), ("sacct", sacct)):
        (bin_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\necho "{name}" >> "{calls}"\n/bin/cat "{bin_dir / name}.txt"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return calls


def time_monitor(root: Path, env: dict[str, str], *extra: str) -> tuple[float, dict]:
    """Wall seconds of one ``decon monitor``, and its --json answer (the table: its n_runs)."""
    table = "--table" in extra
    args = [a for a in extra if a != "--table"] + ([] if table else ["--json"])
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "deconcnn_cli", "monitor", "--root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"monitor failed: {proc.stderr}")
    if table:
        first = proc.stdout.splitlines()[0]  # "<grid>: <n> runs  ..."
        return wall, {"n_runs": int(first.split(": ")[1].split()[0])}
    return wall, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[216, 10_000])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    try:
        print(
            f"{'runs':>6} {'jobs':>5} {'refresh':>8} {'wall s (best/median)':>21} "
            f"{'sched calls':>11} {'target':>7}"
        )
        for n in args.sizes:
            root = tmp / f"sweep{n}"
            t0 = time.perf_counter()
            job_ids = write_sweep(root, n)
            write_s = time.perf_counter() - t0
            calls = write_fake_scheduler(tmp / f"bin{n}", job_ids)
            env = {
                **os.environ,
                "PATH": f"{tmp / f'bin{n}'}:{os.environ.get('PATH', '')}",
                "OMP_NUM_THREADS": "1",
                "COLUMNS": "80",
            }
            counts: dict = {}
            for label, extra in (
                ("cold", ("--refresh",)),
                ("cached", ()),
                ("table80", ("--table",)),
            ):
                walls, per_refresh = [], []
                for _ in range(args.reps):
                    before = len(calls.read_text().splitlines())
                    wall, out = time_monitor(root, env, *extra)
                    walls.append(wall)
                    per_refresh.append(len(calls.read_text().splitlines()) - before)
                    assert out["n_runs"] == n
                    counts = out.get("counts", counts)
                walls.sort()
                target = TARGET_S.get(n)
                ok = "" if target is None else ("ok" if walls[0] < target else "MISSED")
                print(
                    f"{n:>6} {len(job_ids):>5} {label:>8} "
                    f"{walls[0]:>10.3f} / {walls[len(walls) // 2]:<8.3f} "
                    f"{max(per_refresh):>11} {f'<{target:g}s ' + ok if target else '':>7}"
                )
            print(
                f"       (writing the {n}-run sweep took {write_s:.1f} s; counts "
                f"{json.dumps({k: v for k, v in counts.items() if v})})"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
