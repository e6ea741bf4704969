"""``decon export``: sweep root -> results.csv, metadata, time series (parse, call, render)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deconcnn_cli.commands.options import SweepRootOpt
from deconcnn_cli.commands.render import render_error, tensorboard_command
from deconcnn_cli.errors import DeconError


def export(
    out: Annotated[Path, typer.Argument(help="Table to write (results.csv).")] = Path(
        "results.csv"
    ),
    root: SweepRootOpt = Path("."),
    format_: Annotated[
        str, typer.Option("--format", help="csv | parquet (parquet needs the \\[parquet] extra).")
    ] = "csv",
    timeseries: Annotated[
        bool,
        typer.Option(
            "--timeseries/--no-timeseries", help="Also write <stem>_timeseries/<run_id>/."
        ),
    ] = True,
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing outputs (refused otherwise).")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Check each finished run as `decon verify` does (streams, summary, checkpoint "
            "checksums) and flag those that fail in verify_problem.",
        ),
    ] = True,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            "--tensorboard",
            metavar="DIR",
            help="Also write TensorBoard event files, DIR/<run_id>/, from the runs' streams "
            "(a sweep that ran without them; needs the \\[tensorboard] extra).",
        ),
    ] = None,
) -> None:
    """Export every run of a sweep (completed, diverged, failed or missing) as one table."""
    # imported here: the dataset's analysis settings load scipy, which every other command
    # (monitor above all) would pay for at start-up
    from deconcnn_cli.export.dataset import verify_problem
    from deconcnn_cli.export.outputs import export as export_dataset
    from deconcnn_cli.export.outputs import output_paths

    try:
        data, meta = export_dataset(
            root,
            out,
            format_,
            timeseries=timeseries,
            force=force,
            verify=verify_problem if verify else None,
        )
    except DeconError as exc:
        render_error(exc)
        raise typer.Exit(exc.exit_code) from None
    for warning in data.warnings:
        typer.echo(f"warning: {warning}", err=True)
    counts = ", ".join(f"{n} {s}" for s, n in meta["counts_by_status"].items())
    meta_path, ts_dir = output_paths(out)
    typer.echo(f"exported {meta['total_runs']} runs ({counts}) in {meta['export_seconds']:.1f}s")
    typer.echo(f"table:       {out}")
    typer.echo(f"metadata:    {meta_path}")
    if timeseries:
        typer.echo(f"time series: {ts_dir}/")
    if tensorboard is not None:
        from deconcnn_cli.export.tensorboard import export_tensorboard

        try:
            runs, events = export_tensorboard(root, tensorboard, force=force)
        except DeconError as exc:
            render_error(exc)
            raise typer.Exit(exc.exit_code) from None
        typer.echo(f"tensorboard: {tensorboard}/ ({runs} runs, {events} events)")
        typer.echo(f"curves:      {tensorboard_command(tensorboard)}")
