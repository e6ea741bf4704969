"""`submit` and `recover` warn when others may write into the sweep root."""

from __future__ import annotations

import json
import os
from pathlib import Path

from deconcnn_cli.fileio import read_json
from deconcnn_cli.sweep.trust import writable_by_others
from tests.conftest import run_cli
from tests.sweep.fakes import seed_sweep


def _tighten(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for f in files:
            os.chmod(Path(folder, f), 0o644)


def test_group_or_world_writable_roots_runs_and_pickles_are_found(tmp_path: Path):
    store, _ = seed_sweep(tmp_path)
    _tighten(store.root)
    assert writable_by_others(store.root) == []
    run = sorted(store.runs_dir.iterdir())[0]
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "ckpt_000000010.pt"
    ckpt.write_bytes(b"x")
    pickle = store.jobs_dir / "123" / "123_submitted.pkl"
    pickle.parent.mkdir(parents=True)
    pickle.write_bytes(b"x")
    for path in (store.jobs_dir, pickle.parent):
        os.chmod(path, 0o755)
    os.chmod(pickle, 0o644)
    os.chmod(ckpt, 0o644)
    assert writable_by_others(store.root) == []
    os.chmod(store.root, 0o775)  # umask 002: the whole group
    os.chmod(run, 0o777)
    os.chmod(ckpt, 0o664)
    os.chmod(pickle, 0o666)
    os.chmod(run / "status.json", 0o666)  # not a file anything loads: not listed
    assert writable_by_others(store.root) == [store.root, run, ckpt, pickle]


def test_submit_and_recover_warn_about_a_group_writable_root(tmp_path: Path):
    store, grid = seed_sweep(tmp_path)
    _tighten(store.root)
    root = str(store.root)
    submit = ["submit", "--grid", str(grid), "--executor", "local", "--root", root]
    quiet = [run_cli(*submit, "--dry-run"), run_cli("recover", "--dry-run", "--root", root)]
    for proc in quiet:
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr
    run = sorted(store.runs_dir.iterdir())[1]
    os.chmod(run, 0o775)
    loud = [
        run_cli(*submit, "--dry-run"),
        run_cli(*submit),  # nothing to submit: every run is completed
        run_cli("recover", "--root", root),
        run_cli("recover", "--dry-run", "--json", "--root", root),
    ]
    for proc in loud:
        assert proc.returncode == 0, proc.stderr
        assert f"warning: 1 path(s) of sweep root {root} are group- or world-writable" in (
            proc.stderr
        )
        assert str(run) in proc.stderr and f"chmod -R go-w {root}" in proc.stderr
    assert loud[-1].stdout.startswith("{")  # --json stays one JSON document on stdout


def test_a_run_failed_on_a_planted_checkpoint_is_left_for_a_person(tmp_path: Path):
    """UnsafeCheckpointError is no transient: a retry would refuse the same file again, so
    recover never reruns the run (not even the one retry an exception gets): it names the
    cause and tells the person what to do, and submits nothing."""
    store, _ = seed_sweep(tmp_path)
    root = str(store.root)
    planted, plain = sorted(store.runs_dir.iterdir())[:2]
    ckpt = planted / "checkpoints" / "ckpt_000000030.pt"
    for run, exc, reason in (
        (planted, "UnsafeCheckpointError", f"checkpoint {ckpt} fails the safe load, so ..."),
        (plain, "ValueError", "ValueError: bad batch"),
    ):
        status = read_json(run / "status.json")
        status.update(state="failed", exception_type=exc, reason=reason)
        (run / "status.json").write_text(json.dumps(status))
    before = read_json(store.root / "sweep.json")
    plan = json.loads(run_cli("recover", "--dry-run", "--json", "--root", root).stdout)
    by_run = {a["run_id"]: a for a in plan["actions"]}
    assert by_run[planted.name]["cause"] == "unsafe_checkpoint"
    assert by_run[planted.name]["action"] == "person"
    assert str(ckpt) in by_run[planted.name]["why"]
    assert "delete it and its .sha256" in by_run[planted.name]["why"]
    assert by_run[plain.name]["action"] == "retry"  # an ordinary exception still gets one
    proc = run_cli("recover", "--root", root, planted.name)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # needs a person
    assert "unsafe_checkpoint" in proc.stdout
    after = read_json(store.root / "sweep.json")
    assert after["submissions"] == before["submissions"]  # nothing was resubmitted
    shown = run_cli("monitor", "--show-failed", "--root", root)
    assert "unsafe_checkpoint" in shown.stdout or str(ckpt) in shown.stdout, shown.stdout
