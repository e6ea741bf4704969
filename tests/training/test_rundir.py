"""Owning a run directory (flock, owner.json, no-flock fallback), threads and exit codes."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deconcnn_cli.contract import EXIT_OWNED, OWNER_FILE, STALLED_AFTER_S, exit_code_for
from deconcnn_cli.errors import RunOwnedError
from deconcnn_cli.fileio import read_json
from deconcnn_cli.locking import owner_is_live
from deconcnn_cli.runenv import default_threads
from deconcnn_cli.training.rundir import own_run

HOST = socket.gethostname()


@pytest.fixture
def sleeper():
    """A live process on this host that is not us."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _write_owner(run: Path, **owner) -> None:
    (run / OWNER_FILE).write_text(json.dumps(owner))


def test_owner_file_while_owned_and_removed_after(tmp_path: Path):
    with own_run(tmp_path) as mode:
        owner = read_json(tmp_path / OWNER_FILE)
        assert mode == "flock" and owner["pid"] == os.getpid() and owner["host"] == HOST
    assert not (tmp_path / OWNER_FILE).exists()


def test_a_second_process_on_this_host_is_refused_by_flock(tmp_path: Path):
    code = (
        "import sys; from pathlib import Path; from deconcnn_cli.training.rundir import own_run\n"
        "from deconcnn_cli.errors import RunOwnedError\n"
        "try:\n    with own_run(Path(sys.argv[1])): pass\n"
        "except RunOwnedError as e:\n    print(e.message); sys.exit(e.exit_code)\n"
    )
    with own_run(tmp_path):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True)
    assert proc.returncode == EXIT_OWNED == 4
    assert f"pid {os.getpid()} on {HOST}" in proc.stdout.decode()


def test_a_dead_owner_on_this_host_is_taken_over(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_owner(tmp_path, host=HOST, pid=dead.pid, claimed_unix=time.time())
    with own_run(tmp_path):
        assert read_json(tmp_path / OWNER_FILE)["pid"] == os.getpid()


@pytest.fixture
def no_flock(mocker):
    """A filesystem without flock (Lustre noflock, some NFS): flock raises ENOLCK."""
    return mocker.patch("fcntl.flock", side_effect=OSError(errno.ENOLCK, "No locks available"))


def test_without_flock_the_owner_file_decides(tmp_path: Path, no_flock, sleeper):
    with own_run(tmp_path) as mode:
        assert mode == "owner-file" and no_flock.called
    _write_owner(tmp_path, host=HOST, pid=sleeper.pid, claimed_unix=time.time())
    with pytest.raises(RunOwnedError) as err, own_run(tmp_path):
        pass
    assert err.value.exit_code == 4 and str(sleeper.pid) in err.value.message


def test_an_owner_on_another_host_is_judged_by_its_heartbeat(tmp_path: Path, no_flock):
    now = time.time()
    _write_owner(tmp_path, host="gpu-node-7", pid=4242, claimed_unix=now - 3600)
    status = {"state": "running", "host": "gpu-node-7", "pid": 4242, "heartbeat_unix": now - 5}
    (tmp_path / "status.json").write_text(json.dumps(status))
    with pytest.raises(RunOwnedError), own_run(tmp_path):
        pass
    status["heartbeat_unix"] = now - STALLED_AFTER_S - 10  # that node died long ago
    (tmp_path / "status.json").write_text(json.dumps(status))
    with own_run(tmp_path):
        assert read_json(tmp_path / OWNER_FILE)["host"] == HOST


def test_owner_is_live_rule():
    now = 1000.0
    far = {"host": "b", "pid": 9, "claimed_unix": now - 500}
    beat = {"host": "b", "pid": 9, "heartbeat_unix": now - 10}
    other = {"host": "b", "pid": 8, "heartbeat_unix": now - 10}  # another process's status
    kw = {"this_host": "a", "pid_alive": lambda pid: True, "now": now}
    assert owner_is_live(far, beat, **kw)
    assert not owner_is_live(far, other, **kw)
    assert not owner_is_live(far, None, **kw)
    assert owner_is_live({**far, "claimed_unix": now - 5}, None, **kw)  # just claimed
    assert not owner_is_live(None, beat, **kw)
    here = {"host": "a", "pid": 9, "claimed_unix": now - 10_000}
    assert owner_is_live(here, None, **kw)
    assert not owner_is_live(here, None, **{**kw, "pid_alive": lambda pid: False})


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_CPUS_PER_TASK": "8"}, 8),
        ({"SLURM_CPUS_PER_TASK": "8", "DECON_CONCURRENT_RUNS": "2"}, 4),
        ({"SLURM_CPUS_PER_TASK": "3", "DECON_CONCURRENT_RUNS": "2"}, 1),
        ({"SLURM_CPUS_PER_TASK": "1", "DECON_CONCURRENT_RUNS": "4"}, 1),
        ({}, len(os.sched_getaffinity(0))),
        ({"DECON_CONCURRENT_RUNS": "64"}, 1),
        ({"SLURM_CPUS_PER_TASK": "x"}, len(os.sched_getaffinity(0))),
    ],
)
def test_default_threads(env: dict[str, str], expected: int):
    assert default_threads(env) == expected


def test_exit_codes():
    assert exit_code_for("completed") == exit_code_for("diverged") == 0
    assert exit_code_for("failed") == 1
    assert exit_code_for("interrupted") == 3
    assert exit_code_for("interrupted", 15) == 143 and exit_code_for("interrupted", 12) == 140


def test_an_earlier_incarnation_of_this_slurm_job_is_taken_over(tmp_path: Path, monkeypatch):
    """After a node failure, SLURM requeues the job elsewhere at once: its owner.json still
    has a fresh heartbeat, but the same job id with an older restart count is gone."""
    now = time.time()
    owner = {"host": "gpu-node-7", "pid": 4242, "claimed_unix": now - 5}
    _write_owner(tmp_path, **owner, slurm_job_id="9001", slurm_restart_count=None)
    monkeypatch.setenv("SLURM_JOB_ID", "9001")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with own_run(tmp_path):
        mine = read_json(tmp_path / OWNER_FILE)
        assert mine["host"] == HOST and mine["slurm_restart_count"] == "1"
    _write_owner(tmp_path, **owner, slurm_job_id="9002", slurm_restart_count=None)
    with pytest.raises(RunOwnedError), own_run(tmp_path):  # another job: still refused
        pass
