"""Cost and accuracy of the analysis metrics at their default settings, on CPU.

Two measurements, side by side in one run:

1. **Unit costs** (interleaved repetitions, medians): one training step (batch 128), one
   curvature evaluation (defaults: n_probe 256, Lanczos warm-started from the previous
   eigenvector, Hutchinson probes), one gradient-noise evaluation (k = 8), one loss-curve-shape
   update on a 17,600-step curve. From them, the overhead a 50-epoch CIFAR-10 run would see:
   352 steps/epoch x 50 = 17,600 steps, curvature at step 0 and every 500 steps (36
   evaluations), noise every 2 epochs (25), shape every epoch (50):
   ``overhead = (36 C_curv + 25 C_noise + 50 C_shape) / (17,600 C_step)``.
   Every unit is measured on the same model, so the ratio transfers; absolute times do not.
2. **A direct run** (``--direct``): the real loop (``train_run``) on a CIFAR-shaped dataset
   (the digits tiled to 45,000 training images, 32 px: 352 steps per epoch), 1,408 steps =
   4 CIFAR epochs, with the metrics at default cadences (curvature at steps 0, 500, 1000;
   noise at 704 and 1408; shape at every epoch end) against the same run with them off.
   Its ratio carries one extra curvature evaluation per 1,408 steps vs the full run's
   average (3 vs 2.9) and is printed beside the model's prediction for the same window.

Accuracy at the defaults: lambda_max relative error against a tight Lanczos (tol 1e-10),
the trace's relative standard error, HVPs per evaluation, one HVP's time vs one step.

    python bench/bench_metrics.py [--width 0.25] [--reps 3] [--direct]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import cifar_shaped_loop, tiled_digits  # noqa: E402  (bench/ sibling)

from deconcnn_cli.analysis import hessian, noise
from deconcnn_cli.config import RunConfig, load_run_config
from deconcnn_cli.training import measure
from deconcnn_cli.training.data import steps_per_epoch, train_batch
from deconcnn_cli.training.loop import build_optimizer, train_run
from deconcnn_cli.training.models import build_model
from deconcnn_cli.training.rundir import prepare_run_dir

CIFAR_STEPS = 17_600
CIFAR_SPE = 352
N_CURV, N_NOISE, N_SHAPE = 36, 25, 50


def make_config(width: float, metrics_on: bool) -> RunConfig:
    cadence = (
        {}
        if metrics_on
        else {"curvature_every_steps": 0, "noise_every_epochs": 0, "shape_every_epochs": 0}
    )
    return load_run_config(
        variant="base",
        flags={
            "model": {"width_mult": width},
            "device": "cpu",
            "data": {"dataset": "digits", "image_size": 32},
            "schedule": {"epochs": 4, "warmup_epochs": 1.0},
            "cadence": cadence,
        },
    )


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unit_costs(width: float, reps: int) -> dict[str, float]:
    cfg = make_config(width, metrics_on=True)
    splits = tiled_digits(cfg, n_train=4096)
    spe = steps_per_epoch(splits.n_train, 128)
    torch.manual_seed(0)
    model = build_model(cfg.model, splits.num_classes)
    opt = build_optimizer(cfg, model)
    for g in opt.param_groups:
        g["lr"] = 0.05
    step_no = [0]

    def train_step() -> None:
        x, y = train_batch(
            splits,
            step=step_no[0],
            steps_per_epoch=spe,
            batch_size=128,
            seed=0,
            augment=True,
            image_size=32,
        )
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_no[0] += 1

    for _ in range(30):  # leave the initial transient
        train_step()
    probe = measure.probe_batch(splits, cfg)
    state: dict = {"eigenvector": None}
    row, state = measure.curvature_row(model, probe, cfg, 0, state)  # cold start
    for _ in range(10):  # move a little: the next evaluation is warm-started, as in a run
        train_step()
    results: dict[str, list[float]] = {"step": [], "curv": [], "noise": [], "shape": [], "hvp": []}
    curv_rows = []
    losses = list(
        np.exp(-0.3 * np.log(np.arange(1, CIFAR_STEPS + 1)))
        * 2.3
        * (1 + 0.05 * np.random.default_rng(0).standard_normal(CIFAR_STEPS))
    )
    x, y = probe
    chunk = min(cfg.data.batch_size, x.shape[0])
    for _ in range(reps):
        results["step"].append(median_time(train_step, 5))
        t0 = time.perf_counter()
        r, _ = measure.curvature_row(model, probe, cfg, 500, state)
        results["curv"].append(time.perf_counter() - t0)
        with hessian.preserved_model_state(model, train=True):  # same parameters, tight tol
            op = hessian.HessianOperator(model, x, y, chunk_size=chunk)
            tight = hessian.top_hessian_eigenvalue(op, tol=1e-10, max_hvp=400)
        curv_rows.append({**r, "tight": tight.value, "tight_n_hvp": tight.n_hvp})
        t0 = time.perf_counter()
        noise.gradient_noise(model, measure.noise_batches(splits, cfg, 704))
        results["noise"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        measure.shape_row(losses, cfg, CIFAR_SPE)
        results["shape"].append(time.perf_counter() - t0)
        with hessian.preserved_model_state(model, train=True):
            op = hessian.HessianOperator(model, x, y, chunk_size=chunk)
            v = torch.randn(op.n_params)
            results["hvp"].append(median_time(lambda op=op, v=v: op(v), 3))
    out = {k: statistics.median(v) for k, v in results.items()}
    out["lambda_rel_err"] = max(
        abs(r["lambda_max"] - r["tight"]) / abs(r["tight"]) for r in curv_rows
    )
    out["trace_rel_sem"] = statistics.median(
        r["hutch_trace_sem"] / abs(r["hutch_trace"]) for r in curv_rows
    )
    out["n_hvp"] = statistics.median(r["n_hvp"] for r in curv_rows)
    out["tight_n_hvp"] = statistics.median(r["tight_n_hvp"] for r in curv_rows)
    return out


def direct_run(width: float) -> tuple[float, float]:
    """Seconds for 1,408 steps with metrics on and off (real loop, CIFAR-shaped data)."""
    times = {}
    for on in (False, True):
        cfg = make_config(width, metrics_on=on)
        with cifar_shaped_loop(cfg), tempfile.TemporaryDirectory() as tmp:
            prepare_run_dir(cfg, Path(tmp) / "r")
            t0 = time.perf_counter()
            train_run(cfg, Path(tmp) / "r")
            times[on] = time.perf_counter() - t0
    return times[False], times[True]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--direct", action="store_true")
    args = ap.parse_args()
    u = unit_costs(args.width, args.reps)
    s = u["step"]
    print(f"ResNet-18 width {args.width}, 32 px, batch 128, CPU threads {torch.get_num_threads()}")
    print(f"{'unit':<34}{'seconds (median)':>18}{'step-equivalents':>18}")
    for key, label in [
        ("step", "train step"),
        ("hvp", "one HVP (cached graph, probe batch)"),
        ("curv", "curvature evaluation (warm)"),
        ("noise", "noise evaluation (k=8)"),
        ("shape", "shape update (17,600 steps)"),
    ]:
        print(f"{label:<34}{u[key]:>18.4f}{u[key] / s:>18.1f}")
    cost = N_CURV * u["curv"] + N_NOISE * u["noise"] + N_SHAPE * u["shape"]
    print(
        f"predicted overhead of a 50-epoch CIFAR run: {cost / (CIFAR_STEPS * s):.2%}"
        f"  (curvature {N_CURV * u['curv'] / (CIFAR_STEPS * s):.2%},"
        f" noise {N_NOISE * u['noise'] / (CIFAR_STEPS * s):.2%},"
        f" shape {N_SHAPE * u['shape'] / (CIFAR_STEPS * s):.2%}); target <= 5%, never > 10%"
    )
    print(f"HVPs per curvature evaluation: {u['n_hvp']:.0f} (tight Lanczos: {u['tight_n_hvp']})")
    print(f"lambda_max relative error vs tight Lanczos: {u['lambda_rel_err']:.2e} (target 1e-3)")
    print(f"hutch_trace relative SEM: {u['trace_rel_sem']:.2%}")
    if args.direct:
        off, on = direct_run(args.width)
        window = (3 * u["curv"] + 2 * u["noise"] + 4 * u["shape"]) / (1408 * s)
        print(
            f"direct run, 1,408 steps: metrics off {off:.1f}s, on {on:.1f}s, "
            f"overhead {(on - off) / off:.2%} (model for this window: {window:.2%})"
        )


if __name__ == "__main__":
    main()
