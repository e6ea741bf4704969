"""Where an export may write, and how it replaces an earlier export. No torch.

Three rules (docs/data-dictionary.md, "Replacing an export"):

- **Replace only what export wrote.** The time-series folder carries a mark of its writer,
  ``.decon_export.json``, listing every file export put there. ``--force`` replaces a folder
  only when that mark is there and the folder holds nothing else; a folder that is, contains
  or lies inside a sweep root, a symlink, or a file in the way is refused before anything is
  written.
- **One export per output at a time.** A lock file beside the outputs (``.<stem>.export.lock``,
  ``flock``; an exclusive-create file where the filesystem has no ``flock``) is held from the
  overwrite check to the last write; a second export waits for it (up to ``LOCK_TIMEOUT_S``).
- **Whole old or whole new.** The new folder is built under a unique staging name, then
  swapped in three renames: old aside, new in, old removed. A kill between the first two
  leaves the whole old folder aside; the next export (under the lock) puts it back before
  anything else, and removes what killed exports left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from deconcnn_cli import fileio, locking
from deconcnn_cli.export.files import ExportError
from deconcnn_cli.sweep.manifest import MANIFEST_FILE

MARK_FILE = ".decon_export.json"
WRITER = "decon export"
MARK_VERSION = 1
LOCK_TIMEOUT_S = 600.0  # how long a second export of the same output waits for the first
_STAGING, _ASIDE = "staging", "old"


# ---------------------------------------------------------------------------------------------
# Where an export may write


def lock_path(out: Path) -> Path:
    """The lock beside the outputs of ``out`` (one per stem: ``r.csv`` and ``r.parquet``
    share their time-series folder)."""
    return out.with_name(f".{out.stem}.export.lock")


def sweep_root_above(folder: Path) -> Path | None:
    """The sweep root ``folder`` lies inside (strictly below it), if any."""
    for above in folder.resolve().parents:
        if (above / MANIFEST_FILE).is_file():
            return above
    return None


def check_destinations(out: Path, meta_path: Path, ts_dir: Path | None, source_root: Path) -> None:
    """Refuse, before anything is written, outputs export must never write: a table or
    metadata path that is a folder, a folder inside a sweep root (an export may sit in a
    sweep root's top folder, beside ``runs/``, never deeper), and a time-series path that is
    a symlink, a file, a sweep root or holds the sweep being exported. A table's folder that
    does not exist yet is fine (created, as ``report --out`` creates its folder)."""
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"{out.parent} is not a folder", "choose another path for the table")
    for path in (out, meta_path):
        if path.is_dir():
            raise ExportError(
                f"{path} is a folder, not a file export may replace",
                "give the table a file name (e.g. results.csv)",
            )
    if (inside := sweep_root_above(out.parent)) is not None:
        raise ExportError(
            f"{out.parent} lies inside the sweep root {inside}: export never writes among a "
            "sweep's runs and jobs",
            f"write the export outside it, or into {inside} itself",
        )
    if ts_dir is None:
        return
    if ts_dir.is_symlink():
        raise ExportError(
            f"{ts_dir} is a symbolic link: export replaces only a folder it wrote itself",
            "remove the link, or give another output path (the time series go to "
            "<stem>_timeseries)",
        )
    if ts_dir.exists() and not ts_dir.is_dir():
        raise ExportError(
            f"{ts_dir} is a file, not a time-series folder export wrote",
            "move it away, or give another output path",
        )
    source = source_root.resolve()
    if ts_dir.resolve() == source or ts_dir.resolve() in source.parents:
        raise ExportError(
            f"{ts_dir} is or holds the sweep root being exported ({source_root})",
            "give the table another name or folder",
        )


def check_replaceable(ts_dir: Path) -> None:
    """Refuse to replace ``ts_dir`` unless export wrote it and it holds only what the mark
    lists: no sweep root, no foreign file or folder, no link."""
    if (ts_dir / MANIFEST_FILE).exists():
        raise ExportError(
            f"{ts_dir} is a sweep root: export never replaces one",
            "give the table another name or folder",
        )
    listed = _marked_files(ts_dir)
    if listed is None:
        raise ExportError(
            f"{ts_dir} was not written by `decon export` (it has no valid {MARK_FILE}): "
            "--force replaces only an export's own folder",
            f"move or delete {ts_dir} yourself if it is an old export, or export elsewhere",
        )
    allowed_dirs = {str(Path(f).parent) for f in listed} - {"."}
    foreign: list[str] = []
    sweeps: list[str] = []
    for folder, dirs, files in os.walk(ts_dir):
        here = Path(folder).relative_to(ts_dir)
        for name in dirs:
            rel = str(here / name)
            if (ts_dir / rel).is_symlink() or rel not in allowed_dirs:
                foreign.append(rel + "/")
        for name in files:
            rel = str(here / name)
            if name == MANIFEST_FILE:
                sweeps.append(rel)
            if rel != MARK_FILE and (rel not in listed or (ts_dir / rel).is_symlink()):
                foreign.append(rel)
    if sweeps:
        raise ExportError(
            f"{ts_dir} contains a sweep root ({sweeps[0]}): export never replaces one",
            "move the sweep out of it, or export elsewhere",
        )
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ExportError(
            f"{ts_dir} holds {len(foreign)} file(s) or folder(s) export did not write: {shown}",
            "move them out (nothing was changed), or export elsewhere",
        )


def _marked_files(folder: Path) -> set[str] | None:
    mark = fileio.read_json(folder / MARK_FILE)
    if mark is None or mark.get("writer") != WRITER or not isinstance(mark.get("files"), list):
        return None
    return {f for f in mark["files"] if isinstance(f, str)}


# ---------------------------------------------------------------------------------------------
# The lock


@contextlib.contextmanager
def output_lock(out: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the export lock of ``out`` for the block; wait up to ``timeout_s`` for another
    export of the same output, then refuse (:class:`ExportError`)."""
    path = lock_path(out)

    def cannot_open(exc: OSError) -> ExportError:
        return ExportError(
            f"cannot create the export lock {path}: {exc.strerror}",
            f"check that {out.parent} is writable",
        )

    with locking.lock_file(path, timeout_s, _busy, cannot_open):
        yield


def _busy(path: Path, holder: str) -> ExportError:
    return ExportError(
        f"another export of the same output holds {path} ({holder or 'unknown holder'})",
        "wait for it to finish, then run again (nothing was written)",
    )


# ---------------------------------------------------------------------------------------------
# Staging and the swap


def _sibling_pattern(dest: Path, kind: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(dest.name)}\.{kind}-[0-9a-f]{{32}}")


def _sibling(dest: Path, kind: str) -> Path:
    """A unique hidden name beside ``dest``: ``.<name>.<kind>-<32 hex>``."""
    return dest.with_name(f".{dest.name}.{kind}-{uuid.uuid4().hex}")


def _leftovers(dest: Path, kind: str) -> list[Path]:
    pattern = _sibling_pattern(dest, kind)
    if not dest.parent.is_dir():
        return []
    return sorted(p for p in dest.parent.iterdir() if pattern.fullmatch(p.name))


def repair_interrupted(dest: Path) -> list[str]:
    """Undo what a killed export left beside ``dest`` (call under :func:`output_lock`): when
    ``dest`` is gone and a folder set aside survives, the newest one is put back whole;
    other set-aside and staging folders are removed. Returns notes on what was done."""
    notes: list[str] = []
    asides = _leftovers(dest, _ASIDE)
    if asides and not dest.exists() and not dest.is_symlink():
        whole = [(_export_time(p), p) for p in asides if _marked_files(p) is not None]
        if whole:
            back = max(whole)[1]
            os.rename(back, dest)
            asides.remove(back)
            notes.append(f"restored {dest} from {back.name}, left by an export that was killed")
    for path in asides + _leftovers(dest, _STAGING):
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path.name}, left by an export that was killed")
    return notes


