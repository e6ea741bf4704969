"""``decon report``: H1/H2 tables and figures as one report.html (parse, call, render)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from deconcnn_cli.commands.options import SweepRootOpt
from deconcnn_cli.commands.render import render_error
from deconcnn_cli.errors import DeconError


def report(
    root: SweepRootOpt = Path("."),
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for report.html, report.json and PNGs [<root>/report]."),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Check each finished run as `decon verify` does; one that fails is named in "
            "the warnings and left out of H1 and H2.",
        ),
    ] = True,
) -> None:
    """Test H1 and H2 on a sweep and write a self-contained report.html with the figures."""
    from deconcnn_cli.export.dataset import verify_problem
    from deconcnn_cli.export.report import build_report

    start = time.perf_counter()
    try:
        result = build_report(
            root, out if out is not None else root / "report", verify_problem if verify else None
        )
    except DeconError as exc:
        render_error(exc)
        raise typer.Exit(exc.exit_code) from None
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    for row in result.h1:
        label = f"H1 ({row.time_axis} time{_settings(row.analysis_settings)})"
        if row.group == "all" and not row.n_runs:
            typer.echo(f"{label}: no eligible run: {row.verdict}")
        elif row.group == "all":
            typer.echo(
                f"{label}: {row.n_power_law}/{row.n_runs} runs with "
                f"R² ≥ 0.98, 95% CI [{row.ci_low:.3f}, {row.ci_high:.3f}]: {row.verdict}"
            )
        if row.group == "all":
            _excluded(result.excluded.get(f"H1 ({row.time_axis} time)", []))
    for row in result.h2:
        if row.group != "all":
            continue
        label = f"H2 ({row.time_axis} time{_settings(row.analysis_settings)})"
        if not row.ci_method:
            typer.echo(f"{label}: {row.n_runs} runs: {row.verdict}")
            _excluded(result.excluded.get(f"H2 ({row.time_axis} time)", []))
            continue
        redrawn = f", {row.n_degenerate} degenerate resamples redrawn" if row.n_degenerate else ""
        typer.echo(
            f"{label}: rho {row.rho:.3f} over {row.n_runs} runs, "
            f"95% CI [{row.ci_low:.3f}, {row.ci_high:.3f}] ({row.ci_method}{redrawn}): "
            f"{row.verdict}"
        )
        _excluded(result.excluded.get(f"H2 ({row.time_axis} time)", []))
    for note in result.caveats:
        typer.echo(f"note: {note}")
    typer.echo(f"report written in {time.perf_counter() - start:.1f}s")
    typer.echo(f"html:    {result.html}")
    typer.echo(f"numbers: {result.stats_json}")


_SHOW_EXCLUDED = 10  # runs listed on screen per table; the page lists them all


def _excluded(runs: list[dict[str, str]]) -> None:
    """The runs a hypothesis table left out, and why, under its line."""
    if not runs:
        return
    typer.echo(f"  left out {len(runs)}:")
    for r in runs[:_SHOW_EXCLUDED]:
        typer.echo(f"    {r['run_id']}: {r['why']}")
    if len(runs) > _SHOW_EXCLUDED:
        typer.echo(f"    ... {len(runs) - _SHOW_EXCLUDED} more (report.html lists every one)")


def _settings(settings_id: str) -> str:
    return f", analysis settings {settings_id}" if settings_id else ""
