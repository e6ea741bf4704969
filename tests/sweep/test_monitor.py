"""decon monitor and decon recover --dry-run on hand-made run states and recorded scheduler text."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from deconcnn_cli import contract
from deconcnn_cli.sweep.recover import release_run
from tests.conftest import run_cli
from tests.sweep.fakes import (
    calls_made,
    install_fake_scheduler,
    slurm_time,
    tree_snapshot,
    write_manifest,
    write_run,
)

NOW = time.time()
SUB = slurm_time(NOW - 600)
STALE = contract.STALLED_AFTER_S + 60
TRACEBACK = 'Traceback (most recent call last):\n  File "loop.py", line 9\nValueError: bad batch'

# run -> its job (two runs share job 100_0, as two runs share a GPU)
JOBS = [
    ("100_0", ["a_done", "b_running"]),
    ("100_1", ["c_hung", "d_timeout"]),
    ("100_2", ["e_cuda_oom"]),
    ("100_3", ["i_exception"]),
    ("100_4", ["h_queued"]),
    ("100_5", ["j_held"]),
    ("100_6", ["k_cgroup_oom"]),
]
SACCT = f"""\
100_0|RUNNING|0:0|None|gpu1|{SUB}|00:10:00
100_1|RUNNING|0:0|None|gpu2|{SUB}|00:10:00
100_2|FAILED|1:0|NonZeroExitCode|gpu3|{SUB}|00:10:00
100_3|FAILED|1:0|NonZeroExitCode|gpu3|{SUB}|00:10:00
100_[4-5]|PENDING|0:0|Priority|None assigned|{SUB}|00:00:00
100_6|OUT_OF_MEMORY|0:125|OutOfMemory|gpu4|{SUB}|00:20:00
"""
SQUEUE = f"""\
100_0|RUNNING|None|gpu1|{SUB}
100_1|RUNNING|None|gpu2|{SUB}
100_4|PENDING|Priority|(null)|{SUB}
100_5|PENDING|JobHeldAdmin|(null)|{SUB}
"""
# a local-executor run that stalled (no scheduler to ask) and one never started
LOCAL = ["f_missing", "g_diverged", "l_local_stalled"]


@pytest.fixture
def sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    root = tmp_path / "sweep"
    run_ids = [r for _, rs in JOBS for r in rs] + LOCAL
    write_manifest(root, run_ids, JOBS)
    write_run(root, "a_done", "completed", step=100)
    write_run(root, "b_running", "running", step=40, steps_per_s=5.0)
    write_run(root, "c_hung", "running", step=30, heartbeat_age_s=STALE)
    write_run(root, "d_timeout", "interrupted", step=50, reason="signal SIGUSR2")
    write_run(
        root,
        "e_cuda_oom",
        "failed",
        step=5,
        exception_type="OutOfMemoryError",
        reason="OutOfMemoryError: CUDA out of memory",
        attempts=[
            {"attempt": 1, "start_unix": NOW - 7200},
            {"attempt": 1, "event": "end", "state": "failed", "end_unix": NOW - 3600},
        ],
    )
    i_dir = write_run(root, "i_exception", "failed", step=7, exception_type="ValueError")
    (i_dir / "events.jsonl").write_text(
        json.dumps({"level": "error", "message": "ValueError", "traceback": TRACEBACK}) + "\n"
    )
    jobs = root / "jobs" / "loss_lin_slope"
    jobs.mkdir(parents=True)
    (jobs / "100_3_0_log.err").write_text("loading\nValueError: bad batch\nsrun: error: task 0\n")
    write_run(root, "g_diverged", "diverged", step=12)
    write_run(root, "l_local_stalled", "running", step=3, heartbeat_age_s=STALE)
    calls = install_fake_scheduler(monkeypatch, tmp_path / "bin", squeue=SQUEUE, sacct=SACCT)
    return root, calls


def _monitor(root: Path, *extra: str) -> dict:
    proc = run_cli("monitor", "--json", "--root", str(root), *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_counts_states_and_causes(sweep: tuple[Path, Path]) -> None:
    root, calls = sweep
    out = _monitor(root)
    by_run = {r["run_id"]: (r["state"], r["cause"]) for r in out["runs"]}
    assert by_run == {
        "a_done": ("completed", None),
        "b_running": ("running", None),
        "c_hung": ("stalled", "stalled"),
        "d_timeout": ("interrupted", "interrupted"),  # job still RUNNING its partner? no: below
        "e_cuda_oom": ("failed", "oom_cuda"),
        "f_missing": ("missing", "not_started"),
        "g_diverged": ("diverged", None),
        "h_queued": ("pending", None),
        "i_exception": ("failed", "exception"),
        "j_held": ("pending", "held"),
        "k_cgroup_oom": ("failed", "oom_cgroup"),
        "l_local_stalled": ("stalled", "stalled"),
    } | {"d_timeout": by_run["d_timeout"]}
    assert out["counts"] == {
        "pending": 2,
        "running": 2,
        "completed": 1,
        "diverged": 1,
        "interrupted": 0,
        "failed": 3,
        "stalled": 2,
        "missing": 1,
        "unreadable": 0,
    }
    # one batched query per refresh, every job of the sweep in it
    assert out["scheduler"]["calls"] == 2 and not out["scheduler"]["from_cache"]
    assert len(calls_made(calls)) == 2 and " -j 100 " in calls_made(calls)[0]
    # e's failed hour (ended by its end line) + i's hour up to its last heartbeat, each alone
    assert out["gpu_hours_wasted"] == pytest.approx(2.0, abs=0.01)
    used = {r["run_id"]: r["gpu_hours"] for r in out["runs"]}
    assert used["b_running"] == pytest.approx(0.5, abs=0.01)  # an hour on a shared GPU
    # a second shell within the TTL reads the cache: no scheduler call
    again = _monitor(root)
    assert again["scheduler"]["calls"] == 0 and again["scheduler"]["from_cache"]
    assert len(calls_made(calls)) == 2
    assert _monitor(root, "--refresh")["scheduler"]["calls"] == 2


def test_interrupted_run_in_a_running_job_is_its_restart(sweep: tuple[Path, Path]) -> None:
    # d's job 100_1 runs (requeued after the timeout): d is starting again, not failed
    root, _ = sweep
    rows = {r["run_id"]: r for r in _monitor(root)["runs"]}
    assert (rows["d_timeout"]["state"], rows["d_timeout"]["cause"]) == ("running", None)
    assert rows["b_running"]["steps_per_s"] == 5.0 and rows["b_running"]["step"] == 40


def test_show_failed_gives_cause_log_traceback_and_fix(sweep: tuple[Path, Path]) -> None:
    root, _ = sweep
    out = _monitor(root, "--show-failed")
    failures = {f["run_id"]: f for f in out["failures"]}
    exc = failures["i_exception"]
    assert exc["traceback"].endswith("ValueError: bad batch")
    assert exc["log_path"].endswith("100_3_0_log.err") and "srun: error: task 0" in exc["log_tail"]
    assert "decon recover --root" in exc["fix"]
    assert "alone" in failures["e_cuda_oom"]["fix"]
    assert "scontrol release 100_5" in failures["j_held"]["fix"]
    text = run_cli("monitor", "--show-failed", "--root", str(root)).stdout
    assert "i_exception: failed, cause exception" in text and "ValueError: bad batch" in text
    assert text.count("ValueError: bad batch") == 1  # the log tail leaves out the traceback
    assert "srun: error: task 0" in text  # and keeps the rest


def test_without_sacct_monitor_says_degraded(
    sweep: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = sweep
    install_fake_scheduler(monkeypatch, tmp_path / "bin2", squeue=SQUEUE, sacct=None)
    out = _monitor(root, "--refresh")
    assert out["scheduler"]["degraded"] and "sacct not found" in out["scheduler"]["notes"][0]
    text = run_cli("monitor", "--root", str(root)).stdout
    assert "scheduler degraded: sacct not found" in text


def test_recover_dry_run_plans_by_cause(sweep: tuple[Path, Path]) -> None:
    root, _ = sweep
    before = {k: v for k, v in tree_snapshot(root).items() if "scheduler_cache" not in k}
    proc = run_cli("recover", "--dry-run", "--json", "--root", str(root))
    assert proc.returncode == 1, proc.stderr  # j_held is left for a person
    plan = {a["run_id"]: a["action"] for a in json.loads(proc.stdout)["actions"]}
    assert plan == {
        "c_hung": "cancel",  # its job still RUNNING: cancel first, resume next time
        "e_cuda_oom": "alone",
        "f_missing": "submit",
        "i_exception": "retry",
        "j_held": "person",
        "k_cgroup_oom": "alone",
        "l_local_stalled": "resume",
    }
    after = {k: v for k, v in tree_snapshot(root).items() if "scheduler_cache" not in k}
    assert after == before
    text = run_cli("recover", "--dry-run", "--root", str(root)).stdout
    assert "plan (dry run, nothing changed): 7 run(s) need action" in text
    assert "e_cuda_oom: oom_cuda -> rerun alone on its GPU (batch size unchanged)" in text


def test_recover_stops_after_the_limit(sweep: tuple[Path, Path]) -> None:
    root, _ = sweep
    log = [
        {"run_id": "i_exception", "cause": "exception", "action": "retry"},
        *[{"run_id": "l_local_stalled", "cause": "stalled", "action": "resume"}] * 3,
        {"run_id": "e_cuda_oom", "cause": "oom_cuda", "action": "alone"},
    ]
    (root / "recover.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    proc = run_cli("recover", "--dry-run", "--json", "--root", str(root))
    actions = {a["run_id"]: a for a in json.loads(proc.stdout)["actions"]}
    for rid in ("i_exception", "l_local_stalled", "e_cuda_oom"):
        assert actions[rid]["action"] == "person", rid
        assert "stopped, a person must look" in actions[rid]["why"]
    assert actions["i_exception"]["traceback"].endswith("ValueError: bad batch")
    assert actions["f_missing"]["action"] == "submit"
    text = run_cli("recover", "--dry-run", "--root", str(root)).stdout
    assert "ValueError: bad batch" in text  # the traceback shown where a person must act


def test_bad_input_changes_nothing(sweep: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = sweep
    before = tree_snapshot(root)
    proc = run_cli("recover", "no_such_run", "--root", str(root))
    assert proc.returncode == 2 and proc.stderr.startswith("error: run id 'no_such_run'")
    assert "hint: " in proc.stderr and tree_snapshot(root) == before
    for cmd in ("monitor", "recover", "verify"):
        proc = run_cli(cmd, "--root", str(tmp_path / "nowhere"))
        assert proc.returncode == 2 and "nowhere does not exist" in proc.stderr, cmd
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nowhere").exists()


def test_local_runner_liveness(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess

    root = tmp_path / "sweep"
    write_manifest(root, ["q_queued", "r_gone"], [], executor="local")
    dead = subprocess.Popen(["true"])
    dead.wait()
    manifest = json.loads((root / "sweep.json").read_text())
    host = socket.gethostname()
    manifest["submissions"] = [
        {
            "time_unix": NOW,
            "executor": "local",
            "resources": "local",
            "jobs": [
                {"job_id": "local-a", "run_ids": ["q_queued"], "pid": os.getpid(), "host": host},
                {"job_id": "local-b", "run_ids": ["r_gone"], "pid": dead.pid, "host": host},
            ],
        }
    ]
    (root / "sweep.json").write_text(json.dumps(manifest))
    (root / "runs" / "q_queued").mkdir()  # submit writes config.json only: not started yet
    (root / "runs" / "q_queued" / "config.json").write_text("{}")
    rows = {r["run_id"]: (r["state"], r["cause"]) for r in _monitor(root)["runs"]}
    assert rows == {"q_queued": ("pending", None), "r_gone": ("missing", "not_started")}


def test_killed_run_is_released_at_once_when_its_own_job_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # scancel --signal=KILL: the scheduler says CANCELLED, the run's status still says running
    root = tmp_path / "sweep"
    write_manifest(
        root,
        ["m_killed", "n_old", "p_unsure"],
        [("200", ["m_killed"]), ("201", ["n_old"]), ("202", ["p_unsure"])],
    )
    killed = write_run(root, "m_killed", "running", step=20, heartbeat_age_s=30, slurm_job_id="200")
    (killed / "owner.json").write_text(json.dumps({"host": "gpu7", "pid": 4242}))
    write_run(root, "n_old", "running", step=20, heartbeat_age_s=STALE)
    # status names another job than the one that ended: its process may still be writing
    write_run(root, "p_unsure", "running", step=20, heartbeat_age_s=30, slurm_job_id="999")
    install_fake_scheduler(
        monkeypatch,
        tmp_path / "bin",
        squeue="",
        sacct="".join(
            f"{j}|CANCELLED by 0|0:0|None|vm|{SUB}|00:01:00\n" for j in ("200", "201", "202")
        ),
    )
    rows = {r["run_id"]: (r["state"], r["cause"]) for r in _monitor(root)["runs"]}
    assert set(rows.values()) == {("interrupted", "cancelled")}
    before = tree_snapshot(root / "runs")
    proc = run_cli("recover", "--dry-run", "--json", "--root", str(root))
    assert tree_snapshot(root / "runs") == before  # a dry run releases nothing
    actions = {a["run_id"]: a for a in json.loads(proc.stdout)["actions"]}
    assert actions["m_killed"]["action"] == "resume" and actions["m_killed"]["release"]
    assert "its process ended with job 200 (CANCELLED): released" in actions["m_killed"]["why"]
    assert actions["p_unsure"]["action"] == "wait"
    assert re.search(r"resumable in \d+ s", actions["p_unsure"]["why"])
    assert actions["n_old"]["action"] == "resume" and not actions["n_old"]["release"]
    assert proc.returncode == 0

    assert release_run(killed, "its process ended with job 200 (CANCELLED)")
    status = json.loads((killed / "status.json").read_text())
    assert status["state"] == "interrupted" and "job 200" in status["reason"]
    assert status["step"] == 20 and not (killed / "owner.json").exists()
    (event,) = contract.read_events(killed)
    assert event["level"] == "warning" and event["by"] == "decon recover"
    assert not release_run(killed, "again")  # only a run that still says running


def test_a_dead_owner_on_this_host_is_known_dead(tmp_path: Path) -> None:
    """The local executor's case: a SIGKILLed trainer's pid is gone on this very host."""
    import socket
    import subprocess

    from deconcnn_cli.sweep.recover import process_ended

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    run = write_run(tmp_path, "r", "running", heartbeat_age_s=5, host=host, pid=dead.pid)
    (run / "owner.json").write_text(json.dumps({"host": host, "pid": dead.pid}))
    row = _row(executor="local")
    assert process_ended(run, row) == f"its process (pid {dead.pid} on {host}) is gone"
    live = write_run(tmp_path, "s", "running", heartbeat_age_s=5, host=host, pid=os.getpid())
    (live / "owner.json").write_text(json.dumps({"host": host, "pid": os.getpid()}))
    assert process_ended(live, row) == ""
    # under SLURM: only the job that status.json names counts
    array = write_run(tmp_path, "t", "running", slurm_array_job_id="80", slurm_array_task_id="1")
    assert process_ended(array, _row(job_id="80_1", job_state="CANCELLED")) != ""
    assert process_ended(array, _row(job_id="80_1", job_state="COMPLETING")) == ""
    assert process_ended(array, _row(job_id="80_2", job_state="CANCELLED")) == ""


def _row(executor: str = "slurm", job_id: str | None = None, job_state: str | None = None):
    from deconcnn_cli.sweep.monitor import RunRow

    return RunRow(
        "r", "interrupted", "cancelled", "", 10, 100, 1.0, None, 1, 0.0, 0.0,
        job_id, job_state, executor, "running", 5.0,
    )  # fmt: skip
