"""decon export --tensorboard DIR: a sweep's event files rebuilt from its streams."""

from __future__ import annotations

import shlex
from pathlib import Path

from deconcnn_cli.export.publish import MARK_FILE
from tests.conftest import run_cli
from tests.export.synthetic import write_grid
from tests.sweep.synthetic import write_sweep
from tests.tensorboard_check import assert_events_match_streams


def test_export_writes_every_runs_events_equal_to_its_streams(tmp_path: Path):
    root = tmp_path / "sweep"
    runs = write_grid(root, seeds=1, steps=60, steps_per_epoch=10, curvature_every=20)
    out, tb = tmp_path / "results.csv", tmp_path / "tb"
    proc = run_cli("export", str(out), "--root", str(root), "--tensorboard", str(tb))
    assert proc.returncode == 0, proc.stderr
    exported = sorted(p.name for p in tb.iterdir() if p.is_dir())
    with_dirs = sorted(r for r in runs if (root / "runs" / r).is_dir())
    assert exported == with_dirs and len(exported) >= 30
    for run_id in exported:
        assert_events_match_streams(root / "runs" / run_id, tb / run_id)
    assert f"curves:      tensorboard --logdir {shlex.quote(str(tb))}" in proc.stdout
    # again, with --force: replaced whole (it carries export's mark)
    again = run_cli("export", str(out), "--root", str(root), "--tensorboard", str(tb), "--force")
    assert again.returncode == 0, again.stderr
    assert (tb / MARK_FILE).is_file()
    assert_events_match_streams(root / "runs" / exported[0], tb / exported[0])


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path: Path):
    root = tmp_path / "sweep"
    write_grid(root, seeds=1, steps=40, steps_per_epoch=10)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    args = ["export", str(tmp_path / "r.csv"), "--root", str(root), "--tensorboard", str(mine)]
    proc = run_cli(*args, "--force")
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    inside = ["--tensorboard", str(root / "runs" / "tb")]
    proc = run_cli("export", str(tmp_path / "s.csv"), "--root", str(root), *inside)
    assert proc.returncode == 2 and "sweep root" in proc.stderr, proc.stderr


def test_monitor_prints_the_tensorboard_line(tmp_path: Path):
    syn = write_sweep(tmp_path / "sweep", 10, "local")
    proc = run_cli("monitor", "--root", str(syn.root), env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    line = f"curves: tensorboard --logdir {shlex.quote(str(syn.root / 'runs'))}"
    assert proc.stdout.rstrip().splitlines()[-1] == line
