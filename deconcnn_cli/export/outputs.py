"""Writing a sweep's dataset: ``results.csv`` (or parquet), its metadata and the time-series
folder, under the output's lock, the folder swapped in whole (docs/data-dictionary.md). The
rows come from :func:`deconcnn_cli.export.dataset.collect`. No torch."""

from __future__ import annotations

import os
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from deconcnn_cli import fileio
from deconcnn_cli.export.columns import COLUMNS, SCHEMA_VERSION, describe
from deconcnn_cli.export.dataset import (
    FORMATS,
    Dataset,
    VerifyFn,
    collect,
    read_manifest,
    verify_problem,
)
from deconcnn_cli.export.files import (
    ExportError,
    require_pyarrow,
    to_csv_text,
    write_parquet_rows,
    write_timeseries,
)
from deconcnn_cli.export.publish import (
    check_destinations,
    check_replaceable,
    new_staging,
    output_lock,
    repair_interrupted,
    swap_in,
    write_mark,
)


def output_paths(out: Path) -> tuple[Path, Path]:
    """``(metadata json, time-series folder)`` beside ``out``: ``<stem>_metadata.json``..."""
    return out.with_name(f"{out.stem}_metadata.json"), out.with_name(f"{out.stem}_timeseries")


def _package_version() -> str:
    try:
        return version("deconcnn_cli")
    except PackageNotFoundError:
        return "unknown"


def metadata(data: Dataset, fmt: str, timeseries: bool, seconds: float) -> dict[str, Any]:
    m = data.manifest
    return {
        "schema_version": SCHEMA_VERSION,
        "package_version": _package_version(),
        "export_time_unix": time.time(),
        "export_time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_seconds": seconds,
        "source_root": str(data.root.resolve()),
        "grid": m.get("grid"),
        "grid_hash": m.get("grid_hash"),
        "code_version": m.get("code_version"),
        "format": fmt,
        "timeseries": timeseries,
        "total_runs": len(data.rows),
        "counts_by_status": data.counts_by_status(),
        "warnings": data.warnings,
        "float_format": "shortest positional decimal that reads back exactly; '' = not "
        "defined, 'nan' = could not be computed",
        "analysis_settings": data.settings_groups(),
        "columns": [
            {
                "name": c.name,
                "dtype": c.dtype,
                "unit": c.unit,
                "description": describe(c, data.sweep_settings()),
            }
            for c in COLUMNS
        ],
    }


def export(
    root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str = "csv",
    timeseries: bool = True,
    force: bool = False,
    verify: VerifyFn | None = verify_problem,
) -> tuple[Dataset, dict[str, Any]]:
    """Write ``out``, ``<stem>_metadata.json`` and (optionally) ``<stem>_timeseries/``.

    Refuses to replace existing outputs unless ``force``; then each is replaced whole (the
    table and metadata atomically, the time-series folder built aside and swapped in), and
    the time-series folder only if an earlier export wrote it (:mod:`.publish`). Holds the
    output's lock throughout, so concurrent exports of one output run one after the other.
    """
    root, out = Path(root), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}", f"use one of: {', '.join(FORMATS)}")
    if fmt == "parquet":
        require_pyarrow()
    if (out.suffix == ".parquet") != (fmt == "parquet"):
        want = ".parquet" if fmt == "parquet" else ".csv"
        raise ExportError(
            f"{out} does not end in {want} but --format is {fmt}",
            f"name the table *{want}, or pass --format {'csv' if fmt == 'parquet' else 'parquet'}",
        )
    read_manifest(root)  # a bad root is reported before anything about the outputs
    meta_path, ts_dir = output_paths(out)
    check_destinations(out, meta_path, ts_dir if timeseries else None, root)
    targets = [out, meta_path] + ([ts_dir] if timeseries else [])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # as `report --out` does
    except OSError as exc:
        raise ExportError(
            f"cannot create folder {out.parent}: {exc.strerror or exc}", "choose another path"
        ) from exc
    with output_lock(out):  # from the overwrite check to the last write: one export at a time
        notes = repair_interrupted(ts_dir)  # a killed export's old folder is put back first
        _check_overwrite(targets, force)
        if timeseries and ts_dir.exists():
            check_replaceable(ts_dir)
        start = time.perf_counter()
        data = collect(root, verify=verify)
        data.warnings += notes
        if timeseries:
            _publish_timeseries(data, ts_dir, out, fmt)
        if fmt == "csv":
            fileio.atomic_write_bytes(out, to_csv_text(data.rows).encode())
        else:
            write_parquet_rows(data.rows, out)
        meta = metadata(data, fmt, timeseries, time.perf_counter() - start)
        fileio.atomic_write_json(meta_path, meta)
    return data, meta


def _check_overwrite(targets: list[Path], force: bool) -> None:
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise ExportError(
            f"would overwrite {', '.join(existing)}",
            "pass --force to replace them, or give another output path",
        )


def _publish_timeseries(data: Dataset, ts_dir: Path, out: Path, fmt: str) -> None:
    """Build the folder under a unique staging name, mark it, swap it in whole."""
    staging = new_staging(ts_dir)
    try:
        data.warnings += write_timeseries(data.root, data.rows, staging, fmt)
        write_mark(staging, out, data.root)
        swap_in(staging, ts_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once swapped in
