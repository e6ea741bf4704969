"""``decon verify``: certify a sweep; parse -> verify_sweep -> render. Exit 0 only when clean."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from deconcnn_cli import jsonout
from deconcnn_cli.commands.options import JsonOpt, SweepRootOpt
from deconcnn_cli.commands.render import exit_on_error
from deconcnn_cli.sweep.verify import verify_sweep


def verify(root: SweepRootOpt = Path("."), as_json: JsonOpt = False) -> None:
    """Every run present and final, every stream whole, checksums and code version agree."""
    with exit_on_error():
        result = verify_sweep(root)
    if as_json:
        typer.echo(json.dumps(jsonout.json_safe(result.to_json()), indent=2))
        raise typer.Exit(result.exit_code)
    counts = ", ".join(f"{s} {n}" for s, n in sorted(result.counts.items()))
    typer.echo(f"{result.root}: {result.n_runs} runs ({counts})")
    for p in result.problems:
        typer.echo(f"{p.run_id or 'sweep'}: {p.file or '-'}: {p.kind}: {p.message}")
    if result.ok:
        version = next(iter(result.code_versions), "unknown")
        typer.echo(f"verified: complete and clean (code {version})")
    else:
        typer.echo(f"NOT verified: {len(result.problems)} problem(s)", err=True)
    raise typer.Exit(result.exit_code)
