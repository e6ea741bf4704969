"""What ``decon monitor`` draws: the counts and ETA, then only the runs that need eyes.

Laid out for the width it is drawn at (a rich renderable): at 80 columns the state, epoch,
step, step/s and attempt columns are always whole; the run label is compact (variant, lr, wd,
seed; the hash only where two runs would read the same), the job id is its tail, and a run's
detail moves under its row. Pending runs are folded into one line per job or array; missing
runs into one line. docs/cluster.md shows it as it prints.
"""

from __future__ import annotations

import math
import re
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderableType
from rich.text import Text

from deconcnn_cli.commands.render import printable
from deconcnn_cli.sweep.monitor import RunRow, SweepReport

MAX_ROWS = 40  # rows printed at most (--watch: as many as the terminal's height holds)
MIN_DETAIL_COLUMN = 36  # narrower than this, a run's detail goes under its row
JOB_FULL = 10  # job ids up to this long are shown whole (SLURM: 1234567_89)
STYLE = {
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
# what gets a row (unreadable: its files cannot be trusted, a person must look)
ROW_ORDER = ("unreadable", "failed", "stalled", "interrupted", "running", "diverged")
HEADERS = ("run", "state", "epoch", "step", "step/s", "att", "job")
_RIGHT = frozenset({"epoch", "step", "step/s", "att"})
_RUN_ID = re.compile(r"^(?P<v>.+)_lr(?P<lr>[^_]+)_wd(?P<wd>[^_]+)_s(?P<s>\d+)_(?P<h>[0-9a-f]+)$")


def duration(seconds: float | None) -> str:
    """``2d03h``, ``4h05m``, ``12m03s``; ``unknown`` for None or a value that is not a finite
    number; ``>999d`` beyond (a rate of 1e-300 steps/s would print 300 digits)."""
    if seconds is None or not math.isfinite(seconds):
        return "unknown"
    if seconds >= 1000 * 86400:
        return ">999d"
    d, rem = divmod(int(seconds), 86400)
    h, rem = divmod(rem, 3600)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _number(text: str) -> str:
    """The shorter of ``0.0001`` and ``1e-4`` (the same value); other text unchanged."""
    try:
        x = float(text)
    except ValueError:
        return text
    plain = f"{x:g}"
    mantissa, _, exp = f"{x:.0e}".partition("e")
    sci = f"{mantissa}e{int(exp)}"
    return sci if float(sci) == x and len(sci) < len(plain) else plain


def run_labels(run_ids: Iterable[str]) -> dict[str, str]:
    """A short label per run id: ``adamw lr0.05 wd1e-4 s3``, plus ``#`` and as much of the
    hash as tells it apart from another run that reads the same. Other ids stay as they are."""
    base: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for rid in run_ids:
        m = _RUN_ID.match(rid)
        if m is None:
            base[rid] = rid
            continue
        base[rid] = f"{m['v']} lr{_number(m['lr'])} wd{_number(m['wd'])} s{m['s']}"
        hashes[rid] = m["h"]
    groups: dict[str, list[str]] = defaultdict(list)
    for rid, label in base.items():
        groups[label].append(rid)
    labels = dict(base)
    for label, rids in groups.items():
        if len(rids) < 2 or not all(r in hashes for r in rids):
            continue
        n = 2
        while len({hashes[r][:n] for r in rids}) < len(rids) and n < 64:
            n += 1
        for r in rids:
            labels[r] = f"{label} #{hashes[r][:n]}"
    return labels


def job_tails(job_ids: Iterable[str]) -> dict[str, str]:
    """Each job id, or for a long one (a local runner's) ``…`` and the shortest tail that
    still tells it from the others."""
    ids = set(job_ids)
    long_ids = sorted(j for j in ids if len(j) > JOB_FULL)
    out = {j: j for j in ids if len(j) <= JOB_FULL}
    n = 4
    while n < JOB_FULL and len({j[-n:] for j in long_ids}) < len(long_ids):
        n += 1
    out.update({j: "…" + j[-n:] for j in long_ids})
    return out


@dataclass(frozen=True)
class _Layout:
    widths: tuple[int, ...]  # of the columns shown
    gaps: tuple[int, ...]  # spaces before each column (the first: 0)
    show_job: bool
    detail_width: int  # 0: details go under the row

    @property
    def width(self) -> int:
        return sum(self.widths) + sum(self.gaps)


def _cells(row: RunRow, label: str, job: str) -> tuple[str, ...]:
    rate = f"{row.steps_per_s:.1f}" if row.steps_per_s and row.state == "running" else ""
    if row.action and row.state == "running":  # no steps meanwhile: what runs instead
        rate = row.action
    step = f"{row.step}/{row.total_steps or '?'}"
    return (label, row.state, f"{row.epoch:.2f}", step, rate, str(row.attempts), job)


# spaces before each column, widest first; between right-aligned numbers one space reads well
_GAPS = ((0, 2, 2, 2, 2, 2, 2), (0, 2, 2, 1, 1, 1, 2), (0, 1, 1, 1, 1, 1, 1))


def _layout(cells: list[tuple[str, ...]], width: int) -> _Layout:
    """Widths that keep state, epoch, step, step/s and att whole: gaps narrow first, then the
    job column goes (into the detail), then the label is cut."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
    tries = [(g, True) for g in _GAPS] + [(g[:-1], False) for g in _GAPS]
    for gaps, show_job in tries:
        cols = widths if show_job else widths[:-1]
        if sum(cols) + sum(gaps) <= width:
            break
    over = sum(cols) + sum(gaps) - width
    if over > 0:  # the label gives up what is still missing, down to 8 characters
        cols = [max(8, cols[0] - over), *cols[1:]]
    lay = _Layout(tuple(cols), tuple(gaps), show_job, 0)
    spare = width - lay.width - 2
    return _Layout(lay.widths, lay.gaps, show_job, spare if spare >= MIN_DETAIL_COLUMN else 0)


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _row_lines(
    row: RunRow, cells: tuple[str, ...], lay: _Layout, *, compact: bool = False
) -> list[Text]:
    """The run's row, and its detail: in the detail column, else under the row (``compact``:
    one line in all, for a terminal too short for every row and its detail)."""
    line = Text(no_wrap=True, overflow="crop")
    for i, w in enumerate(lay.widths):
        cell = _fit(cells[i], w)
        cell = cell.rjust(w) if HEADERS[i] in _RIGHT else cell.ljust(w)
        line.append(" " * lay.gaps[i])
        line.append(cell, style=STYLE.get(row.state, "") if HEADERS[i] == "state" else "")
    detail = printable(row.detail)
    if row.job_id and cells[-1] != row.job_id:
        detail = detail.replace(row.job_id, cells[-1])  # the tail, as in the job column
    if row.cause and row.cause != row.state:
        detail = f"{row.cause}: {detail}" if detail else row.cause
    if not lay.show_job and cells[-1]:
        detail = f"job {cells[-1]}" + (f"; {detail}" if detail else "")
    if lay.detail_width:
        wrapped = textwrap.wrap(detail, lay.detail_width)[: 1 if compact else 3] or [""]
        if compact and len(detail) > len(wrapped[0]):
            wrapped[0] = _fit(detail, lay.detail_width)
        line.append("  " + wrapped[0], style="dim")
        indent = " " * (lay.width + 2)
        return [line, *(Text(indent + w, style="dim", no_wrap=True) for w in wrapped[1:])]
    line.rstrip()
    if not detail or row.state == "running" or compact:
        return [line]  # a running run's detail is its job's RUNNING: nothing to read
    wrapped = textwrap.wrap(detail, max(20, lay.width - 4))[:2]
    return [line, *(Text("    " + w, style="dim", no_wrap=True) for w in wrapped)]


def _runs(n: int, word: str = "run") -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _folded(report: SweepReport) -> list[Text]:
    """One line per job or array holding pending runs; one for the missing runs."""
    pending: dict[str, list[RunRow]] = defaultdict(list)
    missing = 0
    for r in report.rows:
        if r.state == "pending":
            pending[report.pool_of.get(r.run_id, "")].append(r)
        elif r.state == "missing":
            missing += 1
    tails = job_tails(k for k in pending if k)
    out = []
    for key, rows in sorted(pending.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        pool = report.pools.get(key)
        kind = pool.kind if pool else "none"
        slots = pool.slots if pool else 1
        held = sum(1 for r in rows if r.cause == "held")
        if kind == "array":
            tasks = len({r.job_id for r in rows})
            text = (
                f"pending: array {key}: {_runs(tasks, 'task')} ({_runs(len(rows))}), "
                f"{slots} at a time"
            )
        elif kind == "local":
            text = f"pending: {_runs(len(rows))} in job {tails[key]}, {slots} at a time"
        else:
            text = f"pending: {_runs(len(rows))}" + (f" in job {key}" if key else "")
        if held:
            text += f"; {held} held by the scheduler (--show-failed)"
        out.append(Text(text, style=STYLE["pending"]))
    if missing:
        text = f"missing: {_runs(missing)}, no run directory and no job (decon recover)"
        out.append(Text(text, style=STYLE["missing"]))
    for t in out:
        t.overflow = "fold"
    return out


def _counts(report: SweepReport, width: int) -> list[Text]:
    """``grid: N runs  running 2  pending 176 ...``, wrapped between counts, never inside one."""
    items = [(f"{report.grid}: {len(report.rows)} runs", "")]
    items += [(f"{s} {n}", STYLE.get(s, "")) for s, n in report.counts.items() if n]
    lines = [Text(items[0][0], overflow="fold")]
    for text, style in items[1:]:
        if len(lines[-1].plain) + 2 + len(text) > width:
            lines.append(Text(text, style=style))
        else:
            lines[-1].append("  ")
            lines[-1].append(text, style=style)
    return lines


def _head(report: SweepReport, width: int) -> list[Text]:
    unit = report.hours_unit
    eta = Text.assemble(
        ("ETA ", "bold"),
        (duration(report.eta_s), "bold"),
        f"   {unit}-hours {report.gpu_hours:.2f} used, {report.gpu_hours_wasted:.2f} "
        "wasted on failed attempts",
    )
    lines = [*_counts(report, width), eta, Text(_basis(report), style="dim")]
    sched = report.scheduler
    if sched.query_ids:
        when = "cached" if sched.from_cache else "queried"
        lines.append(
            Text(
                f"scheduler: {len(sched.query_ids)} job id(s), {sched.calls} call(s) this "
                f"refresh, {when} {max(0.0, sched.age_s(report.time_unix)):.0f} s ago",
                style="dim",
            )
        )
    lines += [Text(f"scheduler degraded: {note}", style="yellow") for note in sched.notes]
    lines.append(Text(f"root {report.root}", style="dim", overflow="fold"))
    return lines


def _basis(report: SweepReport) -> str:
    """What the ETA was made of."""
    est = report.eta
    left = sum(n for s, n in report.counts.items() if s not in ("completed", "diverged"))
    if not left:
        return "every run has ended"
    if est is None or est.eta_s is None:
        return "ETA: nothing measured yet (no run has completed or reported its speed)"
    totals = [r.total_steps for r in report.rows if r.total_steps]
    per_run = ""
    if est.s_per_step is not None and totals:
        per_run = f", {duration(est.s_per_step * statistics.median(totals))} a run"
    source = (
        f"{_runs(est.n_completed_measured, 'completed run')}{per_run}"
        if est.n_completed_measured
        else f"running runs' speed{per_run}"
    )
    return f"ETA from {source}; {_runs(left)} left, {est.busy} of {est.slots} slots busy"


def _order(run_id: str) -> tuple:
    """Grid order: variant, lr, wd, seed as numbers (``s15`` before ``s106``)."""
    m = _RUN_ID.match(run_id)
    if m is None:
        return (1, run_id)
    try:
        return (0, m["v"], float(m["lr"]), float(m["wd"]), int(m["s"]), m["h"])
    except ValueError:
        return (1, run_id)


def _shown(report: SweepReport) -> list[RunRow]:
    order = {s: i for i, s in enumerate(ROW_ORDER)}
    rows = [r for r in report.rows if r.state in order]
    rows.sort(key=lambda r: (order[r.state], _order(r.run_id)))
    return rows


def render_lines(
    report: SweepReport, width: int, *, max_rows: int = MAX_ROWS, max_lines: int | None = None
) -> list[Text]:
    """Every line of the glance at ``width`` columns: head, folded runs, rows, what is left
    out. ``max_lines`` (the terminal's height, for --watch) cuts rows, never the head."""
    lines = _head(report, width) + _folded(report)
    rows = _shown(report)
    if not rows:
        return lines
    labels = run_labels(r.run_id for r in report.rows)
    candidates = rows[:max_rows]
    tails = job_tails(r.job_id for r in candidates if r.job_id)
    cells = [
        _cells(r, labels.get(r.run_id, r.run_id), tails.get(r.job_id or "", "")) for r in candidates
    ]
    lay = _layout(cells, width)
    header = Text(no_wrap=True, overflow="crop", style="bold")
    for i, w in enumerate(lay.widths):
        name = HEADERS[i].rjust(w) if HEADERS[i] in _RIGHT else HEADERS[i].ljust(w)
        header.append(" " * lay.gaps[i] + name)
    if lay.detail_width:
        header.append("  detail")
    body = [_row_lines(r, c, lay) for r, c in zip(candidates, cells, strict=True)]
    if max_lines is not None:  # --watch: what the terminal holds, the head before any row
        room = max_lines - _height(lines, width) - 1  # the column header
        if sum(map(len, body)) + _height([_more(rows, len(body))], width) > room:
            body = [
                _row_lines(r, c, lay, compact=True) for r, c in zip(candidates, cells, strict=True)
            ]
        while body and sum(map(len, body)) + _height([_more(rows, len(body))], width) > room:
            body.pop()
    header.rstrip()
    lines += [header, *(line for row_lines in body for line in row_lines)]
    if len(body) < len(rows):
        lines.append(_more(rows, len(body)))
    return lines


def _height(lines: list[Text], width: int) -> int:
    """Terminal lines the given lines take at ``width`` (a longer one wraps)."""
    return sum(max(1, -(-len(t.plain) // width)) for t in lines)


def _more(rows: list[RunRow], n_shown: int) -> Text:
    """What the rows left out, by state."""
    if n_shown >= len(rows):
        return Text("")
    rest: dict[str, int] = defaultdict(int)
    for r in rows[n_shown:]:
        rest[r.state] += 1
    what = ", ".join(f"{n} {s}" for s, n in rest.items())
    return Text(f"... {what} more (--json has all)", style="dim")


class MonitorView:
    """The glance as a rich renderable: laid out afresh for the width it is drawn at;
    ``fit_height``: its rows cut to ``height_share`` of the terminal's height (--watch)."""

    def __init__(
        self, report: SweepReport, *, fit_height: bool = False, height_share: float = 1.0
    ) -> None:
        self.report = report
        self.fit_height = fit_height
        self.height_share = height_share

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        height = None
        if self.fit_height:
            height = int((options.height or console.height) * self.height_share)
        yield from render_lines(self.report, options.max_width, max_lines=height)


def render(
    report: SweepReport, *, fit_height: bool = False, height_share: float = 1.0
) -> RenderableType:
    """The glance of ``report`` (see :class:`MonitorView`)."""
    return MonitorView(report, fit_height=fit_height, height_share=height_share)
