"""The GPU path on one card, in a few minutes: the job's own environment, the protocol's criteria.

Not run by the test suite (this project's machines have no GPU). On a CUDA machine::

    .venv/bin/python bench/gpu_check.py [--variants base bn_off narrow adamw] [--steps 200]
                                        [--out DIR] [--skip-micro]

Each run is the real loop (``train_run``) at full width on 32 px images (the offline digits
tiled to ``SPE`` = 50 steps of 128 an epoch), with the protocol's cadences scaled to that
epoch (validation 4x an epoch, curvature at step 0 and every 100 steps, noise every 2 epochs,
shape and a checkpoint every epoch: ``checkpoint_every_minutes = 0``, so a kill past step 50
resumes from a checkpoint), started as a job starts it: a child process with the job's
environment (``sweep.job.child_env``: threads, ``DECON_GPU_SHARE``,
``CUBLAS_WORKSPACE_CONFIG``, ``DECON_REQUIRE_GPU=1``). Every figure of a run counts from its
first epoch on (``WARMUP_STEPS``: cuDNN's choices, lazy kernel loading and the cold step-0
curvature left out; ``sweep.gpu_figures``), and the utilization is sampled on the job's card
(NVML through ``CUDA_VISIBLE_DEVICES``) only while both runs are past it.

1. **micro** (in this process, per variant): the peak extra memory of one curvature
   evaluation over a training step's; one HVP in fp32, fp16 and bf16 autocast (ms, and the
   relative error against a float64 HVP of the same vector); the cost of deterministic
   kernels (steps/s on and off), and of its two parts a GPU session may want to drop: the NaN
   fill of new memory (``torch.utils.deterministic.fill_uninitialized_memory``) and
   ``cudnn.benchmark = False``; fused vs for-each optimizer under fp16 + GradScaler; the time
   and size of one checkpoint.
2. **job** (per variant): run A alone (1 run on the card); runs B and C at once with
   ``DECON_GPU_SHARE=2`` (2 runs per card, as a job runs them) while NVML samples the card's
   utilization; B is SIGKILLed past its first checkpoint and resumed, and its second attempt
   must have started from that checkpoint (step > 0). Every stream of B must equal C's and
   A's byte for byte (deterministic kernels, draws made on the CPU).
3. **fp16** (base): the same in fp16 + GradScaler, the RTX8000's precision, on any card.
4. **mps** (base): B and C again under a CUDA MPS daemon of this script's own
   (``sweep.mps``), when one can start.

It prints one table (the figures docs/performance.md records, with the card's name) and
writes ``gpu_check.json`` under ``--out``. The projection of a 50-epoch CIFAR run uses each
action's own measured cost from the runs' ``timing`` (docs/run-directory.md), scaled to the
protocol's counts (17,600 steps; 36 curvature, 25 noise, 50 shape, 200 validation passes of
5,000 images, a checkpoint every ``checkpoint_every_minutes``).

Exit 0 when every run completed in the expected precision, every resume started from a
checkpoint and is byte-identical, and no protocol criterion fails, judged by the rule
``decon validate`` uses (``sweep.gpu_figures.judge``: a projected 50-epoch run < 30 min and
memory within the 48 GB card, or FAIL; utilization > 80% and metrics <= 5%, or WARN; metrics
over 10%, FAIL). A CPU dry run (``--set device="cpu"``) skips the protocol's criteria.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from deconcnn_cli.sweep.gpu_figures import FAIL, GPU_CRITERIA, SKIP  # noqa: E402

SPE = 50  # steps per epoch of the tiled digits (6,400 training images / 128)
WARMUP_STEPS = SPE  # figures count from the first epoch's end on
CURV_EVERY = 100
STREAMS = ("step", "val", "curvature", "noise", "shape")
CARD_GB = 48.0  # the protocol's card (RTX 8000)
EXTRA: list[str] = []  # --set overrides (a CPU dry run of this script: --set device="cpu")
THREADS = [2]  # CPU threads per run (--threads; a job gives each run cpus_per_run)
RESULTS: dict[str, Any] = {"variants": {}, "micro": {}, "checks": []}


def log(message: str) -> None:
    print(message, flush=True)


def _cfg(variant: str, steps: int, precision: str = "auto"):
    from deconcnn_cli.config import load_run_config

    epochs = max(2, math.ceil(steps / SPE))
    overrides = [
        'data.dataset="digits"',
        "data.image_size=32",
        f"schedule.epochs={epochs}",
        "schedule.warmup_epochs=0.5",
        f"cadence.curvature_every_steps={CURV_EVERY}",
        "cadence.checkpoint_every_minutes=0",  # a checkpoint at every epoch's end
        'device="cuda"',
        f'precision="{precision}"',
        *EXTRA,
    ]
    return load_run_config(variant=variant, profiles=None, overrides=overrides, flags={})


# ---------------------------------------------------------------------------------------------
# Worker: one run (or its resume) in a child process


def worker(variant: str, steps: int, precision: str, run_dir: Path) -> None:
    import torch
    from _common import cifar_shaped_loop

    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    cfg = _cfg(variant, steps, precision)
    context = 0
    if torch.cuda.is_available():  # the context (and whatever else is on the card now)
        free, total = torch.cuda.mem_get_info()
        context = total - free
    prepare_run_dir(cfg, run_dir)
    with cifar_shaped_loop(cfg, n_train=SPE * cfg.data.batch_size):
        result = train_run(cfg, run_dir, threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
    out = {
        "state": result.state,
        "peak_bytes": peak,
        "reserved_bytes": reserved,
        "context_bytes": context,
    }
    (run_dir.parent / f"{run_dir.name}.gpu.json").write_text(json.dumps(out))


def _start(variant: str, steps: int, run_dir: Path, share: int, precision: str, env=None):
    from deconcnn_cli.runenv import child_env

    args = [sys.executable, __file__, "--worker", variant, "--steps", str(steps)]
    extra = [x for e in EXTRA for x in ("--set", e)]
    environ = {**child_env(THREADS[0], share, require_gpu=not _dry()), **(env or {})}
    cmd = [*args, *extra, "--precision", precision, "--run-dir", str(run_dir)]
    log_file = open(run_dir.parent / f"{run_dir.name}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=log_file, stderr=log_file)


def _dry() -> bool:
    return any(e.startswith("device=") for e in EXTRA)


def _status(run_dir: Path) -> dict:
    from deconcnn_cli.fileio import read_json

    return read_json(run_dir / "status.json") or {}


def _gpu_json(run_dir: Path) -> dict:
    path = run_dir.parent / f"{run_dir.name}.gpu.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _tail(run_dir: Path) -> str:
    path = run_dir.parent / f"{run_dir.name}.log"
    return path.read_text(errors="replace")[-1500:] if path.exists() else ""


def _same(a: Path, b: Path) -> dict[str, bool]:
    out = {}
    for n in STREAMS:
        pa, pb = a / "metrics" / f"{n}.csv", b / "metrics" / f"{n}.csv"
        out[n] = pa.exists() and pb.exists() and pa.read_bytes() == pb.read_bytes()
    return out


@functools.cache
def _n_val() -> int:
    """The checks' validation size (the same data for every run: built once)."""
    from _common import tiled_digits

    return tiled_digits(_cfg("base", 200), n_train=128).n_val


