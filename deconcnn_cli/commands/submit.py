"""``decon submit``: submit a grid into a sweep root, once; parse -> library -> render."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from deconcnn_cli import contract
from deconcnn_cli.commands.options import GridOpt, ResourcesOpt
from deconcnn_cli.commands.render import render_error
from deconcnn_cli.errors import DeconError
from deconcnn_cli.sweep.store import SweepStore
from deconcnn_cli.sweep.submit import (
    SubmitPlan,
    jobs_holding,
    runs_done,
    submit_grid,
    wait_targets,
)
from deconcnn_cli.sweep.trust import writable_warning

WAIT_REFRESH_S = 5.0


def submit(
    grid: GridOpt,
    resources: ResourcesOpt = None,
    executor: Annotated[
        str | None,
        typer.Option(
            help="slurm | local (default: from --resources; else slurm where it answers, "
            "else local)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write and submit nothing.")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Submit failed runs again too.")
    ] = False,
    force: Annotated[
        list[str] | None,
        typer.Option(
            "--force",
            help="RUN_ID: submit this run even if it failed. `grid`: adopt a changed grid.",
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option("--root", help="Sweep root to create or add to (default: sweeps/GRID)."),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Stay and show progress until the submitted runs end."),
    ] = False,
) -> None:
    """Submit the runs of a grid that are not done, live or queued (idempotent)."""
    console = Console(markup=False)  # paths, names and reasons are text, never markup
    try:
        store = SweepStore(root if root is not None else Path("sweeps") / Path(grid).stem)
        result = submit_grid(
            store,
            grid,
            executor=executor,
            resources=resources,
            retry_failed=retry_failed,
            force=force or [],
            dry_run=dry_run,
        )
    except DeconError as exc:
        _fail(exc)
    _render_plan(console, result.plan, dry_run)
    if (loose := writable_warning(store.root)) is not None:
        typer.echo(f"warning: {loose}", err=True)
    if dry_run:
        console.print("dry run: nothing written, nothing submitted")
        if result.refusal is not None:  # exit as the real submit would
            typer.echo("the real submit would refuse:", err=True)
            _fail(result.refusal)
        if result.elsewhere is not None:
            console.print(f"note: submit it where it can run: {result.elsewhere.message}")
        return
    if result.submission is None:
        console.print("nothing to submit")
        # --wait still watches the runs an earlier submission left queued or running
        run_ids = [d.run_id for d in result.plan.decisions if _outstanding(d.reason)]
        if wait and run_ids:
            jobs = jobs_holding(store.read_manifest(), run_ids)
            raise typer.Exit(_wait(console, store, jobs, run_ids))
        return
    sub = result.submission
    console.print(
        f"submitted {len(wait_targets(sub))} runs in {len(sub['jobs'])} "
        f"{result.plan.executor} job(s): {_job_ids(sub['jobs'])}"
    )
    console.print(f"sweep root: {store.root}  (watch: decon monitor --root {store.root})")
    if result.error is not None:
        _fail(result.error)
    if wait:
        jobs = [(sub["executor"], j) for j in sub["jobs"]]
        raise typer.Exit(_wait(console, store, jobs, wait_targets(sub)))


def _outstanding(reason: str) -> bool:
    return reason.startswith(("queued in job", "live"))


def _fail(exc: DeconError) -> None:
    render_error(exc)
    raise typer.Exit(exc.exit_code)


def _job_ids(jobs: list[dict]) -> str:
    ids = [j["job_id"] for j in jobs]
    return ", ".join(ids) if len(ids) <= 6 else f"{', '.join(ids[:3])}, ... {ids[-1]}"


def _render_plan(console: Console, plan: SubmitPlan, dry_run: bool) -> None:
    res = plan.resources
    state = "new sweep" if plan.new_sweep else "existing sweep"
    console.print(f"grid {plan.grid} ({plan.grid_hash}) -> {plan.root} ({state})")
    if plan.change is not None:
        console.print(f"grid changed since the sweep was created:\n{plan.change.render()}")
    if plan.executor == "slurm":
        where = ", ".join(
            f"{k} {getattr(res, k)}" for k in ("partition", "account", "qos") if getattr(res, k)
        )
        console.print(
            f"executor slurm, resources {res.name}: {res.runs_per_gpu} runs per GPU job "
            f"({res.gres or 'no gres'}, {res.cpus_per_run * res.runs_per_gpu} CPUs, "
            f"{res.mem_gb_per_run * res.runs_per_gpu:g} GB, {res.time_limit_min} min"
            f"{', ' + where if where else ''}), max {res.max_attempts} attempts per run"
        )
        if res.container is not None:
            from deconcnn_cli.sweep.container import describe

            command = describe(plan.root, SweepStore(plan.root).jobs_dir, res)
            console.print(f"each job runs, inside {res.container.runtime}:", highlight=False)
            console.print(f"  {command}", highlight=False, markup=False, soft_wrap=True)
    else:
        console.print(
            f"executor local, resources {res.name}: {res.parallel_runs} runs at a time, "
            f"{res.cpus_per_run} thread(s) each, detached runner"
        )
    table = Table("variant", "runs", "submit", "skip", "jobs")
    totals = dict.fromkeys(("runs", "submit", "skip", "jobs"), 0)
    for variant, row in plan.per_variant().items():
        table.add_row(variant, *(str(row[k]) for k in totals))
        for k in totals:
            totals[k] += row[k]
    if plan.executor == "local":
        totals["jobs"] = len(plan.groups)
    table.add_row("total", *(str(totals[k]) for k in totals), style="bold")
    console.print(table)
    if plan.chunks:
        size, source = plan.max_array_size or (0, "")
        sizes = " + ".join(str(b - a) for a, b in plan.chunks)
        console.print(
            f"{len(plan.chunks)} job array(s): {sizes} tasks (MaxArraySize {size} from "
            f"{source}), at most {res.array_parallelism} running at once each"
        )
    skipped = [d for d in plan.decisions if not d.submit]
    if skipped:
        console.print(f"skipped ({len(skipped)}):")
        for d in skipped[:40]:
            console.print(f"  {d.run_id}: {d.reason}", highlight=False)
        if len(skipped) > 40:
            console.print(f"  ... {len(skipped) - 40} more")
    for w in plan.warnings:
        console.print(f"warning: {w}", style="yellow")


def _wait(console: Console, store: SweepStore, jobs: list, run_ids: list[str]) -> int:
    """Show the runs until they end; 0 if all completed or diverged. Ctrl-C stops watching
    only: the runs go on. On a terminal a live table; in a file or a CI log a line per run
    whose state changes, then the final table."""

    def views() -> dict[str, contract.RunView]:
        return {rid: contract.view_run(store.run_dir(rid)) for rid in run_ids}

    def table(vs: dict[str, contract.RunView]) -> Table:
        t = Table("run", "state", "step", "epoch", "attempt")
        for rid, v in vs.items():
            total = f"/{v.total_steps}" if v.total_steps else ""
            t.add_row(
                rid, _word(v.state), f"{v.steps_done}{total}", f"{v.epoch:.2f}", str(v.attempt)
            )
        return t

    seen: dict[str, str] = {}

    def log_changes(vs: dict[str, contract.RunView]) -> None:
        for rid, v in vs.items():
            if seen.get(rid) != v.state:
                seen[rid] = v.state
                total = f"/{v.total_steps}" if v.total_steps else ""
                console.print(f"{time.strftime('%H:%M:%S')} {rid}: {_word(v.state)} "
                              f"(step {v.steps_done}{total})")  # fmt: skip

    try:
        if console.is_terminal:
            with Live(table(views()), console=console, refresh_per_second=1) as live:
                while not runs_done(store, jobs, run_ids):
                    time.sleep(WAIT_REFRESH_S)
                    live.update(table(views()))
                live.update(table(views()))
        else:
            log_changes(views())
            while not runs_done(store, jobs, run_ids):
                time.sleep(WAIT_REFRESH_S)
                log_changes(views())
            console.print(table(views()))
    except KeyboardInterrupt:
        console.print(f"stopped watching; the runs go on (decon monitor --root {store.root})")
        return 130
    states = {rid: contract.view_run(store.run_dir(rid)).state for rid in run_ids}
    bad = {rid: s for rid, s in states.items() if s not in contract.TERMINAL_STATES}
    for rid, s in bad.items():
        console.print(f"{rid}: {s} (see {store.run_dir(rid) / contract.LOG_FILE})")
    summary = ", ".join(f"{n} {s}" for s, n in _count(states.values()).items())
    console.print(f"all {len(run_ids)} runs ended: {summary}")
    return 1 if bad else 0


def _word(state: str) -> str:
    """A submitted run that has not started is queued: `pending`, as monitor says (`missing`
    means a run no job holds, which `decon recover` resubmits)."""
    return "pending" if state == contract.MISSING else state


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