def _export_time(folder: Path) -> float:
    mark = fileio.read_json(folder / MARK_FILE) or {}
    value = mark.get("export_time_unix")
    return float(value) if isinstance(value, int | float) else 0.0


def new_staging(dest: Path) -> Path:
    """An empty folder with a unique name beside ``dest`` to build the new export in."""
    path = _sibling(dest, _STAGING)
    path.mkdir()
    return path


def write_mark(folder: Path, table: Path, source_root: Path) -> None:
    """``.decon_export.json``: the writer and every file now in ``folder`` (written last)."""
    files = sorted(
        str(Path(d, f).relative_to(folder)) for d, _, names in os.walk(folder) for f in names
    )
    mark = {
        "writer": WRITER,
        "mark_version": MARK_VERSION,
        "table": table.name,
        "source_root": str(source_root.resolve()),
        "export_time_unix": time.time(),
        "files": files,
    }
    fileio.atomic_write_json(folder / MARK_FILE, mark)


def swap_in(staging: Path, dest: Path) -> None:
    """Make ``staging`` the folder at ``dest`` in three renames (old aside, new in, old
    removed), so that ``dest`` holds the whole old or the whole new export at every step
    where it exists; if the new one cannot go in, the old one is put back."""
    aside = None
    if dest.exists():
        aside = _sibling(dest, _ASIDE)
        os.rename(dest, aside)  # 1. old aside
    try:
        os.rename(staging, dest)  # 2. new in
    except BaseException:
        if aside is not None:
            os.rename(aside, dest)
        raise
    if aside is not None:
        shutil.rmtree(aside)  # 3. old removed
