"""Cost and accuracy of the analysis metrics at their default settings, on CPU.

Two measurements, side by side in one run:

1. **Unit costs** (medians): one training step (batch 128, median over the steps between
   evaluations), one curvature evaluation at the defaults (cold at initialisation, as at step
   0 of a run; then warm-started from the eigenvector of the evaluation ``--between`` steps
   earlier, 500 as in a run), one gradient-noise evaluation (k = 8), one loss-curve-shape
   update on a 17,600-step curve, one validation pass over 5,000 images (CIFAR-10's split).
   From them, the overhead a 50-epoch CIFAR-10 run would see: 352 steps/epoch x 50 = 17,600
   steps, curvature at step 0 (cold) and every 500 steps (35 warm), noise every 2 epochs
   (25), shape every epoch (50):
   ``overhead = (C_cold + 35 C_curv + 25 C_noise + 50 C_shape) / (17,600 C_step)``, of the
   training steps alone; and of the run as it runs, whose time also holds its 200 validation
   passes (4 an epoch): ``... / (17,600 C_step + 200 C_val)``.
   Every unit is measured on the same model, so the ratio transfers; absolute times do not.
2. **A direct run** (``--direct``): the real loop (``train_run``) on a CIFAR-shaped dataset
   (the digits tiled to 45,000 training and 5,000 validation images, 32 px: 352 steps per
   epoch), 1,408 steps =
   4 CIFAR epochs, with the metrics at default cadences (curvature at steps 0, 500, 1000;
   noise at 704 and 1408; shape at every epoch end) against the same run with them off.
   Its ratio carries one extra curvature evaluation per 1,408 steps vs the full run's
   average (3 vs 2.9) and is printed beside the model's prediction for the same window.

Accuracy at the defaults: lambda_max relative error against ARPACK (``eigsh``, tol 1e-9, an
implementation independent of ours), the trace's relative standard error (``--compare-old``:
also that of the previous defaults, probe 256 and 32 eigenvector-deflated probes, at the same
parameters), HVPs per evaluation, one HVP's time vs one step.

    python bench/bench_metrics.py [--width 0.25] [--reps 3] [--between 500] [--compare-old]
                                  [--direct]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import (  # noqa: E402  (bench/ sibling)
    CIFAR_SPE,
    CIFAR_STEPS,
    CIFAR_VAL,
    N_CURV,
    N_NOISE,
    N_SHAPE,
    N_VAL,
    Trajectory,
    bench_config,
    cifar_shaped_loop,
    median_time,
)
from scipy.sparse.linalg import LinearOperator, eigsh

from deconcnn_cli.analysis import hessian, noise
from deconcnn_cli.config import RunConfig
from deconcnn_cli.training import measure
from deconcnn_cli.training.device import resolve_precision
from deconcnn_cli.training.loop import train_run
from deconcnn_cli.training.measure import evaluate
from deconcnn_cli.training.rundir import prepare_run_dir

OVERRIDES: list[str] = []  # --set KEY=VALUE: the analysis settings under test (default: none)


def make_config(width: float, metrics_on: bool) -> RunConfig:
    off = {"curvature_every_steps": 0, "noise_every_epochs": 0, "shape_every_epochs": 0}
    return bench_config(width, None if metrics_on else off, OVERRIDES)


def tight_lambda(op: hessian.HessianOperator) -> tuple[float, int]:
    """Reference lambda_max from ARPACK (``eigsh``, tol 1e-9): independent of our Lanczos."""
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        out = op(torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1)))
        return out.detach().to(torch.float64).numpy()

    n = op.n_params
    lin = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    values = eigsh(lin, k=1, which="LA", tol=1e-9, ncv=20, maxiter=400)[0]
    return float(values[0]), count[0]


def old_estimator_rel_sem(model, splits, cfg: RunConfig, seed: int) -> float:
    """The previous defaults' trace rel. SEM at the same parameters: probe 256, 32 probes
    deflated by the top eigenvector only."""
    cfg_old = cfg.model_copy(update={"analysis": cfg.analysis.model_copy(update={"n_probe": 256})})
    x, y = measure.probe_batch(splits, cfg_old)
    with hessian.preserved_model_state(model, train=True):
        op = hessian.HessianOperator(model, x, y, chunk_size=cfg.data.batch_size)
        eig = hessian.top_hessian_eigenvalue(op, tol=1e-4, max_hvp=60)
        vec = eig.vector.double() / eig.vector.double().norm()
        tr = hessian.hutchinson_trace(
            op,
            n_probes=32,
            generator=torch.Generator().manual_seed(seed),
            deflation_vectors=vec[:, None],
            deflation_values=[eig.ritz_value],
        )
    return tr.sem / abs(tr.mean)


def unit_costs(width: float, reps: int, between: int, compare_old: bool) -> dict[str, float]:
    cfg = make_config(width, metrics_on=True)
    run = Trajectory(width, 0.05, n_val=CIFAR_VAL)
    splits, model, train_step = run.splits, run.model, run.step
    fp32 = resolve_precision("fp32", torch.device("cpu"))

    probe = measure.probe_batch(splits, cfg)
    x, y = probe
    chunk = min(cfg.data.batch_size, x.shape[0])
    state: dict = {"eigenvector": None}
    results: dict[str, list[float]] = {
        "step": [],
        "curv": [],
        "noise": [],
        "shape": [],
        "hvp": [],
        "val": [],
    }
    curv_rows = []

    def curvature(step: int) -> float:
        nonlocal state
        t0 = time.perf_counter()
        r, state = measure.curvature_row(model, probe, cfg, step, state)
        seconds = time.perf_counter() - t0
        with hessian.preserved_model_state(model, train=True):  # same parameters, tight tol
            op = hessian.HessianOperator(model, x, y, chunk_size=chunk)
            tight, tight_n = tight_lambda(op)
        curv_rows.append({**r, "tight": tight, "tight_n_hvp": tight_n})
        return seconds

    cold = curvature(0)  # at initialisation, cold start: as at step 0 of a run
    losses = list(
        np.exp(-0.3 * np.log(np.arange(1, CIFAR_STEPS + 1)))
        * 2.3
        * (1 + 0.05 * np.random.default_rng(0).standard_normal(CIFAR_STEPS))
    )
    old_rel_sem = []
    for rep in range(reps):
        step_times = []
        for _ in range(between):  # as far as a run moves between two evaluations
            t0 = time.perf_counter()
            train_step()
            step_times.append(time.perf_counter() - t0)
        results["step"].append(statistics.median(step_times))
        results["curv"].append(curvature(run.step_no))  # warm start from `between` steps ago
        if compare_old:
            old_rel_sem.append(old_estimator_rel_sem(model, splits, cfg, rep))
        t0 = time.perf_counter()
        noise.gradient_noise(model, measure.noise_batches(splits, cfg, 704))
        results["noise"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        measure.shape_row(losses, cfg, CIFAR_SPE)
        results["shape"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(model, splits, cfg.data.batch_size, fp32)
        results["val"].append(time.perf_counter() - t0)
        with hessian.preserved_model_state(model, train=True):
            op = hessian.HessianOperator(model, x, y, chunk_size=chunk)
            v = torch.randn(op.n_params)
            results["hvp"].append(median_time(lambda op=op, v=v: op(v), 3))
    out = {k: statistics.median(v) for k, v in results.items()}
    out["curv_cold"] = cold
    warm = curv_rows[1:]
    err = [abs(r["lambda_max"] - r["tight"]) / abs(r["tight"]) for r in curv_rows]
    out["lambda_rel_err"] = max(err)
    out["trace_rel_sem"] = statistics.median(
        r["hutch_trace_sem"] / abs(r["hutch_trace"]) for r in warm
    )
    out["trace_rel_sem_max"] = max(r["hutch_trace_sem"] / abs(r["hutch_trace"]) for r in warm)
    out["trace_rel_ci95"] = statistics.median(
        r["hutch_trace_ci95"] / abs(r["hutch_trace"]) for r in warm
    )
    out["old_trace_rel_sem"] = statistics.median(old_rel_sem) if old_rel_sem else float("nan")
    out["n_hvp"] = statistics.median(r["n_hvp"] for r in warm)
    out["n_hvp_max"] = max(r["n_hvp"] for r in warm)
    out["n_hvp_cold"] = curv_rows[0]["n_hvp"]
    out["tight_n_hvp"] = statistics.median(r["tight_n_hvp"] for r in curv_rows)
    out["rows"] = curv_rows
    return out


def direct_run(width: float, steps: int) -> dict[str, float]:
    """The real loop (CIFAR-shaped data, default cadences) for ``steps`` steps, with the time
    inside each metric call measured in the same run: ``overhead = metrics / (total -
    metrics)``. Both sides are timed interleaved in one process, so load from other processes
    on a shared machine slows both alike (an on-run against a later off-run does not)."""
    cfg = make_config(width, metrics_on=True)
    calls: dict[str, list[float]] = {"curvature_row": [], "noise_row": [], "shape_row": []}
    originals = {name: getattr(measure, name) for name in calls}

    def timed(name):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                calls[name].append(time.perf_counter() - t0)

        return wrapper

    for name in calls:
        setattr(measure, name, timed(name))
    try:
        with cifar_shaped_loop(cfg, n_val=CIFAR_VAL), tempfile.TemporaryDirectory() as tmp:
            prepare_run_dir(cfg, Path(tmp) / "r")
            t0 = time.perf_counter()
            train_run(cfg, Path(tmp) / "r", stop_after_steps=steps)
            total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(measure, name, fn)
    return {"total": total, **calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--between", type=int, default=500, help="training steps between two evaluations"
    )
    ap.add_argument("--compare-old", action="store_true", help="old trace estimator's SEM")
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--direct-steps", type=int, default=1408, help="steps of the direct run")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override to measure instead of the defaults (repeatable), e.g."
        " analysis.n_probe=64",
    )
    args = ap.parse_args()
    OVERRIDES[:] = args.set
    u = unit_costs(args.width, args.reps, args.between, args.compare_old)
    s = u["step"]
    a = make_config(args.width, metrics_on=True).analysis
    print(f"ResNet-18 width {args.width}, 32 px, batch 128, CPU threads {torch.get_num_threads()}")
    settings = "overrides " + " ".join(args.set) if args.set else "defaults"
    print(
        f"{settings}: n_probe {a.n_probe}, hutchinson_probes {a.hutchinson_probes}, "
        f"lanczos_tol {a.lanczos_tol:g}, lanczos_max_hvp {a.lanczos_max_hvp}, noise_k "
        f"{a.noise_k}; "
        f"warm starts {args.between} steps apart"
    )
    print(f"{'unit':<34}{'seconds (median)':>18}{'step-equivalents':>18}")
    for key, label in [
        ("step", "train step"),
        ("hvp", "one HVP (cached graph, probe batch)"),
        ("curv_cold", "curvature evaluation (cold, init)"),
        ("curv", "curvature evaluation (warm)"),
        ("noise", f"noise evaluation (k={a.noise_k})"),
        ("shape", "shape update (17,600 steps)"),
        ("val", "validation pass (5,000 images)"),
    ]:
        print(f"{label:<34}{u[key]:>18.4f}{u[key] / s:>18.1f}")
    curv = u["curv_cold"] + (N_CURV - 1) * u["curv"]  # step 0 cold, then warm every 500
    cost = curv + N_NOISE * u["noise"] + N_SHAPE * u["shape"]
    print(
        f"predicted overhead of a 50-epoch CIFAR run: {cost / (CIFAR_STEPS * s):.2%}"
        f"  (curvature {curv / (CIFAR_STEPS * s):.2%},"
        f" noise {N_NOISE * u['noise'] / (CIFAR_STEPS * s):.2%},"
        f" shape {N_SHAPE * u['shape'] / (CIFAR_STEPS * s):.2%}) of the training steps;"
        f" {cost / (CIFAR_STEPS * s + N_VAL * u['val']):.2%} of the run (steps + {N_VAL}"
        " validation passes); target <= 5%, never > 10%"
    )
    print(
        f"HVPs per curvature evaluation: warm median {u['n_hvp']:.0f} (max {u['n_hvp_max']}),"
        f" cold {u['n_hvp_cold']} (ARPACK reference: {u['tight_n_hvp']:.0f})"
    )
    print(
        f"lambda_max relative error vs ARPACK tol 1e-9: max {u['lambda_rel_err']:.2e}"
        f" (tolerance {a.lanczos_tol:g})"
    )
    print(
        f"hutch_trace relative SEM: {u['trace_rel_sem']:.2%} (warm evaluations, median; max"
        f" {u['trace_rel_sem_max']:.2%}); 95% interval half-width {u['trace_rel_ci95']:.2%}"
    )
    if args.compare_old:
        print(
            f"old estimator (probe 256, 32 probes, eigenvector-deflated) at the same parameters:"
            f" {u['old_trace_rel_sem']:.2%}"
        )
    for r in u["rows"]:
        print(
            f"  step {r['step']:>5}: lambda_max {r['lambda_max']:.5g} (ARPACK {r['tight']:.5g}),"
            f" trace {r['hutch_trace']:.4g} +- {r['hutch_trace_sem']:.2g}, n_hvp {r['n_hvp']}"
        )
    if args.direct:
        d = direct_run(args.width, args.direct_steps)
        n = args.direct_steps
        spent = {k: sum(d[k]) for k in ("curvature_row", "noise_row", "shape_row")}
        metrics = sum(spent.values())
        curv = u["curv_cold"] + (len(d["curvature_row"]) - 1) * u["curv"]
        model = curv + len(d["noise_row"]) * u["noise"] + len(d["shape_row"]) * u["shape"]
        print(
            f"direct run, {n:,} steps ({len(d['curvature_row'])} curvature,"
            f" {len(d['noise_row'])} noise, {len(d['shape_row'])} shape evaluations): total"
            f" {d['total']:.1f}s, in metrics {metrics:.1f}s (curvature"
            f" {spent['curvature_row']:.1f}s, noise {spent['noise_row']:.1f}s, shape"
            f" {spent['shape_row']:.1f}s): overhead {metrics / (d['total'] - metrics):.2%}"
            f" (unit-cost model for this window, its {4 * n // CIFAR_SPE} validation passes"
            f" included: {model / (n * s + 4 * n // CIFAR_SPE * u['val']):.2%})"
        )
        step = (d["total"] - metrics) / n  # includes validation and checkpoints, as in a run
        cold, warm = d["curvature_row"][0], d["curvature_row"][1:]
        full = cold + (N_CURV - 1) * (statistics.median(warm) if warm else cold)
        full += N_NOISE * (statistics.median(d["noise_row"]) if d["noise_row"] else u["noise"])
        full += N_SHAPE * (statistics.median(d["shape_row"]) if d["shape_row"] else 0.0)
        print(
            f"direct per-call costs scaled to a 50-epoch run (its validation included):"
            f" {full / (CIFAR_STEPS * step):.2%}"
        )


if __name__ == "__main__":
    main()
