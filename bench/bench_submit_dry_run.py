"""Wall time, CPU time and peak memory of ``decon submit --dry-run`` at 10^4 and 10^5 runs.

Writes a grid TOML of N runs (one variant, 100 lr x 10 weight decay x N/1000 seeds, the
`smoke` profile) and runs the real CLI in a subprocess on a fresh root (local executor: no
scheduler), reading each child's own CPU time and peak RSS from ``os.wait4``. Prints both
sizes side by side and their ratios (linear growth: 10x runs -> ~10x time, memory at most
10x), the target (a few seconds per 10^4 runs, in CPU seconds: wall time on a shared machine
moves with its load), and the time to refuse a 10^7-run grid (counted, never expanded:
under a second after start-up). Torch is never loaded. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_submit_dry_run.py [--sizes 10000 100000]
        [--code CHECKOUT]   (another checkout's package, e.g. the code before a change)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_S_PER_1E4 = 5.0  # "a few seconds per 10^4 runs" (issue 14)


def grid_toml(name: str, lrs: int, wds: int, seeds: int) -> str:
    lr = ", ".join(f"{0.001 * (i + 1):g}" for i in range(lrs))
    wd = ", ".join(f"{1e-6 * (i + 1):g}" for i in range(wds))
    seed = ", ".join(str(i) for i in range(seeds))
    return (
        f'name = "{name}"\nvariants = ["base"]\nprofiles = ["smoke"]\n'
        f"[axes]\nlr = [{lr}]\nweight_decay = [{wd}]\nseed = [{seed}]\n"
    )


def run(grid: Path, root: Path, code: Path = REPO) -> tuple[float, float, float, int, str]:
    """(wall s, CPU s, peak RSS MB, exit code, last line of output) of one dry run of the
    package in ``code``. CPU seconds (user + system, from ``wait4``) move far less than wall
    time with the load other users put on a shared machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    args = [sys.executable, "-m", "deconcnn_cli", "submit", "--grid", str(grid)]
    args += ["--executor", "local", "--root", str(root), "--dry-run"]
    start = time.perf_counter()
    proc = subprocess.Popen(  # cwd: `-m` puts it first on sys.path
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=code
    )
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, proc.returncode, lines[-1] if lines else ""


def startup() -> float:
    """Seconds for ``decon --help`` (the interpreter and CLI import, paid by every command)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "deconcnn_cli", "--help"], env=env,
                   capture_output=True, check=True)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose package to run")
    ap.add_argument(
        "--no-huge",
        action="store_true",
        help="skip the 10^7-run grid (code that does not count first would expand it until "
        "memory runs out)",
    )
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for n in a.sizes:
            grid = base / f"g{n}.toml"
            grid.write_text(grid_toml(f"bench{n}", 100, 10, n // 1000))
            wall, cpu, rss, code, last = run(grid, base / f"root{n}", a.code)
            assert code == 0, last
            results[n] = (wall, cpu, rss)
            per = cpu / n * 1e4
            print(f"{n:>7,} runs: wall {wall:6.1f} s  CPU {cpu:6.1f} s  peak {rss:6.0f} MB  "
                  f"(CPU {per:.2f} s per 10^4)")  # fmt: skip
        if not a.no_huge:
            huge = base / "huge.toml"
            huge.write_text(grid_toml("huge", 200, 200, 250))  # 10^7 runs, the grid
            wall, cpu, rss, code, last = run(huge, base / "roothuge", a.code)
            up = startup()
            print(f"10^7 runs: refused in {wall:.2f} s (start-up alone {up:.2f} s), exit "
                  f"{code}, peak {rss:.0f} MB: {last}")  # fmt: skip
    if len(a.sizes) >= 2:
        lo, hi = a.sizes[0], a.sizes[-1]
        (w0, c0, m0), (w1, c1, m1) = results[lo], results[hi]
        print(f"ratios {hi:,}/{lo:,} runs ({hi / lo:g}x): wall {w1 / w0:.2f}x, CPU {c1 / c0:.2f}x, "
              f"peak memory {m1 / m0:.2f}x")  # fmt: skip
    worst = max(c / n * 1e4 for n, (_, c, _) in results.items())
    verdict = "PASS" if worst <= TARGET_S_PER_1E4 else "FAIL"
    print(f"target <= {TARGET_S_PER_1E4} CPU s per 10^4 runs: worst {worst:.2f} -> {verdict}")


if __name__ == "__main__":
    main()
