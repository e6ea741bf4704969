"""``decon validate``: pre-flight checks of profiles, grids, short runs and memory."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from deconcnn_cli.commands.render import render_error
from deconcnn_cli.errors import DeconError
from deconcnn_cli.sweep import validate as lib

_STYLE = {lib.PASS: "green", lib.WARN: "yellow", lib.FAIL: "bold red", lib.SKIP: "dim"}


def validate(
    grid: Annotated[str, typer.Option("--grid", help="Grid whose variants to try.")] = (
        "loss_lin_slope"
    ),
    resources: Annotated[
        str | None,
        typer.Option(
            "--resources",
            help="Resource profile to check memory against \\[rtx8000 on a GPU, local on a CPU].",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps per variant.")] = 26,
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Check every profile and grid, train each variant a few steps, measure its memory.

    Exit 0 when nothing fails (warnings, e.g. a divergence, do not fail), 1 otherwise.
    """
    gpu = _cuda_available()
    prof = resources or ("rtx8000" if gpu else "local")
    try:
        checks = lib.validate(grid, prof, steps=steps, gpu=gpu)
    except DeconError as exc:
        render_error(exc)
        raise typer.Exit(exc.exit_code) from None
    ok = not lib.failed(checks)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "device": "cuda" if gpu else "cpu", "grid": grid,
                               "resources": prof, "checks": [c.as_dict() for c in checks]},
                              indent=2))  # fmt: skip
    else:
        table = Table(title=f"decon validate: grid {grid}, resources {prof}, "
                            f"{'GPU' if gpu else 'CPU'}")  # fmt: skip
        for col in ("check", "result", "detail"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail)
        console = Console(width=max(100, Console().width))
        console.print(table)
        n_fail = sum(c.status == lib.FAIL for c in checks)
        n_warn = sum(c.status == lib.WARN for c in checks)
        console.print(
            f"{'FAIL' if n_fail else 'PASS'}: {n_fail} failed, {n_warn} warning(s), "
            f"{len(checks)} checks"
        )
    raise typer.Exit(0 if ok else 1)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
