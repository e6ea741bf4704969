"""The run-directory writer: heartbeat independent of steps, liveness, events, orphans."""

from __future__ import annotations

import json
import time
from importlib.metadata import version
from pathlib import Path

from deconcnn_cli.contract import (
    RUNNING,
    STALLED,
    STALLED_AFTER_S,
    read_attempts,
    read_events,
    view_run,
)
from deconcnn_cli.training.writer import RunWriter
from deconcnn_cli.version import code_version


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def test_heartbeat_beats_on_a_timer_while_no_step_ends(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    writer = RunWriter(tmp_path, heartbeat_every_s=0.05)
    writer.begin(threads=3)
    try:
        first = _status(tmp_path)["heartbeat_unix"]
        time.sleep(0.4)  # a long step or evaluation: the loop writes nothing meanwhile
        status = _status(tmp_path)
    finally:
        writer.stop_heartbeat()
    assert status["heartbeat_unix"] > first
    assert status["state"] == RUNNING and status["threads"] == 3
    assert status["slurm_job_id"] == "777" and status["slurm_array_task_id"] == "5"
    assert status["pid"] > 0 and status["host"]
    assert view_run(tmp_path).state == RUNNING  # live by the documented rule


def test_a_dead_run_is_told_apart_by_the_heartbeat_age(tmp_path: Path):
    writer = RunWriter(tmp_path, heartbeat_every_s=60)
    writer.begin(threads=1)
    writer.stop_heartbeat()  # the process "dies": no more beats, status still says running
    beat = _status(tmp_path)["heartbeat_unix"]
    assert view_run(tmp_path, now=beat + STALLED_AFTER_S - 1).state == RUNNING
    assert view_run(tmp_path, now=beat + STALLED_AFTER_S + 1).state == STALLED


def test_attempt_numbers_lines_and_failure_record(tmp_path: Path):
    first = RunWriter(tmp_path, heartbeat_every_s=60)
    assert first.begin(threads=1) == 1
    first.record_start(resumed_from_step=0)
    first.finish(state="interrupted", steps_done=7, exit_code=143, step=7)
    second = RunWriter(tmp_path, heartbeat_every_s=60)
    assert second.begin(threads=2) == 2
    assert second.previous_threads == 1  # the loop warns: CPU bits depend on the thread count
    try:
        raise MemoryError("host out of memory")
    except MemoryError as exc:
        second.record_failure(exc, steps_done=7)
    lines = read_attempts(tmp_path)
    assert [(a["attempt"], a.get("event")) for a in lines] == [
        (1, None),
        (1, "end"),
        (2, None),  # a failure before the start line still gets one
        (2, "end"),
    ]
    assert lines[1]["exit_code"] == 143 and lines[3]["exception_type"] == "MemoryError"
    assert lines[2]["resumed_from_step"] is None and lines[2]["threads"] == 2
    assert lines[0]["code_version"] == lines[2]["code_version"] == code_version()
    assert code_version().startswith(version("deconcnn_cli") + "+g")
    status = _status(tmp_path)
    assert status["state"] == "failed" and status["reason"] == "MemoryError: host out of memory"
    (error,) = [e for e in read_events(tmp_path) if e["level"] == "error"]
    assert "MemoryError" in error["traceback"] and error["attempt"] == 2


def test_resume_cuts_step_tied_events_and_keeps_the_rest(tmp_path: Path):
    writer = RunWriter(tmp_path, heartbeat_every_s=60)
    writer.log_event("warning", "skipped checkpoint ckpt_000000026.pt")
    writer.log_event("warning", "curvature: no convergence", step=3)
    writer.log_event("warning", "noise metrics failed", step=12)
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"partial": ')  # a crash mid-write
    writer.truncate_before(5)
    events = read_events(tmp_path)
    assert [(e["message"], e.get("step")) for e in events] == [
        ("skipped checkpoint ckpt_000000026.pt", None),
        ("curvature: no convergence", 3),
    ]


def test_orphan_temp_files_are_removed(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    orphan = tmp_path / "checkpoints" / ".ckpt_000000013.pt.tmp999"
    orphan.write_bytes(b"\0" * 4096)
    keep = tmp_path / "checkpoints" / "ckpt_000000013.pt"
    keep.write_bytes(b"ok")
    status_tmp = tmp_path / ".status.json.tmp123"
    status_tmp.write_text("{}")
    writer = RunWriter(tmp_path, heartbeat_every_s=60)
    removed = writer.remove_orphans()
    assert sorted(removed) == [".status.json.tmp123", "checkpoints/.ckpt_000000013.pt.tmp999"]
    assert keep.exists() and not orphan.exists() and not status_tmp.exists()


def test_a_stream_begun_by_older_code_keeps_its_header(tmp_path: Path):
    """A run resumed by code whose stream has gained a column (curvature's sharpness_norm)
    appends rows in its file's own columns: every line keeps the header's width."""
    from deconcnn_cli.contract import STREAMS, read_stream

    writer = RunWriter(tmp_path)
    stream = writer.streams["curvature"]
    old = [c for c in STREAMS["curvature"] if c != "sharpness_norm"]
    stream.path.write_text(",".join(old) + "\n" + ",".join(["0"] * len(old)) + "\n")
    stream.append([{"step": 500, "epoch": 1.0, "lambda_max": 12.5, "sharpness_norm": 0.3}])
    lines = stream.path.read_text().splitlines()
    assert [len(line.split(",")) for line in lines] == [len(old)] * 3
    rows = read_stream(stream.path)
    assert rows[-1]["lambda_max"] == "12.5" and "sharpness_norm" not in rows[-1]
    fresh = RunWriter(tmp_path / "new").streams["curvature"]
    fresh.append([{"step": 0, "epoch": 0.0, "sharpness_norm": 0.3}])
    assert fresh.path.read_text().splitlines()[0].split(",") == list(STREAMS["curvature"])
