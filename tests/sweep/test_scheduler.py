"""Scheduler answers parsed from recorded squeue/sacct text, through fake executables."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deconcnn_cli.sweep import scheduler as S
from deconcnn_cli.sweep.observe import JobRef
from tests.sweep.fakes import calls_made, install_fake_scheduler, slurm_time

NOW = time.time()
SUB = slurm_time(NOW - 600)

# recorded shapes (docs/cluster.md; SLURM 22.05 on the local test cluster)
SACCT = f"""\
5|CANCELLED by 0|0:0|None|node1|{SUB}|00:01:02
7|TIMEOUT|0:0|TimeLimit|node1|{SUB}|01:00:05
8_0|OUT_OF_MEMORY|0:125|OutOfMemory|node2|{SUB}|00:10:00
8_1|COMPLETED|0:0|None|node2|{SUB}|1-02:00:00
9_[2-4%2]|PENDING|0:0|JobArrayTaskLimit|None assigned|{SUB}|00:00:00
12|PREEMPTED|0:0|None|node1|{slurm_time(NOW - 30 * 86400)}|00:05:00
"""
SQUEUE = f"""\
10|PENDING|JobHeldAdmin|(null)|{SUB}
11_3|RUNNING|None|node1|{SUB}
5|CANCELLED|None|node1|{SUB}
"""


def test_first_word_and_array_expansion() -> None:
    assert S.first_word("CANCELLED by 123") == "CANCELLED"
    assert S.expand_job_ids("9_[2-4,7%2]") == ["9_2", "9_3", "9_4", "9_7"]
    assert S.expand_job_ids("9_[0-6:3]") == ["9_0", "9_3", "9_6"]
    assert S.expand_job_ids("11_3") == ["11_3"]
    assert S.parse_elapsed("1-02:00:00") == 93600.0
    assert S.parse_elapsed("01:02") == 62.0


def test_one_batched_query_parses_states(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = install_fake_scheduler(monkeypatch, tmp_path / "bin", squeue=SQUEUE, sacct=SACCT)
    ids = ["5", "7", "8_0", "8_1", "9_3", "10", "11_3", "12"]
    snap = S.query_scheduler(ids)
    made = calls_made(calls)
    assert snap.calls == 2 and len(made) == 2
    # array tasks asked for by their array job id, every id in one call
    assert "-j 10,11,12,5,7,8,9 " in made[0] and "-j 10,11,12,5,7,8,9 " in made[1]
    rec = snap.records
    assert rec["5"].state == "CANCELLED" and rec["5"].source == "sacct"
    assert rec["7"].state == "TIMEOUT" and rec["7"].elapsed_s == 3605.0
    assert rec["8_0"].state == "OUT_OF_MEMORY" and rec["8_0"].exit_code == "0:125"
    assert [rec[f"9_{i}"].state for i in (2, 3, 4)] == ["PENDING"] * 3
    assert rec["10"].held and rec["10"].live
    assert rec["11_3"].state == "RUNNING" and rec["11_3"].node == "node1"
    assert not snap.degraded and snap.notes == []


def test_reused_job_id_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install_fake_scheduler(monkeypatch, tmp_path / "bin", squeue="", sacct=SACCT)
    snap = S.query_scheduler(["12", "7"])
    # job 12's record was submitted a month before our submission named it: another job
    assert snap.job(JobRef("12", ("r",), NOW - 3600, "slurm")) is None
    assert snap.job(JobRef("7", ("r",), NOW - 3600, "slurm")).state == "TIMEOUT"
    assert snap.job(JobRef("7", ("r",), NOW - 3600, "local")) is None


def test_without_sacct_is_degraded_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_fake_scheduler(
        monkeypatch,
        tmp_path / "bin",
        squeue=SQUEUE,
        sacct="",
        sacct_rc=1,
        sacct_err="sacct: error: Slurm accounting storage is disabled",
    )
    snap = S.query_scheduler(["10", "11_3", "7"])
    assert snap.degraded and snap.squeue_ok and not snap.sacct_ok
    assert "accounting storage is disabled" in snap.notes[0]
    assert snap.records["11_3"].state == "RUNNING" and "7" not in snap.records
    install_fake_scheduler(monkeypatch, tmp_path / "bin2", squeue=SQUEUE, sacct=None)
    snap = S.query_scheduler(["10"])
    assert snap.degraded and snap.calls == 1 and "sacct not found" in snap.notes[0]


def test_cache_is_shared_until_its_ttl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = install_fake_scheduler(monkeypatch, tmp_path / "bin", squeue=SQUEUE, sacct=SACCT)
    root = tmp_path / "sweep"
    root.mkdir()
    first = S.scheduler_snapshot(root, ["5", "7"])
    second = S.scheduler_snapshot(root, ["7"])  # another shell, within the TTL
    assert first.calls == 2 and not first.from_cache
    assert second.from_cache and second.calls == 0 and second.records["7"].state == "TIMEOUT"
    assert len(calls_made(calls)) == 2
    S.scheduler_snapshot(root, ["5", "7"], refresh=True)
    assert len(calls_made(calls)) == 4
    S.scheduler_snapshot(root, ["5", "7"], ttl_s=0.0)  # expired
    assert len(calls_made(calls)) == 6
    S.scheduler_snapshot(root, ["5", "7", "10"])  # a job the cache does not cover
    assert len(calls_made(calls)) == 8
    assert (root / ".scheduler_cache.json").is_file()


@pytest.mark.parametrize(
    "cache",
    [
        '{"time_unix": 1e18, "query_ids": "57", "records": {}}',
        '{"time_unix": 1e18, "query_ids": [["5"]], "records": {}}',
        '{"time_unix": 1e18, "query_ids": ["5", "7"], "records": {"7": {"bogus": 1}}}',
        '{"time_unix": 1e18, "query_ids": ["5", "7"], "records": {"7": "RUNNING"}}',
        '{"time_unix": 1e18, "query_ids": ["5", "7"], "records": [1]}',
        '{"time_unix": 1e18, "query',
    ],
)
def test_a_broken_cache_is_a_stale_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: str
) -> None:
    """A cache file with the wrong types is not an answer: the scheduler is asked again."""
    calls = install_fake_scheduler(monkeypatch, tmp_path / "bin", squeue=SQUEUE, sacct=SACCT)
    root = tmp_path / "sweep"
    root.mkdir()
    (root / ".scheduler_cache.json").write_text(cache)
    snap = S.scheduler_snapshot(root, ["5", "7"])
    assert not snap.from_cache and snap.records["7"].state == "TIMEOUT"
    assert len(calls_made(calls)) == 2


def test_no_slurm_jobs_no_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = install_fake_scheduler(monkeypatch, tmp_path / "bin", squeue=SQUEUE, sacct=SACCT)
    snap = S.scheduler_snapshot(tmp_path, [])
    assert snap.calls == 0 and calls_made(calls) == [] and not snap.degraded


def test_completing_job_takes_sacct_end_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # recorded on the local SLURM right after `scancel`: squeue still says COMPLETING
    install_fake_scheduler(
        monkeypatch,
        tmp_path / "bin",
        squeue=f"10_0|COMPLETING|None|vm|{SUB}\n10_1|RUNNING|None|vm|{SUB}\n",
        sacct=f"10_0|CANCELLED by 0|0:0|None|vm|{SUB}|00:00:20\n"
        f"10_1|PENDING|0:0|None|None assigned|{SUB}|00:00:00\n",
    )
    snap = S.query_scheduler(["10_0", "10_1"])
    assert snap.records["10_0"].state == "CANCELLED"
    assert snap.records["10_1"].state == "RUNNING"  # sacct lags: squeue is fresher
