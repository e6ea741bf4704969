"""How the export's files are written and read back: float text, CSV, Parquet, time series.

Cell encoding (docs/data-dictionary.md): ``""`` = not defined, ``nan`` = could not be
computed, floats as the shortest positional decimal that reads back to the same double
(:func:`format_float`: ``1e-07`` -> ``0.0000001``; no exponent, no rounding). Parquet needs
the optional ``pyarrow`` (``pip install 'deconcnn_cli[parquet]'``). No torch.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deconcnn_cli import contract, fileio, streambound
from deconcnn_cli.errors import DeconError
from deconcnn_cli.export.columns import COLUMN_NAMES, COLUMNS, DTYPES, require_columns
from deconcnn_cli.install import install_extra_command
from deconcnn_cli.sweep.manifest import RUNS_DIR


class ExportError(DeconError):
    """A sweep root or output path that export cannot use."""


# ---------------------------------------------------------------------------------------------
# Float text


def format_float(value: float | None) -> str:
    """Shortest positional decimal that round-trips exactly; ``""`` for None, ``nan``/``inf``."""
    if value is None:
        return ""
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return np.format_float_positional(x, unique=True, trim="0")  # 6.0 -> "6.0", not "6"


def format_value(value: Any, dtype: str) -> str:
    if value is None:
        return ""
    if dtype == "float":
        return format_float(value)
    if dtype in ("int", "Int64"):
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        number = int64_or_none(value)  # beyond int64 (a damaged status.json): not defined
        return "" if number is None else str(number)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---------------------------------------------------------------------------------------------
# The table


def to_csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMN_NAMES)
    for row in rows:
        writer.writerow(format_value(row.get(c.name), c.dtype) for c in COLUMNS)
    return buf.getvalue()


def require_pyarrow() -> Any:
    """The pyarrow module, or an ExportError saying how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ExportError(
            "--format parquet needs pyarrow, which is not installed",
            f"{install_extra_command('parquet')} (or use --format csv)",
        ) from None
    return pyarrow


INT64_MAX = 2**63 - 1


def int64_or_none(value: Any) -> int | None:
    """A nullable-integer cell: None for not defined, NaN, an infinity or a value outside
    int64 (a damaged status.json can claim any step); the integer otherwise."""
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if -INT64_MAX - 1 <= number <= INT64_MAX else None


