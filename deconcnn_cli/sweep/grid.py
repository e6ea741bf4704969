"""Grids and resource profiles as data: load, expand to run configs, hash. No torch.

A grid (``profiles/grids/<name>.toml``) names variants and axes; :func:`expand_grid` turns it
into one fully resolved :class:`RunConfig` per combination, in a stable order, each with its
config-hash ``run_id``. The same layering as ``decon train``: variant profile < the grid's
``profiles`` < the grid's ``overrides`` < the axis values.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

from pydantic import ValidationError

from deconcnn_cli.config import (
    Layer,
    RunConfig,
    build_config,
    deep_merge,
    identity_json,
    read_toml,
    resolve_profile,
    run_id,
)
from deconcnn_cli.errors import ConfigError
from deconcnn_cli.sweep.profiles import (
    GridSpec,
)


@dataclass(frozen=True)
class GridRun:
    """One point of a grid: its id, its axis values and its resolved config."""

    run_id: str
    variant: str
    lr: float
    weight_decay: float
    seed: int
    config: RunConfig
    # the config's identity_json, kept from the expansion so grid_hash does not redo it
    identity: str = field(default="", repr=False, compare=False)

    def manifest_entry(self) -> dict:
        """The run's entry in ``sweep.json``'s ``runs`` (docs/sweep-root.md)."""
        return {
            "variant": self.variant,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "config": self.config.model_dump(mode="json"),
        }


# A grid is counted from its axis sizes before a single run is built; beyond this many runs it
# is refused (docs/cluster.md); bench/bench_submit_dry_run.py measures the cost up to it.
MAX_GRID_RUNS = 100_000


def count_grid_runs(spec: GridSpec) -> dict[str, tuple[int, int, int]]:
    """``{variant: (lr values, weight_decay values, seeds)}``: the grid's size, from its axes
    alone (nothing is expanded); the runs are the sum of the products."""
    out = {}
    for variant in spec.variants:
        axes = spec.axes_for(variant)
        out[variant] = (len(axes.lr), len(axes.weight_decay), len(axes.seed))
    return out


def grid_run_count(spec: GridSpec) -> int:
    """The grid's number of runs: per variant, |lr| x |weight_decay| x |seed|."""
    return sum(a * b * c for a, b, c in count_grid_runs(spec).values())


def check_grid_size(spec: GridSpec, limit: int = MAX_GRID_RUNS) -> int:
    """The grid's number of runs; :class:`ConfigError` naming the axes when over ``limit``."""
    sizes = count_grid_runs(spec)
    total = grid_run_count(spec)
    if total > limit:
        parts = "; ".join(
            f"{v}: lr {a} x weight_decay {b} x seed {c} = {a * b * c:,}"
            for v, (a, b, c) in sizes.items()
        )
        raise ConfigError(
            f"grid {spec.name} has {total:,} runs, over the limit of {limit:,} ({parts})",
            "shrink an axis, or split the sweep into several grids (each its own --root)",
        )
    return total


def expand_grid(spec: GridSpec) -> list[RunConfig]:
    """Every run of the grid as a full RunConfig (``run_id(cfg)`` is its id), stable order."""
    return [run.config for run in expand_grid_runs(spec)]


def expand_grid_runs(spec: GridSpec) -> list[GridRun]:
    """Like :func:`expand_grid`, with each run's id and axis values; duplicates are refused,
    and so is a grid over MAX_GRID_RUNS (counted first)."""
    check_grid_size(spec)
    runs: list[GridRun] = []
    seen: dict[str, GridRun] = {}
    for variant in spec.variants:
        base = _base_layers(spec, variant)
        merged: dict = {}
        for _, data in base:  # merged once per variant; each point adds its three values
            merged = deep_merge(merged, data)
        axes = spec.axes_for(variant)
        for lr, wd, seed in itertools.product(axes.lr, axes.weight_decay, axes.seed):
            point = {"seed": seed, "optim": {"lr": lr, "weight_decay": wd}}
            try:
                cfg = RunConfig.model_validate(deep_merge(merged, point))
            except ValidationError:  # again through the layers: the error names the source
                cfg = build_config([*base, (f"grid {spec.name} axes", point)])
            identity = identity_json(cfg)
            rid = run_id(cfg, identity)
            if rid in seen:
                raise ConfigError(
                    f"grid {spec.name}: two points give the same run {rid}",
                    "remove the duplicate axis value",
                )
            run = GridRun(rid, variant, lr, wd, seed, cfg, identity)
            seen[rid] = run
            runs.append(run)
    return runs


def _base_layers(spec: GridSpec, variant: str) -> list[Layer]:
    path = resolve_profile(variant, variant=True)
    layers: list[Layer] = [(str(path), deep_merge({"variant": variant}, read_toml(path)))]
    for name in spec.profiles:
        p = resolve_profile(name)
        layers.append((str(p), read_toml(p)))
    if spec.overrides:
        layers.append((f"grid {spec.name} overrides", spec.overrides))
    if spec.variant_overrides.get(variant):
        layers.append(
            (f"grid {spec.name} variant_overrides.{variant}", spec.variant_overrides[variant])
        )
    return layers


def grid_hash(runs: list[RunConfig] | list[GridRun]) -> str:
    """sha256 of the expanded grid's run ids + result-affecting configs, first 16 hex.

    Fields that do not change results (device, data_dir, ...) are left out, so the same grid
    on another cluster with its data elsewhere has the same hash.
    """
    items = []
    for r in runs:
        if isinstance(r, GridRun) and r.identity:
            items.append((r.run_id, r.identity))
        else:
            cfg = r.config if isinstance(r, GridRun) else r
            identity = identity_json(cfg)
            items.append((run_id(cfg, identity), identity))
    items.sort()
    # the bytes of json.dumps(sorted [(run_id, identity_dict)], sort_keys, no spaces)
    canonical = "[" + ",".join(f"[{json.dumps(rid)},{ident}]" for rid, ident in items) + "]"
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
