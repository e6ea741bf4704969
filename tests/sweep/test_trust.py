"""`submit` and `recover` warn when others may write into the sweep root."""

from __future__ import annotations

import os
from pathlib import Path

from deconcnn_cli.sweep.trust import writable_by_others
from tests.conftest import run_cli
from tests.sweep.test_submit import _seed_sweep


def _tighten(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o755)
        for f in files:
            os.chmod(Path(folder, f), 0o644)


def test_group_or_world_writable_roots_runs_and_pickles_are_found(tmp_path: Path):
    store, _ = _seed_sweep(tmp_path)
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
    store, grid = _seed_sweep(tmp_path)
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
