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
from tests.conftest import REPO, run_cli


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
def test_recover_submits_missing_retries_failed_and_reruns_oom_alone(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    proc = run_cli("submit", "--grid", "smoke", "--executor", "local", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    wait_all_final(root)
    wait_runners_gone(root)
    gone, broken, oom = sorted(p for p in (root / "runs").iterdir())[:3]
    shutil.rmtree(gone)
    for run, exc in ((broken, "ValueError"), (oom, "OutOfMemoryError")):
        status = json.loads((run / "status.json").read_text())
        status.update(state="failed", exception_type=exc, reason=f"{exc}: boom")
        (run / "status.json").write_text(json.dumps(status))
    config_before = (oom / "config.json").read_text()
    assert run_cli("verify", "--root", str(root)).returncode == 1

    plan = json.loads(run_cli("recover", "--dry-run", "--json", "--root", str(root)).stdout)
    assert {a["run_id"]: a["action"] for a in plan["actions"]} == {
        gone.name: "submit",
        broken.name: "retry",
        oom.name: "alone",
    }
    proc = run_cli("recover", "--root", str(root))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((root / "sweep.json").read_text())
    by_reason = {s.get("reason"): s for s in manifest["submissions"][1:]}
    assert sorted(by_reason) == [
        "recover: 1 exception, 1 not_started",
        "recover: 1 oom_cuda (rerun alone on its GPU; batch size and config unchanged)",
    ]
    pair = by_reason["recover: 1 exception, 1 not_started"]
    assert sorted(pair["jobs"][0]["run_ids"]) == sorted([gone.name, broken.name])
    alone = by_reason[
        "recover: 1 oom_cuda (rerun alone on its GPU; batch size and config unchanged)"
    ]
    assert alone["alone"] is True and alone["jobs"][0]["run_ids"] == [oom.name]
    log = [json.loads(x) for x in (root / "recover.jsonl").read_text().splitlines()]
    assert {(x["run_id"], x["action"]) for x in log} == {
        (gone.name, "submit"),
        (broken.name, "retry"),
        (oom.name, "alone"),
    }

    assert wait_all_final(root)["completed"] == 4
    proc = run_cli("verify", "--root", str(root))
    assert proc.returncode == 0, proc.stdout
    assert (oom / "config.json").read_text() == config_before  # nothing measured changed
    # recovering a recovered sweep does nothing
    again = json.loads(run_cli("recover", "--json", "--root", str(root)).stdout)
    assert again["actions"] == [] and again["new_jobs"] == {}


@pytest.mark.slow
def test_a_resource_profile_given_as_a_path_is_found_again_by_recover(tmp_path: Path) -> None:
    """The sweep records the profile's absolute path (a name only for shipped profiles), so
    recover from another directory, without --resources, submits with the same file."""
    mine = tmp_path / "profiles"
    mine.mkdir()
    (mine / "laptop.toml").write_text((REPO / "profiles" / "resources" / "local.toml").read_text())
    root = tmp_path / "sweep"
    proc = run_cli(
        "submit", "--grid", "smoke", "--resources", "profiles/laptop.toml", "--root", str(root),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((root / "sweep.json").read_text())
    assert manifest["submissions"][0]["resources"] == str((mine / "laptop.toml").resolve())
    wait_all_final(root)
    wait_runners_gone(root)
    shutil.rmtree(sorted((root / "runs").iterdir())[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("recover", "--root", str(root), cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((root / "sweep.json").read_text())
    assert [s["resources"] for s in manifest["submissions"]] == [
        str((mine / "laptop.toml").resolve())
    ] * 2
    assert wait_all_final(root)["completed"] == 4


def test_a_shipped_resource_profile_is_recorded_by_name() -> None:
    from deconcnn_cli.sweep.profiles import load_resources

    assert load_resources("local").reference == "local"
    shipped = REPO / "profiles" / "resources" / "local.toml"
    assert load_resources(str(shipped)).reference == "local"


def test_a_killed_run_of_a_live_local_runner_is_seen_at_the_next_look(tmp_path: Path) -> None:
    """The runner goes on with its other runs; the run whose training process was SIGKILLed
    still says `running` with a fresh heartbeat. Its owner pid is gone on this host: monitor
    calls it interrupted at once (it said running for two minutes, a slot too many busy) and
    recover releases and resumes it."""
    import socket
    import subprocess

    from tests.sweep.synthetic import write_sweep

    root = tmp_path / "sweep"
    syn = write_sweep(root, 4)
    (rid,) = [r for r, s in syn.states.items() if s == "running"]
    killed = subprocess.Popen(["sleep", "60"])
    killed.kill()
    killed.wait()
    host, run_dir = socket.gethostname(), root / "runs" / rid
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "host": host, "pid": killed.pid}))
    (run_dir / "owner.json").write_text(json.dumps({"host": host, "pid": killed.pid}))
    row = {r.run_id: r for r in observe_sweep(root).rows}[rid]
    assert (row.state, row.cause) == ("interrupted", "interrupted"), row
    assert f"pid {killed.pid} on {host}) is gone" in row.detail
    plan = run_cli("recover", "--dry-run", "--json", "--root", str(root))
    (action,) = [a for a in json.loads(plan.stdout)["actions"] if a["run_id"] == rid]
    assert action["action"] == "resume" and action["release"], action
