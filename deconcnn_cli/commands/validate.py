"""``decon validate``: pre-flight checks of profiles, grids, short runs and memory."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
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
    title = f"decon validate: grid {grid}, resources {prof}, {'GPU' if gpu else 'CPU'}"
    console = Console(width=max(100, Console().width))
    try:
        if as_json:
            checks = lib.validate(grid, prof, steps=steps, gpu=gpu)
        else:
            checks = _validate_shown(console, title, grid, prof, steps, gpu)
    except DeconError as exc:
        render_error(exc)
        raise typer.Exit(exc.exit_code) from None
    ok = not lib.failed(checks)
    if as_json:
        typer.echo(json.dumps({"ok": ok, "device": "cuda" if gpu else "cpu", "grid": grid,
                               "resources": prof, "checks": [c.as_dict() for c in checks]},
                              indent=2))  # fmt: skip
    else:
        n_fail = sum(c.status == lib.FAIL for c in checks)
        n_warn = sum(c.status == lib.WARN for c in checks)
        console.print(
            f"{'FAIL' if n_fail else 'PASS'}: {n_fail} failed, {n_warn} warning(s), "
            f"{len(checks)} checks"
        )
    raise typer.Exit(0 if ok else 1)


def _validate_shown(
    console: Console, title: str, grid: str, prof: str, steps: int, gpu: bool
) -> list[lib.Check]:
    """Run the checks, showing each as it is decided: a live table on a terminal, a line per
    check otherwise (a short run takes tens of seconds; nothing waits for the last one)."""
    rows: list[lib.Check] = []

    def table() -> Table:
        t = Table(title=title)
        for col in ("check", "result", "detail"):
            t.add_column(col, overflow="fold")
        for c in rows:
            t.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.detail)
        return t

    if console.is_terminal:
        with Live(table(), console=console, auto_refresh=False) as live:

            def show(check: lib.Check) -> None:
                rows.append(check)
                live.update(table(), refresh=True)

            return lib.validate(grid, prof, steps=steps, gpu=gpu, on_check=show)

    console.print(title, markup=False, highlight=False)

    def line(check: lib.Check) -> None:
        rows.append(check)
        console.print(f"{check.status:<5} {check.name}: {check.detail}", markup=False,
                      highlight=False, soft_wrap=True)  # fmt: skip

    return lib.validate(grid, prof, steps=steps, gpu=gpu, on_check=line)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
