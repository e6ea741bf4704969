"""monitor, recover and verify against a real SLURM (scripts/slurm-local/start.sh).

One sweep of two runs sharing a fake GPU (one job). Mid-run the job is `scancel`ed (the runs
checkpoint on SIGTERM); after recover, the resumed job is `scancel --signal=KILL`ed mid-run.
"Mid-run" whatever the machine's speed: the runs are held at two steps (``$DECON_HOLD``,
contract.py) until the signal comes, and let go only before the last recover.
Each time monitor must report both runs from the scheduler at once (no waiting for a stale
heartbeat) and recover must resume them; the sweep then completes, verify passes on it and
fails on a truncated stream and on a missing run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from deconcnn_cli import contract, runenv
from deconcnn_cli.sweep.monitor import observe_sweep
from tests.conftest import run_cli
from tests.factories import tiny_grid

pytestmark = pytest.mark.slurm

GRID = tiny_grid(
    "slurm_observe",
    description="two tiny runs, long enough to be cancelled mid-run",
    epochs=6,
)


# held after 5 steps (first job) and 31 (the resumed job): each time mid-epoch, on no boundary
FIRST_HOLD, SECOND_HOLD = 5, 31


def _poll(root: Path, until, what: str, timeout_s: float = 420):  # noqa: ANN001, ANN202
    deadline = time.time() + timeout_s
    report = None
    while time.time() < deadline:
        report = observe_sweep(root, refresh=True)
        if until(report):
            return report
        time.sleep(2)
    rows = [(r.run_id, r.state, r.step, r.detail) for r in report.rows] if report else None
    raise AssertionError(f"timed out waiting for {what}: {rows}")


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True
    )
    return out.stdout.strip().split(" ")[0] if out.stdout.strip() else ""


def _squeue_lists(job_ids: list[str]) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True, text=True
    )
    return bool(out.stdout.strip())


def _cancel_when_held(root: Path, scancel_args: list[str], held_at: int) -> str:
    """Wait until every run of one job is held at step ``held_at``, then scancel that job."""
    report = _poll(
        root,
        lambda r: (
            all(x.state == "running" and x.step == held_at for x in r.rows)
            and len({x.job_id for x in r.rows}) == 1
        ),
        f"both runs held at step {held_at} in their job",
    )
    job_id = report.rows[0].job_id
    subprocess.run(["scancel", *scancel_args, job_id], check=True)
    deadline = time.time() + 120
    while time.time() < deadline and _sacct_state(job_id) != "CANCELLED":
        time.sleep(1)
    return job_id


def _monitor_says_cancelled(root: Path) -> dict[str, dict]:
    out = json.loads(run_cli("monitor", "--json", "--refresh", "--root", str(root)).stdout)
    assert out["scheduler"]["calls"] == 2 and not out["scheduler"]["degraded"]
    rows = {r["run_id"]: r for r in out["runs"]}
    for row in rows.values():
        # told by the scheduler alone: the run's own status may still say running here
        assert (row["state"], row["cause"]) == ("interrupted", "cancelled"), row
        assert row["step"] < row["total_steps"]
    return rows


def _recover(root: Path, job_id: str, run_ids: set[str], env: dict[str, str]) -> dict[str, dict]:
    """One recover resubmits every run at once: after a KILL too, whose fresh heartbeat is a
    dead process's last once the scheduler says its job ended (the run is released)."""
    deadline = time.time() + 120
    while time.time() < deadline and _squeue_lists([job_id]):
        time.sleep(1)  # let the cancelled job's processes end before resubmitting
    proc = run_cli("recover", "--json", "--root", str(root), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    actions = {a["run_id"]: a for a in out["actions"]}
    assert all(a["cause"] == "cancelled" for a in actions.values()), actions
    assert all(a["action"] == "resume" for a in actions.values()), actions
    assert set(out["new_jobs"]) == run_ids
    return actions


def test_cancel_and_kill_are_reported_recovered_and_verified(tmp_path: Path) -> None:
    grid = tmp_path / "slurm_observe.toml"
    grid.write_text(GRID)
    root = tmp_path / "sweep"
    release = tmp_path / "release"
    held = {runenv.HOLD_ENV: f"{FIRST_HOLD},{SECOND_HOLD}:{release}"}
    try:
        _cancel_kill_recover_verify(tmp_path, grid, root, held, release)
    except BaseException:  # a failed test leaves no job busy for the next one
        _cancel_jobs(root)
        raise
    finally:  # nor a run waiting
        release.touch()


def _cancel_jobs(root: Path) -> None:
    manifest = root / "sweep.json"
    if not manifest.is_file():
        return
    subs = json.loads(manifest.read_text()).get("submissions", [])
    ids = [str(j["job_id"]) for sub in subs for j in sub.get("jobs", [])]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def _cancel_kill_recover_verify(
    tmp_path: Path, grid: Path, root: Path, held: dict[str, str], release: Path
) -> None:
    proc = run_cli(
        "submit",
        "--grid",
        str(grid),
        "--resources",
        "slurm_local",
        "--executor",
        "slurm",
        "--root",
        str(root),
        env=held,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # 1. a user's scancel (SIGTERM: the runs checkpoint) -> reported -> recovered
    first = _cancel_when_held(root, [], FIRST_HOLD)
    rows = _monitor_says_cancelled(root)
    text = run_cli("monitor", "--show-failed", "--root", str(root)).stdout
    assert "interrupted, cause cancelled" in text and "decon recover" in text
    _recover(root, first, set(rows), held)

    # 2. scancel --signal=KILL mid-run of the resumed job -> reported -> recovered again
    second = _cancel_when_held(root, ["--signal=KILL"], SECOND_HOLD)
    assert second != first
    _monitor_says_cancelled(root)
    release.touch()  # resumed from an earlier checkpoint, the runs pass SECOND_HOLD again
    actions = _recover(root, second, set(rows), held)
    for rid, action in actions.items():  # a run the KILL left "running" was released
        if action["release"]:
            events = contract.read_events(root / "runs" / rid)
            assert any(e.get("by") == "decon recover" for e in events), events

    _poll(root, lambda r: all(x.state == "completed" for x in r.rows), "completion")
    for rid in rows:
        starts = contract.read_attempt_starts(root / "runs" / rid)
        assert len(starts) >= 3 and starts[-1]["resumed_from_step"] > 0, starts
        assert starts[1]["resumed_from_step"] == FIRST_HOLD, starts  # the SIGTERM's checkpoint
    log = [json.loads(x) for x in (root / "recover.jsonl").read_text().splitlines()]
    assert sorted(x["run_id"] for x in log) == sorted([*rows, *rows])  # each run twice

    proc = run_cli("verify", "--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    a, b = sorted(rows)
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    step_csv = contract.stream_path(broken / "runs" / a, "step")
    step_csv.write_text("".join(step_csv.read_text().splitlines(keepends=True)[:-3]))
    shutil.rmtree(broken / "runs" / b)
    proc = run_cli("verify", "--json", "--root", str(broken))
    assert proc.returncode == 1
    kinds = {(p["run_id"], p["kind"]) for p in json.loads(proc.stdout)["problems"]}
    assert kinds == {(a, "stream_gap"), (b, "missing_run")}
