"""Every command's ``--help`` shows its help text whole: no bracketed text eaten as markup."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from deconcnn_cli.cli import app

COMMAND = typer.main.get_command(app)
NAMES = sorted(COMMAND.commands)  # type: ignore[attr-defined]


def _flat(text: str) -> str:
    """Rendered help as one line: box drawing and wrapping taken out."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("name", NAMES)
def test_help_shows_every_help_text_whole(name: str) -> None:
    res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    shown = _flat(res.output)
    cmd = COMMAND.commands[name]  # type: ignore[attr-defined]
    texts = [p.help for p in cmd.params if getattr(p, "help", None)]
    texts.append((cmd.help or "").split("\n\n")[0])
    for text in texts:
        assert _flat(text.replace("\\[", "[")) in shown, f"{name}: {text!r} not shown whole"
    assert not re.search(r"\(\s*\)|\[\s*\]| \.$| \. ", shown.replace("[default: .]", "")), shown
