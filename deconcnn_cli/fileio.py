"""Safe file I/O for everything decon writes and reads: atomic writes, whole-line appends,
and readers that never block, never fill the memory and never raise on a damaged file.

Readers open through :func:`open_regular` (a FIFO or a device is refused as an OSError) and
treat an unreadable file as missing. No torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + fsync + rename: readers see old or new."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class NotRegularFileError(OSError):
    """A path where a file belongs holds a FIFO, a device or a socket (or links to one)."""


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for binary reading, if it is a regular file (links followed).

    A FIFO (``mkfifo``) would block a reader forever and a link to ``/dev/zero`` would feed it
    without end: both are refused with :class:`NotRegularFileError`, an ``OSError``, so
    every reader that already treats an unreadable file as missing does the same here. The
    open never blocks (``O_NONBLOCK``); the regular file it returns reads normally.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# The largest JSON / JSON-lines file a reader loads (a status.json is ~2 KB, a 100,000-run
# sweep.json ~200 MB): a file grown to gigabytes (NULs a crash left, a runaway writer) is
# unreadable at once instead of filling the memory
MAX_JSON_BYTES = 512 * 2**20


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_regular`'s refusals, as OSError);
    with ``limit``, a larger file is refused (``EFBIG``) before it is read."""
    with open_regular(path) as f:
        if limit is not None and os.fstat(f.fileno()).st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return f.read()


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (a truncated or
    binary file, a directory, a link to nowhere, a value that is not an object)."""
    try:
        value = json.loads(read_regular(path, MAX_JSON_BYTES).decode())
    except (OSError, ValueError, RecursionError):  # ValueError: JSON and UTF-8 decode errors
        return None
    return value if isinstance(value, dict) else None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (``attempts.jsonl``, ``events.jsonl``): a reader sees
    whole lines, and a crash mid-write leaves at most one partial line, which it skips."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a partial or corrupt line (a crash mid-write) is skipped
    (:func:`read_jsonl_checked` also says which)."""
    return read_jsonl_checked(path)[0]


def read_jsonl_checked(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, 1-based numbers of the whole lines that are not a JSON object) of a JSON-lines
    file. A bad line (a stray byte, a NUL, a torn write) costs that line only; a partial last
    line (no newline yet: a live writer, or a crash mid-write) is left out and not counted."""
    try:
        data = read_regular(path, MAX_JSON_BYTES)
    except OSError:
        return [], []
    out: list[dict[str, Any]] = []
    bad: list[int] = []
    lines = data.split(b"\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode())
        except (ValueError, RecursionError):
            rec = None
        if isinstance(rec, dict):
            out.append(rec)  # a last line without its newline counts when it is whole
        elif n < len(lines):
            bad.append(n)
    return out, bad


def complete_lines(path: Path, limit: int | None = None) -> list[str]:
    """The file's whole lines (a partial last line, from a crash mid-write, is dropped).

    Bytes that are not UTF-8 read as U+FFFD, so such a cell fails as a number where it is
    parsed; a missing or unreadable file (a directory, no permission) has no lines, and so
    has one larger than ``limit`` bytes (:func:`read_regular`)."""
    try:
        data = read_regular(path, limit)
    except OSError:
        return []
    return data.decode(errors="replace").split("\n")[:-1]  # "" after a final newline, or partial


def partial_tail(path: Path) -> bytes:
    """What follows the file's last newline: a line still being written, or (in a run that
    ended) bytes that are not a line at all, e.g. NULs a filesystem left after a crash."""
    try:
        with open_regular(path) as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))  # the tail only: a stream can be megabytes
            data = f.read()
            if b"\n" not in data and size > len(data):
                f.seek(0)
                data = f.read()
    except OSError:
        return b""
    return data[data.rfind(b"\n") + 1 :]
