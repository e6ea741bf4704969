"""The run directory's writer: status (with a heartbeat thread), attempts, events, metric streams.

Every file is readable by a process that did not start the run, while it runs and after it
dies: JSON files are replaced atomically (temp + rename); metric streams and JSON-lines files
grow by whole lines, so a crash leaves at most one partial last line, which readers skip and a
resume cuts away. The names live in :mod:`deconcnn_cli.contract`; layout and meaning in
docs/run-directory.md.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deconcnn_cli.contract import (
    ATTEMPTS_FILE,
    CHECKPOINT_DIR,
    EVENTS_FILE,
    FAILED,
    HEARTBEAT_EVERY_S,
    METRICS_DIR,
    RUNNING,
    STATUS_FILE,
    STREAMS,
    TEMP_MARK,
    format_cell,
)
from deconcnn_cli.errors import DeconError
from deconcnn_cli.fileio import (
    append_jsonl,
    atomic_write_bytes,
    complete_lines,
    open_regular,
    read_json,
    read_jsonl,
)
from deconcnn_cli.training.tensorboard import RunEvents
from deconcnn_cli.version import code_version


def slurm_ids(environ: dict[str, str] | None = None) -> dict[str, str | None]:
    """The SLURM ids of this process (None outside SLURM), as status.json and attempts hold them."""
    env = os.environ if environ is None else environ
    return {
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "slurm_restart_count": env.get("SLURM_RESTART_COUNT"),
    }


@dataclass
class MetricStream:
    path: Path
    columns: tuple[str, ...]
    on_append: Callable[[list[dict[str, Any]]], None] | None = None  # after the rows are on disk

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO()
        columns = self.columns
        if new:
            buf.write(",".join(self.columns) + "\n")
        else:  # a run resumed from older code keeps its file's header (columns added since: out)
            with open_regular(self.path) as f:
                columns = tuple(f.readline().decode(errors="replace").strip().split(","))
        for row in rows:
            buf.write(",".join(format_cell(row.get(c)) for c in columns) + "\n")
        with open(self.path, "a") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        if self.on_append is not None:
            self.on_append(rows)

    def truncate_before(self, next_step: int) -> None:
        """Keep only whole rows with ``step < next_step`` (what the checkpoint already covers)."""
        lines = complete_lines(self.path)
        if not lines:
            if self.path.exists():
                self.path.unlink()
            return
        kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(",", 1)[0]) < next_step]
        atomic_write_bytes(self.path, ("\n".join(kept) + "\n").encode())


class RunWriter:
    """Owns the files of one run directory during one attempt.

    ``begin`` marks the run ``running`` under this process and starts the heartbeat thread;
    ``record_start`` writes the attempt's start line once the resume point is known;
    ``finish`` / ``record_failure`` write the final status and the attempt's end line.
    Every status write (main thread or heartbeat thread) goes through one lock. Every row
    appended to a stream also goes to the run's TensorBoard events (``tensorboard``: auto |
    on | off), opened by :meth:`truncate_before` and closed by :meth:`finish`.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        heartbeat_every_s: float = HEARTBEAT_EVERY_S,
        tensorboard: str = "off",
    ) -> None:
        self.run_dir = run_dir
        self.metrics_dir = run_dir / METRICS_DIR
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.events = RunEvents(run_dir, tensorboard, self.log_event)
        self.streams = {
            name: MetricStream(
                self.metrics_dir / f"{name}.csv",
                cols,
                on_append=lambda rows, name=name: self.events.rows(name, rows),
            )
            for name, cols in STREAMS.items()
        }
        self.status: dict[str, Any] = read_json(run_dir / STATUS_FILE) or {}
        self.attempt = 0
        self.previous_threads: int | None = None  # of the previous attempt, once begun
        self.heartbeat_every_s = heartbeat_every_s
        self._status_lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None
        self._start_recorded = False
        self._end_recorded = False

    # ---- status.json and its heartbeat
    def write_status(self, **fields: Any) -> None:
        with self._status_lock:
            self.status.update(fields)
            self._write_status_locked()

    def _write_status_locked(self) -> None:
        now = time.time()
        self.status["heartbeat_unix"] = now
        self.status["heartbeat"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))
        data = (json.dumps(self.status, indent=2, sort_keys=True, default=str) + "\n").encode()
        atomic_write_bytes(self.run_dir / STATUS_FILE, data)

    def _beat(self) -> None:
        while not self._beat_stop.wait(self.heartbeat_every_s):
            try:
                with self._status_lock:
                    self._write_status_locked()
            except OSError:  # a full or flaky filesystem: try again at the next beat
                pass

    def start_heartbeat(self) -> None:
        if self._beat_thread is None:
            self._beat_stop.clear()
            self._beat_thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._beat_thread.start()

    def stop_heartbeat(self) -> None:
        if self._beat_thread is not None:
            self._beat_stop.set()
            self._beat_thread.join()
            self._beat_thread = None

    # ---- attempts
    def begin(self, *, threads: int | None) -> int:
        """Mark the run ``running`` under this process (first line of an attempt)."""
        lines = read_jsonl(self.run_dir / ATTEMPTS_FILE)
        previous = [int(a.get("attempt") or 0) for a in lines]
        self.attempt = max([int(self.status.get("attempt") or 0), *previous]) + 1
        starts = [a for a in lines if a.get("event") != "end"]
        self.previous_threads = starts[-1].get("threads") if starts else None
        self.write_status(
            state=RUNNING,
            attempt=self.attempt,
            reason=None,
            exception_type=None,
            timing=None,  # the previous attempt's is in its end line
            threads=threads,
            **self.identity(),
        )
        self.start_heartbeat()
        return self.attempt

    def identity(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), **slurm_ids()}

    def record_start(self, *, resumed_from_step: int | None, **fields: Any) -> None:
        """The attempt's start line in attempts.jsonl (written once); ``fields``: what else
        the attempt ran with (its device, whether under MPS)."""
        if self._start_recorded:
            return
        self._start_recorded = True
        self._append_jsonl(
            ATTEMPTS_FILE,
            {
                "attempt": self.attempt,
                "start_unix": time.time(),
                **self.identity(),
                "threads": self.status.get("threads"),
                "resumed_from_step": resumed_from_step,
                "code_version": code_version(),
                **fields,
            },
        )

    def finish(
        self,
        *,
        state: str,
        steps_done: int,
        exit_code: int,
        exception_type: str | None = None,
        timing: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Final status of this attempt and its end line; stops the heartbeat first.
        ``timing`` (the loop's, when it ran) goes to both."""
        self.stop_heartbeat()
        self.events.close()
        extra = {} if timing is None else {"timing": timing}
        self.write_status(state=state, exception_type=exception_type, **fields, **extra)
        self.record_start(resumed_from_step=None)  # a failure before the start line
        if not self._end_recorded:
            self._end_recorded = True
            self._append_jsonl(
                ATTEMPTS_FILE,
                {
                    "attempt": self.attempt,
                    "event": "end",
                    "end_unix": time.time(),
                    "state": state,
                    "steps_done": steps_done,
                    "exception_type": exception_type,
                    "exit_code": exit_code,
                    **extra,
                },
            )

    def record_failure(self, exc: BaseException, *, steps_done: int) -> None:
        """``failed`` with the exception's class and message, its traceback as an event."""
        name = type(exc).__name__
        self.log_event(
            "error",
            f"{name}: {exc}",
            exception_type=name,
            traceback="".join(traceback.format_exception(exc)),
        )
        code = exc.exit_code if isinstance(exc, DeconError) else 1
        self.finish(
            state=FAILED,
            steps_done=steps_done,
            exit_code=code,
            exception_type=name,
            reason=f"{name}: {exc}",
        )

    # ---- events and streams
    def log_event(self, level: str, message: str, **fields: Any) -> None:
        """One line of events.jsonl; ``step`` ties it to a step (cut away when that is replayed)."""
        record = {"time": time.time(), "attempt": self.attempt, "level": level, "message": message}
        self._append_jsonl(EVENTS_FILE, {**record, **fields})

    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        append_jsonl(self.run_dir / name, record)

    def truncate_before(self, next_step: int) -> None:
        """Cut every stream, and the step-tied events, to ``step < next_step``: a resume
        replays the rest, so nothing is doubled. The TensorBoard events start here, with
        TensorBoard's purge marker at ``next_step``, which drops what they had beyond it."""
        self.events.open(purge_step=next_step)
        for stream in self.streams.values():
            stream.truncate_before(next_step)
        path = self.run_dir / EVENTS_FILE
        if path.exists():
            kept = [
                ln
                for ln in complete_lines(path)
                if not isinstance(step := _step_of(ln), int) or step < next_step
            ]
            atomic_write_bytes(path, "".join(ln + "\n" for ln in kept).encode())

    def remove_orphans(self) -> list[str]:
        """Delete temp files a killed writer left (e.g. a half-written checkpoint)."""
        removed = []
        for folder in (self.run_dir, self.run_dir / CHECKPOINT_DIR, self.metrics_dir):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(".") and TEMP_MARK in path.name and path.is_file():
                    path.unlink(missing_ok=True)
                    removed.append(str(path.relative_to(self.run_dir)))
        return removed


def _step_of(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) else None
