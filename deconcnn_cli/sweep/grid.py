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
from dataclasses import dataclass

from deconcnn_cli.config import (
    GridSpec,
    Layer,
    ResourceProfile,
    RunConfig,
    build_config,
    deep_merge,
    identity_dict,
    load_grid_spec,
    load_resource_profile,
    read_toml,
    resolve_profile,
    run_id,
)
from deconcnn_cli.errors import ConfigError


@dataclass(frozen=True)
class GridRun:
    """One point of a grid: its id, its axis values and its resolved config."""

    run_id: str
    variant: str
    lr: float
    weight_decay: float
    seed: int
    config: RunConfig

    def manifest_entry(self) -> dict:
        """The run's entry in ``sweep.json``'s ``runs`` (docs/sweep-root.md)."""
        return {
            "variant": self.variant,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "config": self.config.model_dump(mode="json"),
        }


def load_grid(name_or_path: str) -> GridSpec:
    """A grid by name (``profiles/grids/NAME.toml``) or path; errors name file and field."""
    return load_grid_spec(name_or_path)


def load_resources(name_or_path: str) -> ResourceProfile:
    """A resource profile by name (``profiles/resources/NAME.toml``) or path."""
    return load_resource_profile(name_or_path)


def expand_grid(spec: GridSpec) -> list[RunConfig]:
    """Every run of the grid as a full RunConfig (``run_id(cfg)`` is its id), stable order."""
    return [run.config for run in expand_grid_runs(spec)]


def expand_grid_runs(spec: GridSpec) -> list[GridRun]:
    """Like :func:`expand_grid`, with each run's id and axis values; duplicates are refused."""
    runs: list[GridRun] = []
    seen: dict[str, GridRun] = {}
    for variant in spec.variants:
        base = _base_layers(spec, variant)
        axes = spec.axes_for(variant)
        for lr, wd, seed in itertools.product(axes.lr, axes.weight_decay, axes.seed):
            point = {"seed": seed, "optim": {"lr": lr, "weight_decay": wd}}
            cfg = build_config([*base, (f"grid {spec.name} axes", point)])
            rid = run_id(cfg)
            if rid in seen:
                raise ConfigError(
                    f"grid {spec.name}: two points give the same run {rid}",
                    "remove the duplicate axis value",
                )
            run = GridRun(rid, variant, lr, wd, seed, cfg)
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
    configs = [r.config if isinstance(r, GridRun) else r for r in runs]
    items = sorted((run_id(c), identity_dict(c)) for c in configs)
    canonical = json.dumps(items, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
