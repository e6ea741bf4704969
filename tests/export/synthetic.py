"""Synthetic sweep roots in the documented format (docs/sweep-root.md, docs/run-directory.md).

Used where real training cannot give the numbers a test needs (chosen R^2 and alpha values for
H1/H2) or the size a bench needs (216 runs x 17,600 steps). Values are written through the
contract's own cell encoder, exactly as the run writer does.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deconcnn_cli import contract, fileio
from deconcnn_cli.config import RunConfig, config_hash
from deconcnn_cli.config import run_id as config_run_id
from deconcnn_cli.training.schedule import val_steps_in_epoch


def write_manifest(root: Path, runs: Mapping[str, Mapping[str, Any]], grid: str = "test") -> None:
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "schema_version": 1,
        "grid": grid,
        "grid_hash": "0123456789abcdef",
        "code_version": "0.1.0+gtest",
        "created_unix": 1764355200.0,
        "runs": {rid: dict(spec) for rid, spec in runs.items()},
        "submissions": [
            {
                "time_unix": 1764355300.0,
                "executor": "local",
                "resources": "local",
                "code_version": "0.1.0+gtest",
                "jobs": [{"job_id": f"job_{i}", "run_ids": [rid]} for i, rid in enumerate(runs)],
            }
        ],
    }
    fileio.atomic_write_json(root / "sweep.json", manifest)


def _write_stream(path: Path, name: str, columns: Mapping[str, Any]) -> None:
    header = contract.STREAMS[name]
    n = len(columns["step"])
    lines = [",".join(header)]
    cols = [columns.get(h) for h in header]
    for i in range(n):
        lines.append(",".join(contract.format_cell(None if c is None else c[i]) for c in cols))
    path.write_text("\n".join(lines) + "\n")


def run_config(
    *,
    steps: int = 400,
    steps_per_epoch: int = 20,
    seed: int = 0,
    curvature_every: int = 500,
    analysis: Mapping[str, Any] | None = None,
    variant: str = "base",
    lr: float | None = None,
    weight_decay: float | None = None,
) -> RunConfig:
    """The config :func:`write_run` writes into config.json for these arguments (``lr`` and
    ``weight_decay``: the defaults' where None)."""
    optim = {k: v for k, v in (("lr", lr), ("weight_decay", weight_decay)) if v is not None}
    return RunConfig(
        variant=variant,
        seed=seed,
        optim=optim,
        schedule={"epochs": max(1, steps // steps_per_epoch), "warmup_epochs": 0},
        cadence={"curvature_every_steps": curvature_every, "noise_every_epochs": 1,
                 "shape_every_epochs": 1, "val_per_epoch": 4},
        analysis=dict(analysis or {}),
    )  # fmt: skip


def real_run_id(**kwargs: Any) -> str:
    """The run id :func:`write_run`'s config has (its keyword arguments as run_config's):
    the directory name under which ``decon verify`` finds such a run its own."""
    return config_run_id(run_config(**kwargs))


def write_run(
    root: Path,
    run_id: str,
    *,
    state: str = "completed",
    steps: int = 400,
    steps_per_epoch: int = 20,
    alpha: float = 0.3,
    prefactor: float = 2.5,
    noise: float = 0.02,
    seed: int = 0,
    summary: Mapping[str, Any] | None = None,
    status_extra: Mapping[str, Any] | None = None,
    curvature_every: int = 500,
    analysis: Mapping[str, Any] | None = None,
    sharpness: bool = True,
    axes: Mapping[str, Any] | None = None,
) -> Path:
    """A run directory whose train loss follows ``prefactor * t^-alpha`` (t = step + 1).

    ``analysis`` sets the config's analysis section (``config.json``); a summary records the
    settings only where ``summary`` itself has ``analysis_settings``. ``axes`` (variant, lr,
    weight_decay) go into the config as well (:func:`run_config`).
    """
    rng = np.random.default_rng(seed)
    run = root / "runs" / run_id
    (run / contract.METRICS_DIR).mkdir(parents=True, exist_ok=True)
    (run / contract.CHECKPOINT_DIR).mkdir(exist_ok=True)
    t = np.arange(steps, dtype=np.float64)
    loss = prefactor * (t + 1) ** -alpha * np.exp(noise * rng.standard_normal(steps))
    if state == "diverged":
        loss[-1] = math.nan
    epoch = (t + 1) / steps_per_epoch
    lr = np.full(steps, 0.1)
    _write_stream(
        contract.stream_path(run, "step"),
        "step",
        {
            "step": t.astype(int).tolist(),
            "epoch": epoch.tolist(),
            "loss_train_nats": loss.tolist(),
            "loss_train_bits": (loss / math.log(2)).tolist(),
            "acc_train": np.clip(1 - loss / 3, 0, 1).tolist(),
            "lr": lr.tolist(),
            "wd": [1e-4] * steps,
        },
    )
    spe = steps_per_epoch
    positions = sorted(val_steps_in_epoch(spe, 4))
    vstep = np.array([e * spe + p for e in range(steps // spe) for p in positions])
    vloss = 1.1 * prefactor * (vstep + 1.0) ** -alpha + 0.1
    _write_stream(
        contract.stream_path(run, "val"),
        "val",
        {
            "step": vstep.tolist(),
            "epoch": ((vstep + 1) / steps_per_epoch).tolist(),
            "loss_val_nats": vloss.tolist(),
            "acc_val": np.clip(1 - vloss / 3, 0, 1).tolist(),
            "grad_norm": [1.0] * len(vstep),
            "weight_norm": [30.0] * len(vstep),
        },
    )
    cstep = np.arange(0, steps, curvature_every)
    lam = 50 + 200 * (1 - np.exp(-cstep / (steps / 3)))
    _write_stream(
        contract.stream_path(run, "curvature"),
        "curvature",
        {
            "step": cstep.tolist(),
            "epoch": (cstep / steps_per_epoch).tolist(),
            "lambda_max": lam.tolist(),
            # SGD, momentum 0.9, lr 0.1, wd 1e-4 (the step stream's); None: AdamW's, not defined
            "sharpness_norm": ((lam + 1e-4) * 0.1 / 3.8).tolist() if sharpness else None,
            "hutch_trace": (800 + 3000 * (1 - np.exp(-cstep / (steps / 3)))).tolist(),
            "hutch_trace_sem": [40.0] * len(cstep),
            "n_hvp": [20] * len(cstep),
        },
    )
    estep = np.arange(steps_per_epoch - 1, steps, steps_per_epoch)
    n = len(estep)
    _write_stream(
        contract.stream_path(run, "noise"),
        "noise",
        {
            "step": estep.tolist(),
            "epoch": ((estep + 1) / steps_per_epoch).tolist(),
            **{k: [0.5] * n for k in contract.STREAMS["noise"][2:]},
        },
    )
    shape_vals: dict[str, list[Any]] = {k: [None] * n for k in contract.STREAMS["shape"][2:]}
    shape_vals["alpha_full"] = [alpha] * n
    shape_vals["power_law_r2"] = [0.99] * n
    _write_stream(
        contract.stream_path(run, "shape"),
        "shape",
        {"step": estep.tolist(), "epoch": ((estep + 1) / steps_per_epoch).tolist(), **shape_vals},
    )
    status = {
        "state": state,
        "step": steps,
        "epoch": steps / steps_per_epoch,
        "total_steps": steps,
        "steps_per_epoch": steps_per_epoch,
        "attempt": 1,
        "heartbeat_unix": time.time(),
        "precision": "fp32",
        "reason": {"diverged": "non-finite training loss", "failed": "RuntimeError: boom"}.get(
            state
        ),
        **(status_extra or {}),
    }
    fileio.atomic_write_json(run / contract.STATUS_FILE, status)
    (run / contract.ATTEMPTS_FILE).write_text(
        json.dumps({"attempt": 1, "start_unix": 1.0, "host": "node01", "slurm_job_id": "77_1"})
        + "\n"
    )
    ckpt = run / contract.CHECKPOINT_DIR / f"ckpt_{steps:09d}.pt"
    ckpt.write_bytes(b"x")
    ckpt.with_suffix(".sha256").write_text(hashlib.sha256(b"x").hexdigest() + "\n")
    cfg = run_config(steps=steps, steps_per_epoch=spe, seed=seed,
                     curvature_every=curvature_every, analysis=analysis,
                     **dict(axes or {}))  # fmt: skip
    record = {"run_id": run_id, "config_hash": config_hash(cfg),
              "config": cfg.model_dump(mode="json")}  # fmt: skip
    fileio.atomic_write_json(run / contract.CONFIG_FILE, record)
    if summary is not None:
        full = {
            "state": state,
            "steps_done": steps,
            "epochs_done": steps / spe,
            "final_loss_train_nats": float(loss[-1]),
            "final_loss_val_nats": float(vloss[-1]),
            "final_acc_val": float(np.clip(1 - vloss[-1] / 3, 0, 1)),
            "best_val_ce": None,
            "best_val_epoch": None,
            "knee_epoch": None,
            "alpha_early": None,
            "alpha_full": None,
            "power_law_r2": None,
            "burn_in_step": None,
            **summary,
        }
        fileio.atomic_write_json(run / contract.SUMMARY_FILE, full)
    return run


VARIANTS = ("base", "bn_off", "narrow", "adamw")
LRS = (0.05, 0.1, 0.2)
WDS = (1e-4, 1e-3, 1e-2)


def write_grid(
    root: Path,
    *,
    seeds: int = 2,
    steps: int = 1000,
    steps_per_epoch: int = 20,
    diverge: tuple[str, float] | None = ("bn_off", 0.2),
    missing: int = 1,
    curvature_every: int = 100,
    lr_fits: bool = False,
) -> dict[str, dict[str, Any]]:
    """A loss_lin_slope-shaped grid (4 variants x 3 lr x 3 wd x ``seeds``) of synthetic runs.

    ``diverge`` = (variant, lr) whose runs diverge; the last ``missing`` runs never start.
    ``lr_fits`` adds the lr-time fits (``alpha_*_lr``, ``power_law_r2_lr``) to the summaries.
    Exponents grow with lr and the best validation loss falls with the exponent, so H2's rho
    is strongly negative; R^2 is ~0.99.
    """
    runs: dict[str, dict[str, Any]] = {}
    rng = np.random.default_rng(1)
    shape = {"steps": steps, "steps_per_epoch": steps_per_epoch,
             "curvature_every": curvature_every}  # fmt: skip
    for variant in VARIANTS:
        for lr in LRS:
            for wd in WDS:
                for seed in range(seeds):
                    k = len(runs)  # the run's data seed: its config's seed, so its id's
                    axes = {"variant": variant, "lr": lr, "weight_decay": wd}
                    run_id = real_run_id(**shape, seed=k, **axes)
                    runs[run_id] = {**axes, "seed": seed}
    write_manifest(root, runs, grid="loss_lin_slope")
    ids = list(runs)
    for k, run_id in enumerate(ids):
        spec = runs[run_id]
        if k >= len(ids) - missing:
            continue
        alpha = 0.2 + 0.6 * spec["lr"] + 0.05 * VARIANTS.index(spec["variant"])
        alpha += 0.02 * rng.standard_normal()
        best = 2.0 - 1.5 * alpha + 0.02 * rng.standard_normal()
        state = "diverged" if diverge and (spec["variant"], spec["lr"]) == diverge else "completed"
        summary = {
            "state": state,
            "alpha_early": alpha if state == "completed" else None,
            "alpha_early_se": 0.004 + 0.002 * rng.random() if state == "completed" else None,
            "alpha_full": alpha,
            "power_law_r2": 0.985 + 0.01 * rng.random() if state == "completed" else None,
            "best_val_ce": best if state == "completed" else None,
            "best_val_epoch": steps / steps_per_epoch,
            "burn_in_step": 20,
            "knee_epoch": 20.0 if spec["variant"] == "narrow" else None,
        }
        if lr_fits and state == "completed":
            summary |= {"alpha_early_lr": alpha * 1.1, "alpha_full_lr": alpha * 1.1,
                        "power_law_r2_lr": 0.97 + 0.03 * rng.random()}  # fmt: skip
        write_run(
            root, run_id, state=state, steps=steps, steps_per_epoch=steps_per_epoch,
            alpha=alpha, seed=k, summary=summary, curvature_every=curvature_every,
            sharpness=spec["variant"] != "adamw",
            axes={a: spec[a] for a in ("variant", "lr", "weight_decay")},
        )  # fmt: skip
    return runs
