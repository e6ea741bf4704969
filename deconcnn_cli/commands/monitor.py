"""``decon monitor``: the sweep's state at a glance; parse -> observe_sweep -> render."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from deconcnn_cli.commands.options import JsonOpt, SweepRootOpt
from deconcnn_cli.commands.render import exit_on_error
from deconcnn_cli.sweep.monitor import SweepReport, failure_report, observe_sweep
from deconcnn_cli.sweep.observe import load_sweep
from deconcnn_cli.sweep.scheduler import CACHE_TTL_S

MAX_ROWS = 40
_STYLE = {
    "running": "green",
    "pending": "cyan",
    "completed": "dim",
    "diverged": "magenta",
    "interrupted": "yellow",
    "failed": "bold red",
    "stalled": "red",
    "missing": "yellow",
    "unreadable": "bold red",
}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def render_report(report: SweepReport, show_failed: bool) -> Group:
    sched = report.scheduler
    counts = "  ".join(f"[{_STYLE[s]}]{s} {n}[/]" for s, n in report.counts.items() if n)
    head = [
        Text.from_markup(
            f"[bold]{escape(report.grid)}[/] at {escape(str(report.root))}: {len(report.rows)} runs"
        ),
        Text.from_markup(counts),
        Text(
            f"ETA {_duration(report.eta_s)}   GPU-hours used {report.gpu_hours:.2f}, "
            f"wasted on failed attempts {report.gpu_hours_wasted:.2f}"
        ),
    ]
    if sched.query_ids:
        when = "cached" if sched.from_cache else "queried"
        line = (
            f"scheduler: {len(sched.query_ids)} job id(s), {sched.calls} call(s) this refresh, "
            f"{when} {sched.age_s(report.time_unix):.0f} s ago"
        )
        head.append(Text(line, style="dim"))
    for note in sched.notes:
        head.append(Text(f"scheduler degraded: {note}", style="yellow"))
    table = Table(box=None, pad_edge=False)
    for col in ("run", "state", "epoch", "step", "step/s", "att", "job", "detail"):
        right = col in ("epoch", "step", "step/s", "att")
        table.add_column(
            col,
            justify="right" if right else "left",
            no_wrap=True,
            overflow="ellipsis",
            ratio=1 if col == "detail" else None,
        )
    active = [r for r in report.rows if r.state not in ("completed",)]
    order = {s: i for i, s in enumerate(_STYLE)}
    active.sort(key=lambda r: (order.get(r.state, 99), r.run_id))
    for r in active[:MAX_ROWS]:
        table.add_row(
            r.run_id,
            Text(r.state + (f" ({r.cause})" if r.cause else ""), style=_STYLE.get(r.state, "")),
            f"{r.epoch:.2f}",
            f"{r.step}/{r.total_steps or '?'}",
            f"{r.steps_per_s:.1f}" if r.steps_per_s and r.state == "running" else "",
            str(r.attempts),
            r.job_id or "",
            r.detail,
        )
    parts: list = [*head]
    if active:
        parts.append(table)
    if len(active) > MAX_ROWS:
        parts.append(Text(f"... {len(active) - MAX_ROWS} more (--json lists every run)"))
    if show_failed:
        parts += _render_failures(report)
    return Group(*parts)


def _render_failures(report: SweepReport) -> list:
    sweep = load_sweep(report.root)
    out: list = []
    for row in report.needs_action:
        f = failure_report(sweep, row)
        out.append(Text(f"\n{f.run_id}: {f.state}, cause {f.cause}", style="bold"))
        out.append(Text(f"  {f.detail}"))
        if f.exception_type:
            out.append(Text(f"  exception: {f.exception_type}"))
        if f.traceback:
            out.append(Text("  traceback (last lines):", style="dim"))
            out += [Text(f"    {line}") for line in f.traceback.splitlines()[-8:]]
        if f.log_tail:
            out.append(Text(f"  tail of {f.log_path}:", style="dim"))
            out += [Text(f"    {line}") for line in f.log_tail]
        out.append(Text(f"  fix: {f.fix}", style="green"))
    if not report.needs_action:
        out.append(Text("\nno run needs action"))
    return out


def _json(report: SweepReport, show_failed: bool) -> str:
    data = report.to_json()
    if show_failed:
        sweep = load_sweep(report.root)
        data["failures"] = [asdict(failure_report(sweep, r)) for r in report.needs_action]
    return json.dumps(data, indent=2, default=str)


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
    """Counts by state, per-run progress, ETA, GPU-hours; one batched scheduler query."""
    with exit_on_error():
        report = observe_sweep(root, refresh=refresh)
        if as_json:
            typer.echo(_json(report, show_failed))
            return
        console = Console(markup=False)  # run ids, paths and details are text, never markup
        if not watch:
            console.print(render_report(report, show_failed))
            return
        with Live(render_report(report, show_failed), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval_s)
                    report = observe_sweep(root, ttl_s=interval_s)
                    live.update(render_report(report, show_failed), refresh=True)
            except KeyboardInterrupt:
                pass
