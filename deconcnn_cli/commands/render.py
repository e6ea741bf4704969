"""The one way a command turns a library error into ``error:`` / ``hint:`` and an exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from deconcnn_cli.errors import DeconError


def render_error(exc: DeconError) -> None:
    """``error: <message>`` and, when there is one, ``hint: <what to do>`` on stderr."""
    typer.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        typer.echo(f"hint: {exc.hint}", err=True)


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """Render a :class:`DeconError` raised inside the block and exit with its code."""
    try:
        yield
    except DeconError as exc:
        render_error(exc)
        raise typer.Exit(exc.exit_code) from None
