"""A run directory: its config.json (created once, checked on every start) and its owner: one
process trains a run at a time, decidable from any host.

No torch here. The rule (docs/run-directory.md, "Ownership"):

1. ``flock`` on ``.lock`` (exclusive, non-blocking). Held by another process on this host:
   the run is owned (``RunOwnedError``, exit 4). On a filesystem without working ``flock``
   (``OSError`` such as ENOLCK / EOPNOTSUPP: Lustre ``noflock``, some NFS mounts) the lock is
   skipped and step 2 alone decides.
2. ``owner.json`` names the owner (host, pid, claim time). It is live when it names this
   host and its pid exists (unless we hold the flock, which a live owner on this host would
   hold), or names another host and its heartbeat is at most ``STALLED_AFTER_S`` old
   (:func:`deconcnn_cli.locking.owner_is_live`). A live owner other than this process:
   refused — unless it is an earlier incarnation of this same SLURM job (same
   ``SLURM_JOB_ID``, another ``SLURM_RESTART_COUNT``), which a requeue guarantees is gone.
   Otherwise this process writes its own ``owner.json`` and, without flock, re-reads
   it after a short pause to confirm that no other process claimed it at the same moment.
3. On leaving, ``owner.json`` is removed when it still names this process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deconcnn_cli.config import RunConfig, config_hash, identity_dict, load_saved_config, run_id
from deconcnn_cli.contract import CONFIG_FILE, LOCK_FILE, OWNER_FILE, STATUS_FILE
from deconcnn_cli.errors import RunDirError, RunOwnedError
from deconcnn_cli.fileio import atomic_write_json, read_json
from deconcnn_cli.locking import owner_is_live, pid_alive

try:
    import fcntl
except ImportError:  # not POSIX: no flock, the owner file decides
    fcntl = None  # type: ignore[assignment]

__all__ = ["config_record", "own_run", "prepare_run_dir"]

NO_FLOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
CLAIM_SETTLE_S = 0.2  # without flock: re-read owner.json this long after writing it


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')}"


def _earlier_incarnation(owner: dict[str, Any]) -> bool:
    """The owner is an earlier run of this very SLURM job (same job id, another restart
    count): SLURM starts a requeued job only once the previous one is gone."""
    job = os.environ.get("SLURM_JOB_ID")
    return (
        job is not None
        and owner.get("slurm_job_id") == job
        and owner.get("slurm_restart_count") != os.environ.get("SLURM_RESTART_COUNT")
    )


def _try_flock(fd: int) -> bool:
    """True: we hold the lock. False: this filesystem has no working flock."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno in NO_FLOCK_ERRNOS:
            return False
        raise
    return True


@contextlib.contextmanager
def own_run(run_dir: Path) -> Iterator[str]:
    """Own ``run_dir`` for the block; yields the lock mode (``"flock"`` or ``"owner-file"``).

    Raises ``RunOwnedError`` (exit code 4) when another live process owns it.
    """
    host, pid = socket.gethostname(), os.getpid()
    owner_path = run_dir / OWNER_FILE
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            flocked = _try_flock(fd)
        except BlockingIOError:
            raise RunOwnedError(
                f"{run_dir} is being trained by {_describe(read_json(owner_path))}",
                "wait for it to end, or stop that process first",
            ) from None
        owner = read_json(owner_path)
        same_host = owner is not None and owner.get("host") == host
        if (
            owner is not None
            and not (same_host and owner.get("pid") == pid)
            and not (flocked and same_host)  # we hold the flock: that owner is gone
            and not _earlier_incarnation(owner)  # SLURM requeued this job: it is gone
            and owner_is_live(
                owner, read_json(run_dir / STATUS_FILE), this_host=host, pid_alive=pid_alive
            )
        ):
            raise RunOwnedError(
                f"{run_dir} is being trained by {_describe(owner)} (owner.json is live)",
                "wait for it to end; a dead owner on another host is taken over once its "
                "heartbeat is older than the stalled threshold (docs/run-directory.md)",
            )
        mine = {
            "host": host,
            "pid": pid,
            "claimed_unix": time.time(),
            "lock": "flock" if flocked else "owner-file",
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        }
        atomic_write_json(owner_path, mine)
        if not flocked:
            time.sleep(CLAIM_SETTLE_S)
            now = read_json(owner_path)
            if not now or (now.get("host"), now.get("pid")) != (host, pid):
                raise RunOwnedError(
                    f"{run_dir} was claimed at the same moment by {_describe(now)}",
                    "only one process may train a run; this one steps back",
                )
        try:
            yield mine["lock"]
        finally:
            current = read_json(owner_path)
            if current and (current.get("host"), current.get("pid")) == (host, pid):
                owner_path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def config_record(cfg: RunConfig) -> dict[str, Any]:
    """What ``config.json`` holds: ``{"run_id", "config_hash", "config"}``."""
    return {
        "run_id": run_id(cfg),
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
    }


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Create ``run_dir`` with its ``config.json``, or check an existing one is the same run."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        saved = read_json(path)
        if saved is None:
            raise RunDirError(f"{path}: unreadable config", "inspect or move the run directory")
        if saved.get("config_hash") != config_hash(cfg):
            saved_identity = identity_dict(load_saved_config(path))
            differing = [p for p, _, _ in dict_changes(saved_identity, identity_dict(cfg))]
            raise RunDirError(
                f"{run_dir} holds a different run (config differs in {', '.join(differing)})",
                "use a different --root/--run-dir, or resume it without changing its config",
            )
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, config_record(cfg))
    except OSError as exc:  # a file where a folder belongs, a read-only filesystem, ...
        raise RunDirError(
            f"cannot create run directory {run_dir}: {exc.strerror or exc}",
            "give a --root/--run-dir that is (or can be made) a writable folder",
        ) from exc


def dict_changes(
    a: dict[str, Any], b: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(dotted.path, value in a, value in b)`` for every leaf where two nested dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += dict_changes(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out
