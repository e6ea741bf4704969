"""The sweep root: manifest round trip, run configs without torch, the lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest

from deconcnn_cli.config import config_hash, run_id
from deconcnn_cli.errors import RunDirError, SweepError
from deconcnn_cli.sweep.grid import expand_grid_runs, grid_hash
from deconcnn_cli.sweep.profiles import load_grid
from deconcnn_cli.sweep.store import LOCK_FILE, SweepStore
from deconcnn_cli.version import code_version


@pytest.fixture
def smoke_runs():
    return expand_grid_runs(load_grid("smoke"))


def test_manifest_round_trip_follows_the_contract(tmp_path, smoke_runs):
    store = SweepStore(tmp_path / "sweep")
    with pytest.raises(SweepError, match="sweep root .* does not exist"):
        store.read_manifest()
    runs = {r.run_id: r.manifest_entry() for r in smoke_runs}
    manifest = store.new_manifest("smoke", grid_hash(smoke_runs), runs)
    with store.lock():
        store.write_manifest(manifest)
        store.record_submission(
            manifest,
            executor="local",
            resources="local",
            jobs=[{"job_id": "local-1", "run_ids": list(runs)}],
        )
    back = json.loads(store.manifest_path.read_text())
    assert back["schema_version"] == 1 and back["grid"] == "smoke"
    assert back["grid_hash"] == grid_hash(smoke_runs)
    assert back["code_version"] == code_version() and "+g" in code_version()
    entry = back["runs"][smoke_runs[0].run_id]
    assert set(entry) == {"variant", "lr", "weight_decay", "seed", "config"}
    assert entry["config"]["data"]["dataset"] == "digits"
    (sub,) = back["submissions"]
    assert sub["jobs"] == [{"job_id": "local-1", "run_ids": list(runs)}]
    assert {"time_unix", "executor", "resources", "code_version"} <= set(sub)
    assert store.read_manifest() == back
    assert store.run_dir("x") == tmp_path / "sweep" / "runs" / "x"


def test_corrupt_manifest_is_refused(tmp_path):
    store = SweepStore(tmp_path)
    store.manifest_path.write_text("{not json")
    with pytest.raises(SweepError, match="unreadable"):
        store.read_manifest()


def test_run_config_is_written_like_train_and_checked(tmp_path, smoke_runs):
    store = SweepStore(tmp_path)
    cfg = smoke_runs[0].config
    target = store.write_run_config(cfg)
    saved = json.loads((target / "config.json").read_text())
    assert saved == {
        "run_id": run_id(cfg),
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
    }
    assert store.write_run_config(cfg) == target  # idempotent
    other = smoke_runs[1].config
    (target / "config.json").write_text(
        json.dumps({"run_id": run_id(cfg), "config_hash": config_hash(other), "config": {}})
    )
    with pytest.raises(RunDirError, match="different run"):
        store.write_run_config(cfg)


def test_run_config_matches_the_trainers_record(smoke_runs, tmp_path):
    from deconcnn_cli.training.rundir import config_record

    cfg = smoke_runs[0].config
    target = SweepStore(tmp_path).write_run_config(cfg)
    assert json.loads((target / "config.json").read_text()) == config_record(cfg)


def _hold(root, seconds, started):
    with SweepStore(root).lock():
        started.set()
        time.sleep(seconds)


def test_lock_excludes_a_second_holder_until_released(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    proc = ctx.Process(target=_hold, args=(tmp_path, 3.0, started))
    proc.start()
    try:
        assert started.wait(60)
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == proc.pid
        with (
            pytest.raises(SweepError, match="held by another decon"),
            SweepStore(tmp_path).lock(timeout_s=0.5),
        ):
            pass
        with SweepStore(tmp_path).lock(timeout_s=60):  # waits for the holder, then gets it
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        proc.join(30)


def test_lock_falls_back_to_an_exclusive_file_where_flock_is_refused(tmp_path, monkeypatch):
    import errno

    from deconcnn_cli import locking

    def no_flock(fd, path, timeout_s, busy):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking, "flock_wait", no_flock)
    excl = tmp_path / (LOCK_FILE + ".excl")
    with SweepStore(tmp_path).lock():
        assert json.loads(excl.read_text())["pid"] == os.getpid()
        with (
            pytest.raises(SweepError, match="held by") as info,
            SweepStore(tmp_path).lock(timeout_s=0.3),
        ):
            pass
        assert str(excl) in (info.value.hint or "")
    assert not excl.exists()
