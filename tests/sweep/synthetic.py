"""Sweeps of any size in every state, the shape of ``loss_lin_slope``, written fast.

Run ids are the real kind (``adamw_lr0.05_wd0.0001_s3_<hash>``); one run shares another's
readable prefix (its config differs elsewhere), so labels must show a hash. States cycle
through :data:`CYCLE`, so the first four runs are running, failed, pending and stalled.
Local sweeps: one live runner (this process) holds the queued and live runs, a gone runner
the interrupted ones. SLURM sweeps: two runs per job, arrays of at most 1,000 tasks, and the
``squeue``/``sacct`` text that answers for them (one pending job is held).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deconcnn_cli import contract, fileio
from tests.sweep.fakes import slurm_time

VARIANTS = ("base", "bn_off", "narrow", "adamw")
LRS = ("0.05", "0.1", "0.2")
WDS = ("0.0001", "0.001", "0.01")
CYCLE = (
    "running",
    "failed",
    "pending",
    "stalled",
    "interrupted",
    "diverged",
    "missing",
    "completed",
    "pending",
    "pending",
    "pending",
    "pending",
    "pending",
    "pending",
    "completed",
    "completed",
    "completed",
    "completed",
    "completed",
    "running",
    "completed",
)  # fmt: skip (21 long: each state meets every variant)
TOTAL_STEPS = 17_600
STEPS_PER_EPOCH = 352
RUN_S = 4000.0  # a completed run's wall time
RATE = 4.4  # a running run's steps per second
ARRAY_MAX = 1000
BASE_JOB = 700_000


@dataclass(frozen=True)
class Synthetic:
    root: Path
    states: dict[str, str]  # run id -> the state monitor must find
    squeue: str = ""
    sacct: str = ""


def run_ids(n: int) -> list[str]:
    ids = []
    for i in range(n):
        v, rest = VARIANTS[i % 4], i // 4
        lr, wd, seed = LRS[rest % 3], WDS[(rest // 3) % 3], rest // 9
        ids.append(f"{v}_lr{lr}_wd{wd}_s{seed}_{(i * 2654435761) % 16**10:010x}")
    if n > 8:  # run 8 reads as run 0 (its config differs elsewhere): labels need the hash
        ids[8] = ids[0].rsplit("_", 1)[0] + f"_{0xABCDEF0123:010x}"
    return ids


def _write_run(root: Path, rid: str, state: str, i: int, now: float) -> None:
    d = root / "runs" / rid
    d.mkdir(parents=True)
    step = TOTAL_STEPS if state == "completed" else (i * 137) % TOTAL_STEPS
    written = "running" if state == "stalled" else state
    beat = now - (contract.STALLED_AFTER_S + 60 if state == "stalled" else 2)
    status = {
        "state": written,
        "step": step,
        "epoch": step / STEPS_PER_EPOCH,
        "total_steps": TOTAL_STEPS,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "attempt": 1 + i % 3,
        "heartbeat_unix": beat,
        "steps_per_s": RATE,
        "device": "cpu",
        "reason": {"failed": "ValueError: bad batch", "interrupted": "signal SIGUSR2"}.get(state),
        "exception_type": "ValueError" if state == "failed" else None,
    }
    (d / contract.STATUS_FILE).write_text(json.dumps(status))
    start = now - RUN_S - 60 if state in ("completed", "diverged") else now - 600
    lines = [{"attempt": 1, "start_unix": start}]
    if state in ("completed", "diverged", "failed", "interrupted"):
        end = start + RUN_S if state == "completed" else now - 60
        lines.append({"attempt": 1, "event": "end", "state": written, "end_unix": end})
    (d / contract.ATTEMPTS_FILE).write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_sweep(root: Path, n: int, executor: str = "local", parallel_runs: int = 2) -> Synthetic:
    """A sweep root of ``n`` runs in every state (see the module's docstring)."""
    now = time.time()
    ids = run_ids(n)
    states = {rid: CYCLE[i % len(CYCLE)] for i, rid in enumerate(ids)}
    (root / "runs").mkdir(parents=True)
    (root / "jobs").mkdir()
    for i, rid in enumerate(ids):
        if states[rid] not in ("pending", "missing"):
            _write_run(root, rid, states[rid], i, now)
    by_state: dict[str, list[str]] = {}
    for rid in ids:
        by_state.setdefault(states[rid], []).append(rid)
    squeue, sacct = [], []
    if executor == "local":
        gone = subprocess.Popen(["true"])
        gone.wait()
        live_runs = [r for r in ids if states[r] not in ("interrupted", "missing")]
        jobs = [
            {"job_id": "local-20261203T080100-5b2c", "run_ids": live_runs, "pid": os.getpid()},
            {"job_id": "local-20261203T070000-9e01", "run_ids": by_state.get("interrupted", [])},
        ]
        jobs[1]["pid"] = gone.pid
        for job in jobs:
            job["host"] = socket.gethostname()
            spec = {"job_id": job["job_id"], "parallel_runs": parallel_runs}
            (root / "jobs" / f"{job['job_id']}.json").write_text(json.dumps(spec))
    else:
        sub = slurm_time(now - 3000)
        jobs, task = [], 0
        words = {
            "running": ("RUNNING", "RUNNING"),
            "stalled": ("RUNNING", "RUNNING"),
            "pending": ("PENDING", "PENDING"),
            "failed": (None, "FAILED"),
            "interrupted": (None, "TIMEOUT"),
            "completed": (None, "COMPLETED"),
            "diverged": (None, "COMPLETED"),
        }
        for state, rids in by_state.items():
            if state == "missing":
                continue
            for k in range(0, len(rids), 2):
                jid = f"{BASE_JOB + task // ARRAY_MAX}_{task % ARRAY_MAX}"
                task += 1
                jobs.append({"job_id": jid, "run_ids": rids[k : k + 2]})
                live, end = words[state]
                reason = "Priority"
                if state == "pending" and k == 0:
                    reason = "JobHeldAdmin"
                if live:
                    squeue.append(f"{jid}|{live}|{reason}|node1|{sub}")
                code = "1:0" if end == "FAILED" else "0:0"
                sacct.append(f"{jid}|{end}|{code}|{reason}|node1|{sub}|01:00:00")
    manifest = {
        "schema_version": 1,
        "grid": "loss_lin_slope",
        "grid_hash": "0" * 16,
        "code_version": "0.1.0+gtest",
        "created_unix": now - 7200,
        "runs": {r: {"variant": r.split("_lr")[0], "config": {}} for r in ids},
        "submissions": [
            {
                "time_unix": now - 3000,
                "executor": executor,
                "resources": "local" if executor == "local" else "rtx8000",
                "code_version": "0.1.0+gtest",
                "jobs": jobs,
            }
        ],
    }
    fileio.atomic_write_json(root / "sweep.json", manifest)
    text = "\n".join(squeue) + "\n", "\n".join(sacct) + "\n"
    return Synthetic(root, states, *text) if executor != "local" else Synthetic(root, states)