def _projection(run_dir: Path, since: dict | None) -> dict[str, float]:
    """A 50-epoch CIFAR run at the protocol's cadences from this run's own costs after its
    warm-up (``since``): the same projection as ``decon validate``
    (``sweep.gpu_figures.project_protocol_run``)."""
    from deconcnn_cli.sweep.gpu_figures import project_protocol_run

    return project_protocol_run(run_dir, _n_val(), since) or {}


def _resumed_from(run_dir: Path) -> int | None:
    """The step the run's last attempt resumed from (0 or None: it started afresh)."""
    from deconcnn_cli.contract import read_attempt_starts

    starts = read_attempt_starts(run_dir)
    return starts[-1].get("resumed_from_step") if len(starts) > 1 else None


def check_variant(
    variant: str, steps: int, tmp: Path, precision: str = "auto", mps_env=None, tag: str = ""
) -> bool:
    import torch

    from deconcnn_cli.sweep.gpu_figures import UtilizationSampler, WarmupWatch

    name = f"{variant}{tag}"
    a, b, c = (tmp / f"{name}_{x}" for x in "abc")
    for d in (a, b, c):
        d.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ok = True
    since_a: dict | None = None
    if not mps_env:
        with WarmupWatch([a], WARMUP_STEPS) as watch_a:
            pa = _start(variant, steps, a, 1, precision)
            code = pa.wait()
        if code != 0:
            log(f"{name}: run A failed\n{_tail(a)}")
            return False
        since_a = watch_a.snapshots[0]
    with (
        WarmupWatch([b, c], WARMUP_STEPS) as watch,
        UtilizationSampler(enabled=not _dry(), gate=watch.all_warm) as util,
    ):
        pb = _start(variant, steps, b, 2, precision, mps_env)
        pc = _start(variant, steps, c, 2, precision, mps_env)
        while int(_status(b).get("step") or 0) <= SPE + 5:  # past the checkpoint at epoch 1
            if pb.poll() is not None:
                log(f"{name}: run B ended before it could be killed\n{_tail(b)}")
                return False
            time.sleep(0.05)
        pb.send_signal(signal.SIGKILL)
        pb.wait()
        killed_at = _status(b).get("step")
        pb = _start(variant, steps, b, 2, precision, mps_env)
        ok = pb.wait() == 0 and pc.wait() == 0
    resumed_from = _resumed_from(b)
    if not ok:
        log(f"{name}: B or C failed\n{_tail(b)}\n{_tail(c)}")
    if torch.cuda.is_available() and precision == "auto":
        major, minor = torch.cuda.get_device_capability()
        expected = "bf16" if major >= 8 else "fp16"
    else:
        expected = "fp32" if _dry() else precision
    ref = c if mps_env else a
    same_c, same_a = _same(b, c), _same(b, ref)
    states = [_status(r).get("state") for r in (ref, b, c)]
    peaks = {r.name[-1]: _gpu_json(r).get("peak_bytes", 0) / 2**30 for r in (ref, b, c)}
    held = {  # what each of the two runs held on the card: reserved + its context
        r.name[-1]: (_gpu_json(r).get("reserved_bytes", 0) + _gpu_json(r).get("context_bytes", 0))
        / 1e9
        for r in (b, c)
    }
    proj_alone = _projection(ref, since_a if not mps_env else watch.snapshots[1])
    proj_two = _projection(c, watch.snapshots[1])
    row = {
        "tag": tag,
        "precision": _status(c).get("precision"),
        "expected_precision": expected,
        "states": states,
        "killed_at": killed_at,
        "resumed_from": resumed_from,
        "resumed_identical_to_C": same_c,
        "resumed_identical_to_A": same_a,
        "steps_per_s_alone": proj_alone.get("steps_per_s"),
        "steps_per_s_two": proj_two.get("steps_per_s"),
        "peak_gib": peaks,
        "held_gb_two": held,
        "utilization_two": util.mean,
        "utilization_error": util.error,
        "utilization_samples": len(util.samples),
        "projection_alone": proj_alone,
        "projection_two": proj_two,
        "mps": (_status(c).get("mps") if mps_env else None),
        "events_c": _events(c),
        "seconds": time.time() - t0,
    }
    RESULTS["variants"][name] = row
    identical = all(same_c.values()) and all(same_a.values())
    resumed = isinstance(resumed_from, int) and resumed_from > 0
    if not resumed:
        log(f"{name}: B's second attempt started from step {resumed_from}, not a checkpoint")
    good = (
        ok
        and states == ["completed"] * 3
        and identical
        and resumed
        and row["precision"] == expected
    )
    log(
        f"{name:12s} {row['precision']} (expected {expected}); steps/s alone "
        f"{_f(row['steps_per_s_alone'])}, two at once {_f(row['steps_per_s_two'])}; util "
        f"{_pct(util.mean)}; peak GiB {peaks}; killed at {killed_at}, resumed from {resumed_from}; "
        f"identical to C "
        f"{all(same_c.values())}, to A {all(same_a.values())} {same_c if not identical else ''};"
        f" projected 50-epoch run {_f(proj_two.get('projected_min'))} min (2/card), metrics "
        f"{_pct(proj_two.get('metrics_share'))}; {row['seconds']:.0f} s; states {states}"
    )
    return good


