"""Hand-made sweep roots and fake ``squeue``/``sacct`` executables (the subprocess boundary)."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from deconcnn_cli import contract, fileio
from deconcnn_cli.sweep.grid import expand_grid_runs, grid_hash
from deconcnn_cli.sweep.profiles import load_grid
from deconcnn_cli.sweep.store import SweepStore
from tests.factories import tiny_grid


def install_fake_scheduler(
    monkeypatch: pytest.MonkeyPatch,
    bin_dir: Path,
    *,
    squeue: str | None = "",
    sacct: str | None = "",
    sacct_rc: int = 0,
    sacct_err: str = "",
) -> Path:
    """Put ``squeue``/``sacct`` on PATH that print recorded text and log each call.

    ``None`` leaves a command out (not installed). Returns the call log (one line per call).
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "calls.log"
    calls.touch()
    for name, text, rc, err in (("squeue", squeue, 0, ""), ("sacct", sacct, sacct_rc, sacct_err)):
        if text is None:
            continue
        (bin_dir / f"{name}.txt").write_text(text)
        script = bin_dir / name
        script.write_text(
            "#!/bin/sh\n"
            f'echo "{name} $*" >> "{calls}"\n'
            f'/bin/cat "{bin_dir / name}.txt"\n'
            f'echo "{err}" >&2\n'
            f"exit {rc}\n"
        )
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    # only the fake directory: a real SLURM on this machine must not answer
    monkeypatch.setenv("PATH", str(bin_dir))
    return calls


def calls_made(calls: Path) -> list[str]:
    return calls.read_text().splitlines()


def write_manifest(
    root: Path,
    run_ids: list[str],
    jobs: list[tuple[str, list[str]]] | None = None,
    *,
    executor: str = "slurm",
    time_unix: float | None = None,
    code_version: str = "0.1.0+gtest",
) -> Path:
    """A sweep.json as docs/sweep-root.md has it (configs left out unless given)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)
    manifest: dict[str, Any] = {
        "schema_version": 1,
        "grid": "test",
        "grid_hash": "0" * 16,
        "code_version": code_version,
        "created_unix": time.time() - 3600,
        "runs": {r: {"variant": "base", "config": {}} for r in run_ids},
        "submissions": [],
    }
    if jobs is not None:
        manifest["submissions"].append(
            {
                "time_unix": time.time() - 3600 if time_unix is None else time_unix,
                "executor": executor,
                "resources": "test",
                "code_version": code_version,
                "jobs": [{"job_id": j, "run_ids": rs} for j, rs in jobs],
            }
        )
    fileio.atomic_write_json(root / "sweep.json", manifest)
    return root


def write_run(
    root: Path,
    run_id: str,
    state: str,
    *,
    step: int = 10,
    total_steps: int = 100,
    heartbeat_age_s: float = 1.0,
    attempts: list[dict[str, Any]] | None = None,
    **status: Any,
) -> Path:
    """A run directory holding only status.json (+ attempts.jsonl)."""
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    fileio.atomic_write_json(
        run_dir / contract.STATUS_FILE,
        {
            "state": state,
            "step": step,
            "epoch": step / 10,
            "total_steps": total_steps,
            "steps_per_epoch": 10,
            "attempt": len(attempts or []) or 1,
            "heartbeat_unix": now - heartbeat_age_s,
            "steps_per_s": 2.0,
            **status,
        },
    )
    lines = attempts if attempts is not None else [{"attempt": 1, "start_unix": now - 3600}]
    with open(run_dir / contract.ATTEMPTS_FILE, "w") as f:
        for rec in lines:
            f.write(json.dumps(rec) + "\n")
    return run_dir


def tree_snapshot(root: Path) -> dict[str, float]:
    """Every file under root with its mtime: to show a command changed nothing."""
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*") if p.is_file()}


def slurm_time(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(unix))


def start_job_on_a_long_run(
    root: Path, env: dict[str, str] | None = None, **group: Any
) -> tuple[Any, Path]:
    """A real job process (``RunGroup`` in a subprocess, its real ``decon train`` child) on
    one 60-epoch smoke run under ``root``, returned once the run has trained a step (so a
    signal then finds it mid-run): (the process, the run directory). ``group``: extra
    ``RunGroup`` arguments (``mps=True``); ``env`` on top of this environment."""
    import os
    import subprocess
    import sys

    cfg = expand_grid_runs(load_grid("smoke"))[0].config
    long = cfg.model_copy(update={"schedule": cfg.schedule.model_copy(update={"epochs": 60})})
    run_dir = SweepStore(root).write_run_config(long)
    extra = "".join(f", {k}={v!r}" for k, v in group.items())
    code = (
        "from deconcnn_cli.sweep.job import RunGroup; "
        f"RunGroup([{str(run_dir)!r}], max_attempts=2{extra})()"
    )
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=full_env)  # fmt: skip
    deadline = time.monotonic() + 300
    while contract.view_run(run_dir).steps_done < 1:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    return proc, run_dir


TINY_GRID = tiny_grid("tiny")


def seed_sweep(tmp_path: Path, text: str = TINY_GRID) -> tuple[SweepStore, Path]:
    """A sweep root made from the grid file, with every run marked completed (no training)."""
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    spec = load_grid(str(path))
    runs = expand_grid_runs(spec)
    store = SweepStore(tmp_path / "sweep")
    manifest = store.new_manifest(
        "tiny", grid_hash(runs), {r.run_id: r.manifest_entry() for r in runs}
    )
    manifest["grid_spec"] = spec.model_dump(mode="json")
    store.write_manifest(manifest)
    for r in runs:
        mark_state(store.write_run_config(r.config), "completed")
    return store, path


def mark_state(run_dir: Path, state: str) -> None:
    fileio.atomic_write_json(
        run_dir / contract.STATUS_FILE,
        {"state": state, "step": 5, "heartbeat_unix": time.time(), "reason": "RuntimeError: x"},
    )
