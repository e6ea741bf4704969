"""``decon recover``: repair a sweep's unfinished runs; parse -> plan/apply -> render."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from deconcnn_cli import jsonout
from deconcnn_cli.commands.options import JsonOpt, SweepRootOpt
from deconcnn_cli.commands.render import exit_on_error
from deconcnn_cli.sweep.recover import (
    EXIT_NEEDS_PERSON,
    EXIT_RECOVERED,
    PERSON,
    RecoverPlan,
    recover_sweep,
)
from deconcnn_cli.sweep.trust import writable_warning

_VERB = {
    "resume": "resume from its newest checkpoint",
    "alone": "rerun alone on its GPU (batch size unchanged)",
    "retry": "retry once",
    "submit": "submit (never started)",
    "cancel": "cancel the hung job (the next recover resumes it)",
    "person": "LEFT FOR A PERSON",
    "wait": "wait (heartbeat still fresh)",
}


def _render(plan: RecoverPlan, dry_run: bool) -> None:
    head = "plan (dry run, nothing changed)" if dry_run else "recover"
    untouched = ", ".join(f"{s} {n}" for s, n in sorted(plan.untouched.items()))
    typer.echo(f"{head}: {len(plan.actions)} run(s) need action; untouched: {untouched or '-'}")
    for note in plan.scheduler_notes:
        typer.echo(f"scheduler degraded: {note}")
    for a in plan.actions:
        typer.echo(f"  {a.run_id}: {a.cause} -> {_VERB.get(a.action, a.action)}  [{a.why}]")
        if a.traceback:
            typer.echo("    " + "\n    ".join(a.traceback.rstrip().splitlines()[-8:]))


def recover(
    run_ids: Annotated[
        list[str] | None, typer.Argument(help="Only these runs (default: every run).")
    ] = None,
    root: SweepRootOpt = Path("."),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the plan; submit, cancel and write nothing.")
    ] = False,
    resources: Annotated[
        str | None,
        typer.Option(
            "--resources",
            help="Resource profile (name or .toml path) for the resubmissions "
            "(default: the one each run was last submitted with).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Resume, rerun alone, retry once or hand to a person: each unfinished run by its cause."""
    with exit_on_error():
        plan, new_jobs = recover_sweep(root, run_ids or None, dry_run=dry_run, resources=resources)
    if (loose := writable_warning(root)) is not None:
        typer.echo(f"warning: {loose}", err=True)
    if as_json:
        typer.echo(
            json.dumps(
                jsonout.json_safe({**plan.to_json(), "dry_run": dry_run, "new_jobs": new_jobs})
            )
        )
    else:
        _render(plan, dry_run)
        for rid, jobs in sorted(new_jobs.items()):
            typer.echo(f"  submitted {rid}: job {', '.join(jobs)}")
        for rid, why in sorted(plan.not_submitted.items()):
            typer.echo(f"  not submitted {rid}: {why}")
    raise typer.Exit(EXIT_NEEDS_PERSON if plan.of(PERSON) else EXIT_RECOVERED)
