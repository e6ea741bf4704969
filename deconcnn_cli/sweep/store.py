"""The sweep root on disk (docs/sweep-root.md): manifest, run directories, lock. No torch.

``sweep.json`` says which runs belong to the sweep and which scheduler jobs were asked to run
them; each run's own directory (``runs/<run_id>/``, read with :mod:`deconcnn_cli.contract`)
is the truth about its state. Every change of the manifest happens under the sweep lock and
is written atomically, so concurrent ``submit``/``recover`` calls never lose or duplicate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deconcnn_cli import locking
from deconcnn_cli.config import RunConfig, run_id
from deconcnn_cli.errors import SweepError
from deconcnn_cli.fileio import atomic_write_json
from deconcnn_cli.sweep.manifest import (
    JOBS_DIR,
    MANIFEST_FILE,
    RUNS_DIR,
    SCHEMA_VERSION,
    read_manifest,
)
from deconcnn_cli.training.rundir import prepare_run_dir
from deconcnn_cli.version import code_version

LOCK_FILE = ".sweep.lock"
SCHEDULER_CACHE_FILE = ".scheduler_cache.json"
LOCK_TIMEOUT_S = 600.0  # how long a second submit waits for the first one to finish


class SweepLockError(SweepError):
    """The sweep lock cannot be taken at all: the root is read-only, or not a folder."""


class SweepStore:
    """One sweep root: ``sweep.json``, ``runs/<run_id>/``, ``jobs/``, ``.sweep.lock``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # ---- paths
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_DIR

    @property
    def jobs_dir(self) -> Path:
        return self.root / JOBS_DIR

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def check_folder(self) -> None:
        """Refuse a root that is there but is not a folder (a file, a link to a file), or
        whose path holds a control character (a newline would become a line of the sbatch
        script; scripts quote everything else)."""
        if not str(self.root).isprintable():
            raise SweepError(
                f"sweep root {str(self.root)!r} holds a control character",
                "give a --root without newlines, tabs or other control characters",
            )
        if self.root.exists() and not self.root.is_dir():
            raise SweepError(f"{self.root} is not a folder", "give --root a sweep folder")

    # ---- manifest
    def read_manifest(self) -> dict[str, Any]:
        """The manifest; a missing or foreign root raises :class:`SweepError`."""
        return read_manifest(self.root)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Replace ``sweep.json`` atomically (call under :meth:`lock`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.manifest_path, manifest)

    def new_manifest(self, grid: str, grid_hash: str, runs: dict[str, dict]) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "grid": grid,
            "grid_hash": grid_hash,
            "code_version": code_version(),
            "created_unix": time.time(),
            "runs": runs,
            "submissions": [],
        }

    def record_submission(
        self,
        manifest: dict[str, Any],
        *,
        executor: str,
        resources: str,
        jobs: list[dict[str, Any]],
        **extra: Any,
    ) -> dict[str, Any]:
        """Append one submission (its jobs and their run ids) and write the manifest."""
        entry = {
            "time_unix": time.time(),
            "executor": executor,
            "resources": resources,
            "code_version": code_version(),
            "jobs": jobs,
            **extra,
        }
        manifest.setdefault("submissions", []).append(entry)
        self.write_manifest(manifest)
        return entry

    # ---- run directories
    def write_run_config(self, cfg: RunConfig) -> Path:
        """Create ``runs/<run_id>/config.json`` (torch-free); an existing one must match."""
        target = self.run_dir(run_id(cfg))
        prepare_run_dir(cfg, target)
        return target

    # ---- lock
    @contextlib.contextmanager
    def lock(self, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        """Exclusive sweep lock (``flock`` on ``.sweep.lock``); waits up to ``timeout_s``.

        Where the filesystem refuses ``flock`` (some NFS mounts), falls back to an
        exclusive-create lock file holding the holder's host and pid.
        """
        path = self.root / LOCK_FILE

        def cannot_open(exc: OSError) -> SweepLockError:
            # a file where the root belongs, a read-only filesystem, ...
            return SweepLockError(
                f"cannot take the sweep lock {path}: {exc.strerror or exc}",
                "submit and recover write into the sweep root: give a writable folder (monitor, "
                "verify, export and recover --dry-run only read)",
            )

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cannot_open(exc) from None
        with locking.lock_file(path, timeout_s, _lock_busy, cannot_open):
            yield


def _lock_busy(path: Path, holder: str) -> SweepError:
    return SweepError(
        f"{path} is held by another decon ({holder or 'unknown holder'})",
        f"wait for that submit/recover to finish, then run again (if its process is gone, "
        f"delete {path})",
    )