def _events(run_dir: Path) -> list[str]:
    from deconcnn_cli.fileio import read_jsonl

    return [
        e.get("message", "")[:160]
        for e in read_jsonl(run_dir / "events.jsonl")
        if e.get("level") in ("warning", "error")
    ][:6]


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


# ---------------------------------------------------------------------------------------------
# Micro measurements, in this process


def micro(variants: list[str]) -> None:
    import torch
    import torch.nn.functional as F
    from _common import median_time, tiled_digits

    from deconcnn_cli.analysis import hessian
    from deconcnn_cli.training.checkpoint import save_checkpoint
    from deconcnn_cli.training.data import normalize, train_batch
    from deconcnn_cli.training.device import deterministic, resolve_device
    from deconcnn_cli.training.models import build_model
    from deconcnn_cli.training.setup import build_optimizer

    device = resolve_device("cuda" if not _dry() else "cpu")
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for variant in variants:
        cfg = _cfg(variant, 200)
        splits = tiled_digits(cfg, n_train=SPE * 128, device=device)
        torch.manual_seed(0)
        model = build_model(cfg.model, splits.num_classes).to(device)
        opt = build_optimizer(cfg, model)
        x = normalize(splits.train_x[:128], splits.mean, splits.std)
        y = splits.train_y[:128]
        row: dict[str, Any] = {}
        prec = torch.bfloat16 if cuda and torch.cuda.get_device_capability()[0] >= 8 else None

        def step(model=model, opt=opt, x=x, y=y, prec=prec) -> None:
            with torch.autocast(device.type, dtype=prec or torch.float32, enabled=prec is not None):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
            step()
            sync()
            row["train_step_peak_gib"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**30
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        res = hessian.evaluate_curvature(
            model, x, y, chunk_size=128, n_probes=cfg.analysis.hutchinson_probes, generator=gen,
            tol=cfg.analysis.lanczos_tol, max_hvp=cfg.analysis.lanczos_max_hvp,
        )  # fmt: skip
        sync()
        row["curvature_cold_s"] = time.perf_counter() - t0
        row["curvature_n_hvp"] = res.n_hvp
        row["lambda_max"] = res.lambda_max
        if cuda:
            row["curvature_extra_peak_gib"] = (
                torch.cuda.max_memory_allocated() - base_alloc
            ) / 2**30
        # HVP precision: time and error against a float64 HVP of the same vector
        v = torch.randn(sum(p.numel() for p in model.parameters()), generator=gen).to(device)
        m64 = build_model(cfg.model, splits.num_classes).to(device).double()
        m64.load_state_dict(model.state_dict())
        exact = hessian.HessianOperator(m64, x.double(), y, chunk_size=128)(v.double())
        del m64
        for p in ("fp32", "fp16", "bf16"):
            op = hessian.HessianOperator(model, x, y, chunk_size=128, precision=p)
            hv = op(v)
            err = float((hv.double() - exact).norm() / exact.norm())
            row[f"hvp_{p}_ms"] = 1e3 * median_time(lambda op=op, v=v: (op(v), sync()), 5)
            row[f"hvp_{p}_rel_err"] = err
            del op
        row["step_ms"] = 1e3 * median_time(lambda step=step: (step(), sync()), 10)
        with deterministic(device):
            row["step_deterministic_ms"] = 1e3 * median_time(lambda step=step: (step(), sync()), 10)
            # its two parts a GPU session may want to drop, one at a time
            fill = torch.utils.deterministic.fill_uninitialized_memory
            torch.utils.deterministic.fill_uninitialized_memory = False
            try:
                row["step_deterministic_no_fill_ms"] = 1e3 * median_time(
                    lambda step=step: (step(), sync()), 10, warmup=True
                )
            finally:
                torch.utils.deterministic.fill_uninitialized_memory = fill
            torch.backends.cudnn.benchmark = True  # restored by deterministic()'s exit
            row["step_deterministic_benchmark_ms"] = 1e3 * median_time(
                lambda step=step: (step(), sync()), 10, warmup=True
            )
        # fused vs for-each under fp16 + GradScaler (the RTX8000's path)
        if cuda:
            for fused in (False, True):
                o = build_optimizer(cfg, model, fused=fused)
                scaler = torch.amp.GradScaler("cuda")

                def fp16_step(o=o, scaler=scaler, model=model, x=x, y=y) -> None:
                    with torch.autocast("cuda", dtype=torch.float16):
                        loss = F.cross_entropy(model(x).float(), y)
                    o.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(o)
                    scaler.step(o)
                    scaler.update()

                fp16_step()
                row[f"fp16_step_{'fused' if fused else 'foreach'}_ms"] = 1e3 * median_time(
                    lambda f=fp16_step: (f(), sync()), 10
                )
        # one checkpoint of the run's state, to local disk
        with tempfile.TemporaryDirectory() as d:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
            t0 = time.perf_counter()
            path = save_checkpoint(Path(d), 1, state)
            row["checkpoint_s"] = time.perf_counter() - t0
            row["checkpoint_mb"] = path.stat().st_size / 1e6
        batch_check = train_batch(
            splits, step=0, steps_per_epoch=SPE, batch_size=128, seed=0, augment=True,
            image_size=32,
        )  # fmt: skip
        row["batch_on_device"] = str(batch_check[0].device)
        RESULTS["micro"][variant] = row
        log(f"micro {variant:7s} " + ", ".join(f"{k} {_num(v)}" for k, v in row.items()))
        del model, opt
        if cuda:
            torch.cuda.empty_cache()


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------


def verdicts() -> bool:
    """The protocol's criteria for each variant, by ``decon validate``'s rule
    (``sweep.gpu_figures.judge``); SKIP in a CPU dry run, as ``decon validate`` without a GPU."""
    from deconcnn_cli.sweep.gpu_figures import judge

    rows = {n: r for n, r in RESULTS["variants"].items() if not r["tag"]}  # auto, no MPS
    checks = RESULTS["checks"]

    def check(name: str, verdict: str, detail: str) -> None:
        checks.append({"criterion": name, "verdict": verdict.upper(), "detail": detail})
        log(f"{verdict.upper():4s} {name}: {detail}")

    for name, r in rows.items():
        if _dry():
            for criterion in GPU_CRITERIA:
                check(f"{name}: {criterion}", SKIP, "skipped: no GPU (dry run)")
            continue
        two = r["projection_two"]
        if not two:
            check(f"{name}: projection", FAIL, "no timing recorded")
            continue
        for criterion, verdict, detail in judge(
            steps_per_s=[r["steps_per_s_two"] or 0.0] * 2,
            utilization=r["utilization_two"],
            memory_gb=list(r["held_gb_two"].values()),
            card_gb=CARD_GB,
            projected_min=two.get("projected_min", math.inf),
            metrics_share=two.get("metrics_share", math.inf),
            why_no_utilization=r["utilization_error"] or "not measured",
        ):
            check(f"{name}: {criterion}", verdict, detail)
        no_oom = not any("out of memory" in e for e in r["events_c"])
        check(f"{name}: no OOM with 2 runs per card", "pass" if no_oom else FAIL, "events of C")
    return bool(rows) and all(c["verdict"] != FAIL.upper() for c in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["base", "bn_off", "narrow", "adamw"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--out", type=Path, default=None, help="where gpu_check.json goes")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--skip-fp16", action="store_true")
    parser.add_argument("--skip-mps", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    EXTRA.extend(a.set)
    THREADS[0] = a.threads
    if a.worker:
        worker(a.worker, a.steps, a.precision, a.run_dir)
        return
    import torch

    if not torch.cuda.is_available() and not _dry():
        raise SystemExit("gpu_check: no CUDA device visible")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    RESULTS["card"], RESULTS["torch"] = name, torch.__version__
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        RESULTS["capability"] = f"sm_{major}{minor}"
    log(f"{name} {RESULTS.get('capability', '')}, torch {torch.__version__}")
    out = a.out or Path(tempfile.gettempdir())
    out.mkdir(parents=True, exist_ok=True)
    results = []

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))

    def guarded(label: str, fn, *args, **kwargs) -> None:
        try:
            results.append(bool(fn(*args, **kwargs)))
        except Exception as exc:  # one phase's failure does not hide the others' figures
            import traceback

            traceback.print_exc()
            log(f"{label}: failed: {type(exc).__name__}: {exc}")
            results.append(False)
        save()

    # in order of what matters most if the time runs out: the first variant's job run (the
    # start-up crashes, exact resume, 2 per card), fp16, MPS, the micro figures, the rest
    first, rest = a.variants[0], a.variants[1:]
    with tempfile.TemporaryDirectory() as tmp:
        guarded(first, check_variant, first, a.steps, Path(tmp))
        if not a.skip_fp16 and not _dry():
            guarded("fp16", check_variant, first, a.steps, Path(tmp), "fp16", None, "_fp16")
        if not a.skip_mps:
            from deconcnn_cli.sweep.mps import start_mps

            daemon = start_mps("gpu-check")
            RESULTS["mps"] = {"active": daemon.active, "reason": daemon.reason}
            log(f"MPS: {'started' if daemon.active else 'not started: ' + daemon.reason}")
            try:
                if daemon.active:
                    env = daemon.env()
                    guarded("mps", check_variant, first, a.steps, Path(tmp), "auto", env, "_mps")
            finally:
                daemon.stop()
        if not a.skip_micro:
            guarded("micro", lambda: micro(a.variants) or True)
        for v in rest:
            guarded(v, check_variant, v, a.steps, Path(tmp))
    ok = verdicts() and all(results)
    save()
    log(f"gpu_check: {'PASS' if ok else 'FAIL'} (json: {out / 'gpu_check.json'})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
