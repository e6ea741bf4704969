"""Typer root: wires the subcommands and renders errors. No logic lives here."""

from __future__ import annotations

import os
import sys

import typer

from deconcnn_cli.commands import export as export_cmd
from deconcnn_cli.commands import monitor as monitor_cmd
from deconcnn_cli.commands import recover as recover_cmd
from deconcnn_cli.commands import report as report_cmd
from deconcnn_cli.commands import submit as submit_cmd
from deconcnn_cli.commands import train as train_cmd
from deconcnn_cli.commands import validate as validate_cmd
from deconcnn_cli.commands import verify as verify_cmd
from deconcnn_cli.commands.render import render_error
from deconcnn_cli.errors import DeconError

app = typer.Typer(
    name="decon",
    help="Run a training-dynamics experiment: train, sweep, monitor, verify, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command("train", no_args_is_help=False)(train_cmd.train)
app.command("submit", no_args_is_help=True)(submit_cmd.submit)
app.command("monitor")(monitor_cmd.monitor)
app.command("recover")(recover_cmd.recover)
app.command("verify")(verify_cmd.verify)
app.command("export")(export_cmd.export)
app.command("report")(report_cmd.report)
app.command("validate")(validate_cmd.validate)


@app.callback()
def _root() -> None:
    """decon: one command from a sweep definition to a clean dataset."""


def main() -> None:
    try:
        app(standalone_mode=True)
    except DeconError as exc:  # raised outside a command's own handler
        render_error(exc)
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        if train_cmd.stopped_by_signal and isinstance(exc.code, int):
            # a run stopped by a signal: everything it wrote is on disk (fsync'd); exit now
            # instead of spending seconds finalizing torch (docs/performance.md)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code)
        raise
