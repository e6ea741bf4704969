"""Former name of :mod:`deconcnn_cli.training.writer` (the run-directory writer); kept so
existing imports work. New code imports the writer from ``training.writer`` and the names
and readers from :mod:`deconcnn_cli.contract`."""

from __future__ import annotations

from deconcnn_cli.contract import STATES, STREAMS, TERMINAL_STATES, read_stream
from deconcnn_cli.fileio import atomic_write_bytes, atomic_write_json, read_json
from deconcnn_cli.training.writer import MetricStream, RunWriter

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
