"""Time from a stop signal to the exit, inside a cold curvature evaluation of the full-width
ResNet-18 on the CPU (issue 24).

Runs the README's digits example (``decon train --variant base ... --dataset digits --epochs
3``) as a real subprocess on ``--threads`` threads, waits until status.json says the step-0
curvature runs and ``--delays`` seconds more (inside the graph build, a Hessian-vector product
or the Lanczos bookkeeping), sends the signal and times the exit. Each stop is checked: the
exit code (128 + signal), ``interrupted`` with a checkpoint at step 0, no curvature row.
``SIGINT x2`` sends a second SIGINT 0.2 s after the first: the run ends at once (no checkpoint
if it was not written yet). Printed: the seconds from the signal to the cut-short event (the
evaluation abandoned), to the run's final status.json (checkpoint and status on disk: what a
SIGKILL after it cannot lose) and to the process's exit; the exit time over the evaluation's
length so far (the old code waited for the rest of the evaluation: it looked at a stop only
between steps). Beside them, ``teardown``: how long a bare ``python -c "import torch,
deconcnn_cli.training.loop"`` takes from its last line to its exit (interpreter finalization,
a fixed cost of every torch process, which a stopped ``decon train`` skips).

    python bench/bench_stop.py [--delays 5,20,60] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_RUN = [
    "train", "--variant", "base", "--lr", "0.1", "--wd", "1e-3", "--seed", "0",
    "--dataset", "digits", "--epochs", "3", "--set", "schedule.warmup_epochs=0.3",
]  # fmt: skip


def _status(root: Path) -> dict:
    for path in root.glob("*/status.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def stop_once(delay_s: float, signals: list[int], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cmd = [sys.executable, "-m", "deconcnn_cli", *README_RUN, "--root", str(root)]
        proc = subprocess.Popen(
            [*cmd, "--quiet", "--threads", str(threads)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        while _status(root).get("action") != "curvature":
            if proc.poll() is not None:
                raise SystemExit(f"the run ended first: {proc.stderr.read().decode()}")
            time.sleep(0.05)
        began = time.monotonic()
        time.sleep(delay_s)
        sent, sent_unix = time.monotonic(), time.time()
        proc.send_signal(signals[0])
        for extra in signals[1:]:
            time.sleep(0.2)
            proc.send_signal(extra)
        code = proc.wait(timeout=900)
        exited = time.monotonic()
        run = next(p for p in root.iterdir() if p.is_dir())
        status = json.loads((run / "status.json").read_text())
        rows = run / "metrics" / "curvature.csv"
        curvature = rows.read_text().splitlines() if rows.exists() else ["header"]
        events = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]
        cut = [e["time"] - sent_unix for e in events if "cut short" in e["message"]]
        ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.pt"))
    return {
        "exit_s": exited - sent,
        "recorded_s": status["heartbeat_unix"] - sent_unix,  # the final status.json write
        "in_eval_s": sent - began,
        "code": code,
        "state": status["state"],
        "checkpoints": ckpts,
        "curvature_rows": len(curvature) - 1,
        "cut_s": cut[0] if cut else None,  # the cut-short event: the evaluation abandoned
    }


def teardown_s() -> float:
    """Seconds from the last line of a process that imported torch and the loop to its exit."""
    code = "import time, torch, deconcnn_cli.training.loop; print(time.time(), flush=True)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    return time.time() - float(proc.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delays", default="5,20,60", help="seconds into the curvature, comma list")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default="SIGTERM,SIGINT x2", help="comma list")
    args = ap.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    cases = [("SIGTERM", [signal.SIGTERM]), ("SIGINT x2", [signal.SIGINT, signal.SIGINT])]
    print(f"full-width ResNet-18, digits, cold step-0 curvature, {args.threads} thread(s)")
    head = f"{'signal':>10} {'in eval':>8} {'cut':>6} {'recorded':>9} {'to exit':>8} {'ratio':>7}"
    print(f"{head} {'teardown':>9}  exit  state / files")
    for name, sigs in [c for c in cases if c[0] in args.cases.split(",")]:
        for delay in delays if name == "SIGTERM" else delays[:1]:
            r = stop_once(delay, sigs, args.threads)
            ratio = r["exit_s"] / r["in_eval_s"]
            cut = "-" if r["cut_s"] is None else f"{r['cut_s']:.2f}s"  # None: ended before it
            print(
                f"{name:>10} {r['in_eval_s']:7.1f}s {cut:>6} {r['recorded_s']:8.2f}s "
                f"{r['exit_s']:7.2f}s "
                f"{ratio:7.3f} {teardown_s():8.2f}s  "
                f"{r['code']:>4}  {r['state']}, checkpoints {r['checkpoints']}, "
                f"curvature rows {r['curvature_rows']}"
            )


if __name__ == "__main__":
    main()
