"""Advisory locks on a shared filesystem, shared by the sweep root (submit, recover) and by
export. Torch-free.

``hold`` takes ``flock`` on an open lock file and writes its holder (host, pid, time) into
it; where the filesystem refuses ``flock`` (some NFS mounts) it falls back to a file created
exclusively beside it, holding the same, which a later process takes over once it is older
than ``STALE_EXCL_S`` and its holder is a dead process on this host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deconcnn_cli.contract import STALLED_AFTER_S
from deconcnn_cli.fileio import read_regular

STALE_EXCL_S = 3600.0  # an exclusive-create lock this old, its holder dead on this host
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

# what to raise when the lock stays held past the timeout: (lock path, its holder as text)
Busy = Callable[[Path, str], Exception]


@contextlib.contextmanager
def hold(fd: int, path: Path, excl_path: Path, timeout_s: float, busy: Busy) -> Iterator[None]:
    """Hold the lock on ``fd`` (the open file ``path``) for the block, waiting up to
    ``timeout_s``; ``excl_path`` is the fallback where ``flock`` is refused. The caller
    opens and closes ``fd``."""
    try:
        flock_wait(fd, path, timeout_s, busy)
    except OSError as exc:
        if exc.errno not in NO_FLOCK:
            raise
        with excl_lock(excl_path, timeout_s, busy):
            yield
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder().encode(), 0)
    try:
        yield
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextlib.contextmanager
def lock_file(
    path: Path, timeout_s: float, busy: Busy, cannot_open: Callable[[OSError], Exception]
) -> Iterator[None]:
    """Hold the lock file ``path`` (created if needed) for the block: ``flock``, or where the
    filesystem refuses it the exclusive-create fallback ``<path>.excl``. ``cannot_open``
    turns an OSError opening it (a read-only folder, a file where a folder belongs) into the
    caller's error; ``busy`` says who holds it after ``timeout_s``."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise cannot_open(exc) from None
    try:
        with hold(fd, path, path.with_name(path.name + ".excl"), timeout_s, busy):
            yield
    finally:
        os.close(fd)


def holder() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})


def flock_wait(fd: int, path: Path, timeout_s: float, busy: Busy) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise busy(path, os.pread(fd, 200, 0).decode(errors="replace").strip()) from None
            time.sleep(0.1)


@contextlib.contextmanager
def excl_lock(path: Path, timeout_s: float, busy: Busy) -> Iterator[None]:
    """A file created exclusively, holding its holder, removed after the block."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            held = _read_holder(path)
            stale = time.time() - float(held.get("since") or 0) > STALE_EXCL_S
            if (
                stale
                and held.get("host") == socket.gethostname()
                and not pid_alive(held.get("pid"))
            ):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            if time.monotonic() >= deadline:
                raise busy(path, json.dumps(held) if held else "") from None
            time.sleep(0.5)
    try:
        os.write(fd, holder().encode())
    finally:
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        held = json.loads(read_regular(path).decode(errors="replace"))
    except (OSError, ValueError):
        return {}
    return held if isinstance(held, dict) else {}


def pid_alive(pid: Any) -> bool:
    """A process with this pid exists on this host (one of another user's counts): the one
    rule for "is this pid alive" (run ownership, lock holders, local runners)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- ownership: owner.json names the process training the run (written when it takes the
# run, removed when it ends). Decidable from any host; see docs/run-directory.md "Ownership".
def owner_is_live(
    owner: dict[str, Any] | None,
    status: dict[str, Any] | None,
    *,
    this_host: str,
    pid_alive: Callable[[int], bool],
    now: float | None = None,
) -> bool:
    """Whether the process ``owner.json`` names still owns the run.

    On this host its pid is asked directly (``pid_alive(pid)``). On another host only the
    heartbeat can tell: the owner is live while the newest of its claim time and its
    status.json heartbeat (when status names the same host and pid) is at most
    ``STALLED_AFTER_S`` old.
    """
    if not owner or not isinstance(owner.get("pid"), int):
        return False
    if owner.get("host") == this_host:
        return bool(pid_alive(owner["pid"]))
    now = time.time() if now is None else now
    beats = [owner.get("claimed_unix")]
    if status and status.get("host") == owner.get("host") and status.get("pid") == owner["pid"]:
        beats.append(status.get("heartbeat_unix"))
    beats = [b for b in beats if isinstance(b, int | float)]
    return bool(beats) and now - max(beats) <= STALLED_AFTER_S
