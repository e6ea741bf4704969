"""``decon monitor``: the sweep's state at a glance; parse -> observe_sweep -> render."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.padding import Padding
from rich.text import Text

from deconcnn_cli import jsonout
from deconcnn_cli.commands.monitor_view import render
from deconcnn_cli.commands.options import JsonOpt, SweepRootOpt
from deconcnn_cli.commands.render import exit_on_error, printable, tensorboard_command
from deconcnn_cli.sweep.manifest import RUNS_DIR
from deconcnn_cli.sweep.monitor import SweepReport, failure_report, observe_sweep
from deconcnn_cli.sweep.observe import load_sweep
from deconcnn_cli.sweep.scheduler import CACHE_TTL_S


def render_report(report: SweepReport, show_failed: bool, *, fit_height: bool = False) -> Group:
    """The glance (monitor_view.py), and with ``show_failed`` each run that needs action.
    ``fit_height`` (--watch): the glance's rows fit the terminal (half of it with
    ``show_failed``, so that the failures start on screen)."""
    glance = render(report, fit_height=fit_height, height_share=0.5 if show_failed else 1.0)
    parts: list[RenderableType] = [glance]
    if show_failed:
        parts += _render_failures(report)
    parts.append(Text(f"curves: {tensorboard_command(report.root / RUNS_DIR)}", style="dim"))
    return Group(*parts)


def _indented(text: str, indent: int, style: str = "") -> Padding:
    """A line that wraps under its own indent at any width."""
    return Padding(Text(printable(text), style=style), (0, 0, 0, indent), expand=False)


def _render_failures(report: SweepReport) -> list[RenderableType]:
    sweep = load_sweep(report.root)
    out: list[RenderableType] = []
    for row in report.needs_action:
        f = failure_report(sweep, row)
        out.append(Text(f"\n{f.run_id}: {f.state}, cause {f.cause}", style="bold"))
        out.append(_indented(f.detail, 2))
        if f.exception_type:
            out.append(_indented(f"exception: {f.exception_type}", 2))
        shown: set[str] = set()
        if f.traceback:
            out.append(_indented("traceback (last lines):", 2, "dim"))
            tb = f.traceback.splitlines()[-8:]
            out += [_indented(line, 4) for line in tb]
            shown = {line.strip() for line in tb if line.strip()}
        tail = [line for line in f.log_tail if line.strip() not in shown]  # the traceback once
        if tail:
            out.append(_indented(f"tail of {f.log_path} (traceback lines above left out):"
                                 if len(tail) < len(f.log_tail) else f"tail of {f.log_path}:",
                                 2, "dim"))  # fmt: skip
            out += [_indented(line, 4) for line in tail]
        out.append(_indented(f"fix: {f.fix}", 2, "green"))
    if not report.needs_action:
        out.append(Text("\nno run needs action"))
    return out


def _json(report: SweepReport, show_failed: bool) -> str:
    data = report.to_json()
    if show_failed:
        sweep = load_sweep(report.root)
        data["failures"] = [asdict(failure_report(sweep, r)) for r in report.needs_action]
    return json.dumps(jsonout.json_safe(data), indent=2, default=str, allow_nan=False)


def monitor(
    root: SweepRootOpt = Path("."),
    show_failed: Annotated[
        bool, typer.Option("--show-failed", help="Each run needing action: cause, log, fix.")
    ] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh in place until Ctrl-C.")] = False,
    interval_s: Annotated[
        float, typer.Option("--interval", min=1.0, help="Seconds between --watch refreshes.")
    ] = CACHE_TTL_S,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Query the scheduler now, not its cached answer.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Counts by state, per-run progress, ETA, device-hours (GPU- or CPU-hours, as the runs
    trained; --json: gpu_hours, with hours_unit saying which); one batched scheduler query."""
    with exit_on_error():
        report = observe_sweep(root, refresh=refresh)
        if as_json:
            typer.echo(_json(report, show_failed))
            return
        console = Console(markup=False)  # run ids, paths and details are text, never markup
        if not watch:
            console.print(render_report(report, show_failed))
            return
        # redrawn in place: cut to the terminal's height, so the scrollback never grows
        view = render_report(report, show_failed, fit_height=True)
        with Live(view, console=console, auto_refresh=False, vertical_overflow="crop") as live:
            try:
                while True:
                    time.sleep(interval_s)
                    report = observe_sweep(root, ttl_s=interval_s)
                    live.update(render_report(report, show_failed, fit_height=True), refresh=True)
            except KeyboardInterrupt:
                pass
