"""The one way a command turns a library error into ``error:`` / ``hint:`` and an exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from deconcnn_cli.errors import DeconError


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Render a :class:`DeconError` raised inside the block and exit with its code."""
    try:
        yield
    except DeconError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        raise typer.Exit(exc.exit_code) from None
