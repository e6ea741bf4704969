"""Reusable option aliases and completions shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deconcnn_cli.config import profile_names, variant_names
from deconcnn_cli.sweep.profiles import grid_names, resource_names


def complete_variant(incomplete: str) -> list[str]:
    return [v for v in variant_names() if v.startswith(incomplete)]


def complete_profile(incomplete: str) -> list[str]:
    return [p for p in profile_names() if p.startswith(incomplete)]


def complete_grid(incomplete: str) -> list[str]:
    return [g for g in grid_names() if g.startswith(incomplete)]


def complete_resources(incomplete: str) -> list[str]:
    return [r for r in resource_names() if r.startswith(incomplete)]


GridOpt = Annotated[
    str,
    typer.Option(
        "--grid",
        "-g",
        help="Grid (name in profiles/grids/ or a .toml path).",
        autocompletion=complete_grid,
    ),
]
ResourcesOpt = Annotated[
    str | None,
    typer.Option(
        "--resources",
        "-r",
        help="Resource profile (name in profiles/resources/ or a .toml path).",
        autocompletion=complete_resources,
    ),
]
VariantOpt = Annotated[
    str | None,
    typer.Option(
        "--variant",
        "-v",
        help="loss_lin_slope variant profile (base, bn_off, ...).",
        autocompletion=complete_variant,
    ),
]
ProfileOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--profile",
        "-p",
        help="Extra profile (name in profiles/ or a .toml path), "
        "layered in order after the variant.",
        autocompletion=complete_profile,
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override any field: --set optim.lr=0.05 (TOML value)."),
]
RootOpt = Annotated[
    Path,
    typer.Option(
        "--root",
        help="Folder that holds this run's directory, <root>/<run_id>/ (not a sweep root).",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (batch jobs): one line per event.")
]
SweepRootOpt = Annotated[
    Path,
    typer.Option(
        "--root",
        help="Sweep root: the folder `decon submit` made (sweep.json, runs/, jobs/; "
        "docs/sweep-root.md), not a folder of `decon train` runs.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
