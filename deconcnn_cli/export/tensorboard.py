"""``decon export --tensorboard DIR``: TensorBoard event files of a sweep, from its streams.

For a sweep that ran without them (``logging.tensorboard = "off"``, or no library on the
nodes): ``DIR/<run_id>/`` gets one event file per run with the scalars its live events would
have held (:mod:`deconcnn_cli.tbevents`). ``DIR`` is built aside and swapped in whole, and
replaced (``--force``) only when an earlier export wrote it, as the time-series folder is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from deconcnn_cli import tbevents
from deconcnn_cli.export.dataset import read_manifest
from deconcnn_cli.export.files import ExportError
from deconcnn_cli.export.publish import (
    check_replaceable,
    new_staging,
    output_lock,
    repair_interrupted,
    swap_in,
    sweep_root_above,
    write_mark,
)
from deconcnn_cli.sweep.manifest import RUNS_DIR


def export_tensorboard(root: Path, dest: Path, *, force: bool = False) -> tuple[int, int]:
    """Write ``dest/<run_id>/`` for every run of ``root`` that has a directory; returns
    ``(runs written, events written)``."""
    missing = tbevents.available()
    if missing is not None:
        raise ExportError(f"--tensorboard: {missing}", tbevents.EXTRA_HINT)
    manifest = read_manifest(root)
    _check_destination(root, dest)
    with output_lock(dest):
        repair_interrupted(dest)
        if dest.exists():
            if not force:
                raise ExportError(
                    f"would overwrite {dest}", "pass --force to replace it, or give another folder"
                )
            check_replaceable(dest)
        staging = new_staging(dest)
        runs = events = 0
        try:
            for run_id in sorted(manifest["runs"]):
                run_dir = root / RUNS_DIR / run_id
                if run_dir.is_dir():
                    events += tbevents.write_streams(run_dir, staging / run_id)
                    runs += 1
            write_mark(staging, dest, root)
            swap_in(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once swapped in
    return runs, events


def _check_destination(root: Path, dest: Path) -> None:
    if not dest.parent.is_dir():
        raise ExportError(f"folder {dest.parent} does not exist", "create it or choose another")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ExportError(
            f"{dest} is not a folder export wrote (a file or a link)",
            "move it away, or give another folder to --tensorboard",
        )
    source, target = root.resolve(), dest.resolve()
    inside = sweep_root_above(dest.parent) if dest.parent.resolve() != source else None
    if target == source or target in source.parents or inside is not None:
        raise ExportError(
            f"{dest} is, holds or lies inside a sweep root: export never writes among a "
            "sweep's runs",
            "give --tensorboard a folder outside the sweep root (or directly in it)",
        )