def write_parquet_rows(rows: list[dict[str, Any]], path: Path) -> None:
    pa = require_pyarrow()
    types = {"int": pa.int64(), "Int64": pa.int64(), "float": pa.float64(), "string": pa.string()}
    arrays = []
    for c in COLUMNS:
        values = [row.get(c.name) for row in rows]
        if c.dtype == "string":
            values = [None if v is None else format_value(v, "string") for v in values]
        elif c.dtype == "Int64":  # an integer column holds no NaN: "could not be computed" -> null
            values = [int64_or_none(v) for v in values]
        arrays.append(pa.array(values, type=types[c.dtype]))  # None -> null, nan stays NaN
    table = pa.Table.from_arrays(arrays, names=list(COLUMN_NAMES))
    tmp = path.with_name(f".{path.name}.tmp")
    pa.parquet.write_table(table, tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Time series


def _copy_stream(src: Path, dst: Path, limit: int) -> None:
    """Copy a stream's whole lines (a partial last line from a live writer is left out)."""
    try:
        data = fileio.read_regular(src, limit)
    except OSError:  # unreadable: left out of the time series (verify names the file)
        return
    cut = data.rfind(b"\n") + 1
    dst.write_bytes(data[:cut])


def write_timeseries(
    root: Path, rows: Iterable[Mapping[str, Any]], folder: Path, fmt: str
) -> list[str]:
    """``folder/<run_id>/<stream>.csv|parquet`` for every run that has a directory.

    Only a stream that really lives in its run directory is copied: one that is a link to a
    file elsewhere (another user's file on a shared filesystem, planted by whoever can write
    the sweep root) is left out, never read, and named in the returned warnings; so is one far
    longer than its run's steps allow (:func:`streambound.stream_too_long`).
    """
    pa = require_pyarrow() if fmt == "parquet" else None
    skipped: list[str] = []
    for row in rows:
        run_dir = root / RUNS_DIR / row["run_id"]
        if row["status"] == contract.MISSING:
            continue
        dest = folder / row["run_id"]
        dest.mkdir(parents=True, exist_ok=True)
        home = run_dir.resolve()
        n_rows = streambound.run_stream_rows(row.get("total_steps"))
        for name in contract.STREAMS:
            src = contract.stream_path(run_dir, name)
            if not src.is_file():
                continue
            real = src.resolve()
            if not real.is_relative_to(home):
                skipped.append(
                    f"{row['run_id']}: {name} stream {src} links outside its run directory "
                    f"(to {real}); left out of the time series"
                )
                continue
            too_long = streambound.stream_too_long(src, name, n_rows)
            if too_long is not None:
                skipped.append(
                    f"{row['run_id']}: {name} stream {too_long}; left out of the time series"
                )
                continue
            limit = streambound.stream_byte_limit(name, n_rows)
            if pa is None:
                _copy_stream(src, dest / f"{name}.csv", limit)
            else:
                _stream_to_parquet(src, dest / f"{name}.parquet", pa, limit)
    return skipped


def _stream_to_parquet(src: Path, dst: Path, pa: Any, limit: int) -> None:
    """A stream's whole lines as Parquet: ``step`` int64, the rest float64; ``""`` -> null
    (not defined), ``nan`` -> NaN (could not be computed)."""
    import pyarrow.csv as pa_csv

    try:
        data = fileio.read_regular(src, limit)
    except OSError:  # unreadable, or grown past its bound since it was checked: left out
        return
    data = data[: data.rfind(b"\n") + 1]
    columns = contract.STREAMS[src.stem]
    types = {c: (pa.int64() if c == "step" else pa.float64()) for c in columns}
    table = pa_csv.read_csv(
        pa.py_buffer(data),
        convert_options=pa_csv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=False
        ),
    )
    pa.parquet.write_table(table, dst)


# ---------------------------------------------------------------------------------------------
# Reading an export back


def read_results(path: str | os.PathLike[str]) -> Any:
    """``results.csv`` (or ``.parquet``) as a pandas DataFrame with the documented dtypes.

    ``seed`` int64, counts that can be empty (``Int64`` in the metadata) pandas' nullable
    ``Int64`` (``""`` and ``nan`` are <NA>), floats float64 (parsed by Python's ``float``:
    exact; both ``""`` and ``nan`` become NaN here, the file itself keeps them apart), strings
    pandas ``string`` (an empty cell is <NA>). ``path`` is a ``str`` or any path-like. Raises
    :class:`SchemaError` when required columns are missing.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist", "run `decon export` first")
    if path.suffix == ".parquet":
        require_pyarrow()
        df = pd.read_parquet(path)
        require_columns(df.columns, COLUMN_NAMES, str(path))
        for name in (n for n, kind in DTYPES.items() if kind == "Int64"):
            df[name] = df[name].astype("Int64")  # nulls read as float64 NaN otherwise
        return df
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        require_columns(header, COLUMN_NAMES, str(path))
        cells = list(zip(*reader, strict=False)) or [()] * len(header)
    columns: dict[str, Any] = {}
    for name, values in zip(header, cells, strict=True):
        dtype = DTYPES.get(name, "string")
        if dtype == "float":
            data = [math.nan if v == "" else float(v) for v in values]
            columns[name] = pd.Series(data, dtype="float64")
        elif dtype == "int":
            columns[name] = pd.Series([int(v) for v in values], dtype="int64")
        elif dtype == "Int64":
            ints = [None if v in ("", "nan") else int(v) for v in values]
            columns[name] = pd.Series(ints, dtype="Int64")
        else:
            columns[name] = pd.Series([v or None for v in values], dtype="string")
    return pd.DataFrame(columns)
