"""decon recover end to end on the local executor (no SLURM): real runs broken, recovered,
verified."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from deconcnn_cli.sweep.monitor import observe_sweep
from tests.conftest import run_cli


def wait_all_final(root: Path, timeout_s: float = 600) -> dict[str, int]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        report = observe_sweep(root, refresh=True)
        if all(r.state in ("completed", "diverged") for r in report.rows):
            return report.counts
        stuck = [r for r in report.rows if r.state in ("failed", "missing", "stalled")]
        assert not stuck, [(r.run_id, r.state, r.detail) for r in stuck]
        time.sleep(2)
    raise AssertionError(f"sweep at {root} not final after {timeout_s} s")


def wait_runners_gone(root: Path, timeout_s: float = 60) -> None:
    """The local runners exit a moment after their last run ends."""
    manifest = json.loads((root / "sweep.json").read_text())
    pids = [j["pid"] for s in manifest["submissions"] for j in s["jobs"] if "pid" in j]
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"local runners {alive} still alive")


@pytest.mark.slow
def test_recover_submits_missing_and_retries_failed(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    proc = run_cli("submit", "--grid", "smoke", "--executor", "local", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    wait_all_final(root)
    wait_runners_gone(root)
    gone, broken = sorted(p for p in (root / "runs").iterdir())[:2]
    shutil.rmtree(gone)
    status = json.loads((broken / "status.json").read_text())
    status.update(state="failed", exception_type="ValueError", reason="ValueError: boom")
    (broken / "status.json").write_text(json.dumps(status))
    assert run_cli("verify", "--root", str(root)).returncode == 1

    plan = json.loads(run_cli("recover", "--dry-run", "--json", "--root", str(root)).stdout)
    assert {a["run_id"]: a["action"] for a in plan["actions"]} == {
        gone.name: "submit",
        broken.name: "retry",
    }
    proc = run_cli("recover", "--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((root / "sweep.json").read_text())
    last = manifest["submissions"][-1]
    assert last["reason"] == "recover: 1 exception, 1 not_started"
    assert sorted(last["jobs"][0]["run_ids"]) == sorted([gone.name, broken.name])
    log = [json.loads(x) for x in (root / "recover.jsonl").read_text().splitlines()]
    assert {(x["run_id"], x["action"]) for x in log} == {
        (gone.name, "submit"),
        (broken.name, "retry"),
    }

    assert wait_all_final(root)["completed"] == 4
    proc = run_cli("verify", "--root", str(root))
    assert proc.returncode == 0, proc.stdout
    # recovering a recovered sweep does nothing
    again = json.loads(run_cli("recover", "--json", "--root", str(root)).stdout)
    assert again["actions"] == [] and again["new_jobs"] == {}
