"""The run directory's writer and readers: config, status, attempts, events, metric streams.

Every file is readable by a process that did not start the run, while it runs and after it
dies: JSON files are replaced atomically (temp + rename); metric streams are CSV files appended
in whole-line blocks, so a crash leaves at most one partial last line, which readers skip and a
resume cuts away. Layout: docs/run-directory.md.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deconcnn_cli.contract import (
    STATES,
    STREAMS,
    TERMINAL_STATES,
    atomic_write_bytes,
    atomic_write_json,
    complete_lines,
    format_cell,
    read_json,
    read_stream,
)

__all__ = [
    "STATES",
    "STREAMS",
    "TERMINAL_STATES",
    "MetricStream",
    "RunWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "read_json",
    "read_stream",
]


@dataclass
class MetricStream:
    path: Path
    columns: tuple[str, ...]

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        new = not self.path.exists() or self.path.stat().st_size == 0
        buf = io.StringIO()
        if new:
            buf.write(",".join(self.columns) + "\n")
        for row in rows:
            buf.write(",".join(format_cell(row.get(c)) for c in self.columns) + "\n")
        with open(self.path, "a") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

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
    """Owns the files of one run directory during one attempt."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_dir = run_dir / "metrics"
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        self.streams = {
            name: MetricStream(self.metrics_dir / f"{name}.csv", cols)
            for name, cols in STREAMS.items()
        }
        self.status: dict[str, Any] = read_json(run_dir / "status.json") or {}

    def truncate_before(self, next_step: int) -> None:
        for stream in self.streams.values():
            stream.truncate_before(next_step)

    def write_status(self, **fields: Any) -> None:
        self.status.update(fields)
        self.status["heartbeat_unix"] = time.time()
        self.status["heartbeat"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.run_dir / "status.json", self.status)

    def log_event(self, level: str, message: str, **fields: Any) -> None:
        record = {"time": time.time(), "level": level, "message": message, **fields}
        with open(self.run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def start_attempt(self, *, resumed_from_step: int) -> int:
        attempt = int(self.status.get("attempt", 0)) + 1
        record = {
            "attempt": attempt,
            "start_unix": time.time(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "resumed_from_step": resumed_from_step,
        }
        with open(self.run_dir / "attempts.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return attempt
