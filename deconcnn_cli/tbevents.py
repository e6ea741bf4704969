"""TensorBoard event files of one run: the rows of its metric streams as scalars. No torch.

One event per stream row (its ``step``), holding that row's values under tags grouped into
TensorBoard's sections (``train/``, ``val/``, ``curvature/``, ``noise/``, ``shape/``). Values
are the stream's own, stored as TensorBoard stores scalars (float32). A file opened at a
resume point carries TensorBoard's purge marker (``SessionLog.START`` at that step): the
viewer drops what earlier files logged at or after it, so a resumed run shows no doubled
curve. Used live by a run (:mod:`deconcnn_cli.training.tensorboard`) and by ``decon export
--tensorboard`` on a finished sweep's streams.

Records are framed here rather than through ``torch.utils.tensorboard``'s ``add_scalar``:
that writes one record per scalar, each with a pure-Python CRC32C (~20 us), where this writes
one record per row with ``google_crc32c``'s C CRC when installed (docs/performance.md,
"TensorBoard event files"). The protocol buffers are TensorBoard's own.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from deconcnn_cli.contract import STREAMS, parse_cell, read_stream, stream_path

# stream -> its tag section; every column of the stream is a scalar except these
SECTIONS = {"step": "train"} | {s: s for s in ("val", "curvature", "noise", "shape")}
NOT_SCALARS = frozenset({"step", "epoch", "loss_train_bits", "wd"})  # axes, or a copy in bits
FP16_TAGS = ("train/loss_scale", "train/skipped_steps")  # per block, where fp16 is on
EXTRA_HINT = "pip install 'deconcnn_cli[tensorboard]'"
FILE_MARK = "tfevents"  # what TensorBoard looks for in an event file's name


def tag_of(stream: str, column: str) -> str:
    return f"{SECTIONS[stream]}/{column}"


# stream -> {column: tag} of its scalars, computed once (a row's cost is one lookup a column)
TAGS = {
    stream: {c: tag_of(stream, c) for c in columns if c not in NOT_SCALARS}
    for stream, columns in STREAMS.items()
}


def scalars_of(stream: str, row: Mapping[str, Any]) -> dict[str, float]:
    """The tags and values of one stream row: its numbers (a value not defined yet, None or
    an empty cell, is left out; NaN and inf stay, as the stream has them)."""
    out: dict[str, float] = {}
    for column, tag in TAGS[stream].items():
        value = row.get(column)
        if isinstance(value, str):
            value = parse_cell(value) if value != "" else None
        if isinstance(value, int | float):
            out[tag] = float(value)
    return out


def available() -> str | None:
    """Why event files cannot be written here (None: they can)."""
    try:
        import tensorboard.compat.proto.event_pb2  # noqa: F401
    except ImportError as exc:
        return f"the tensorboard package is not installed ({exc.name or exc}): {EXTRA_HINT}"
    return None


class EventFile:
    """One event file, written by whole records in the caller's thread (no worker thread:
    an error is raised to the caller, at the write that met it)."""

    def __init__(self, log_dir: Path, *, purge_step: int | None = None, suffix: str = "") -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._Event, self._Summary = Event, Summary
        self._crc = _crc32c()
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.{FILE_MARK}.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = log_dir / (name + suffix)
        self._file: BinaryIO | None = open(self.path, "ab")  # noqa: SIM115 (closed by close)
        records = [Event(wall_time=time.time(), file_version="brain.Event:2")]
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            records.append(Event(wall_time=time.time(), step=purge_step, session_log=start))
        self._write(records)
        self.flush()

    def add(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """One event per ``(step, {tag: value})`` (empty ones are left out), written now."""
        now, Value = time.time(), self._Summary.Value
        events = [
            self._Event(
                wall_time=now,
                step=step,
                summary=self._Summary(value=[Value(tag=t, simple_value=v) for t, v in vs.items()]),
            )
            for step, vs in rows
            if vs
        ]
        self._write(events)

    def _write(self, events: list[Any]) -> None:
        if self._file is None:
            raise ValueError(f"{self.path} is closed")
        crc, pack, parts = self._crc, struct.pack, []
        for event in events:
            data = event.SerializeToString()
            header = pack("<Q", len(data))
            parts += [header, pack("<I", crc(header)), data, pack("<I", crc(data))]
        self._file.write(b"".join(parts))

    def flush(self) -> None:
        """Hand what was written to the OS: a viewer sees it, and a killed process keeps it."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


def write_streams(run_dir: Path, log_dir: Path) -> int:
    """One event file in ``log_dir`` with every row of ``run_dir``'s streams; returns the
    number of events. (``decon export --tensorboard``: a sweep that ran without them.)"""
    events = EventFile(log_dir)
    n = 0
    try:
        for stream in STREAMS:
            rows = [(int(r["step"]), scalars_of(stream, r)) for r in _rows(run_dir, stream)]
            events.add(rows)
            n += sum(1 for _, vs in rows if vs)
    finally:
        events.close()
    return n


def _rows(run_dir: Path, stream: str) -> list[dict[str, str]]:
    path = stream_path(run_dir, stream)
    if not path.is_file():
        return []
    return [r for r in read_stream(path) if (r.get("step") or "").isdigit()]


def masked_crc32c(data: bytes, crc32c: Any = None) -> int:
    """TFRecord's masked CRC32C of ``data`` (``crc32c``: the unmasked function to use)."""
    crc = (crc32c or _unmasked_crc32c())(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _unmasked_crc32c() -> Any:
    try:
        from google_crc32c import value  # C; TensorBoard's own is pure Python
    except ImportError:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as value
    return value


def _crc32c() -> Any:
    unmasked = _unmasked_crc32c()
    return lambda data: masked_crc32c(data, unmasked)
