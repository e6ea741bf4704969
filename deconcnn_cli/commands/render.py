"""The one way a command turns a library error into ``error:`` / ``hint:`` and an exit code."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from pathlib import Path

import typer

from deconcnn_cli.errors import DeconError

# C0 and C1 controls, DEL, and the bidirectional overrides and isolates (a "Trojan source"
# U+202E turns text around on screen); a newline would start a line that is not the run's
_HIDDEN = {
    *range(0x00, 0x20),
    *range(0x7F, 0xA0),
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
    0x200E,
    0x200F,
    0x061C,
}
_SHOW = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _HIDDEN}


def printable(text: str) -> str:
    """``text`` safe to put on a terminal: every control character (ESC sequences, NUL, a
    newline) and bidirectional override written as its escape (``\\x1b``, ``\\u202e``), so
    what a file says can neither drive the terminal nor fake a line of the table."""
    return text.translate(_SHOW)


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


def tensorboard_command(logdir: Path) -> str:
    """The line that opens the curves of every run under ``logdir`` (docs/cluster.md: with
    an SSH port forward from a laptop)."""
    return f"tensorboard --logdir {shlex.quote(printable(str(logdir)))}"
