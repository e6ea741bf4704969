"""How large a metric stream its run allows, and reading one within that bound. Torch-free.

Every row a writer writes is at most one cell per column of at most ``MAX_CELL_BYTES`` (a
repr float's 24 characters and its comma), so ``rows`` rows and the header make at most
``(rows + 1) x columns x MAX_CELL_BYTES`` bytes. A stream over ``STREAM_SIZE_FACTOR`` times
that for the rows its config gives (a runaway writer, gigabytes of NULs) is reported from its
size and never read; every other stream is read within that bound, so memory stays bounded by
the config, not by the file (docs/run-directory.md, "Broken files"). ``verify`` counts the
rows from the stream's cadence, ``export`` and ``report`` from the run's total steps.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from deconcnn_cli.contract import STREAMS, read_stream
from deconcnn_cli.fileio import open_regular

MAX_CELL_BYTES = 25
STREAM_SIZE_FACTOR = 2
UNKNOWN_RUN_STEPS = 10**6  # the rows allowed when a run's status does not give its steps


def stream_byte_limit(name: str, rows: int) -> int:
    """The most bytes stream ``name`` is read at when its config gives ``rows`` rows."""
    return STREAM_SIZE_FACTOR * (max(rows, 0) + 1) * len(STREAMS[name]) * MAX_CELL_BYTES


def stream_too_long(path: Path, name: str, rows: int) -> str | None:
    """Why the stream at ``path`` is far longer than ``rows`` rows allow, from its size alone
    (nothing of it is read); None when it is within :func:`stream_byte_limit`, or absent."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    limit = stream_byte_limit(name, rows)
    if size <= limit:
        return None
    return (
        f"{size:,} bytes, over {STREAM_SIZE_FACTOR}x the largest file its {rows:,} expected "
        f"rows can make ({limit:,} bytes): not read"
    )


def read_stream_within(path: Path, limit: int) -> list[dict[str, str]]:
    """:func:`deconcnn_cli.contract.read_stream` of a file of at most ``limit`` bytes; a
    larger one reads as no rows (the caller says why: :func:`stream_too_long`), so memory
    stays bounded even when the file grows after that check."""
    return read_stream(path, limit)


def run_stream_rows(total_steps: Any) -> int:
    """The rows a run's streams may hold: every stream writes at most one row a step, so the
    run's total steps (``UNKNOWN_RUN_STEPS`` when its status does not say)."""
    ok = isinstance(total_steps, int | float) and math.isfinite(total_steps) and total_steps > 0
    return int(total_steps) if ok else UNKNOWN_RUN_STEPS
