"""The GPU path, checked on a CUDA machine in a few minutes (target < 8 min on one modern GPU).

Not run by the test suite (this project's machines have no GPU). A maintainer with a CUDA
device runs::

    .venv/bin/python bench/gpu_check.py [--variants base bn_off narrow adamw] [--steps 300]

Per variant, at full width on 32 px images (the offline digits tiled to 100 steps an epoch),
with the protocol's cadences scaled to that epoch (validation 4x an epoch, curvature every
150 steps and at step 0, noise every 2 epochs, shape every epoch, checkpoint every epoch):

1. run A alone: steps/s and peak ``torch.cuda.max_memory_allocated``;
2. runs B and C at once on the same card (two runs per GPU, as on the cluster): peak memory of
   each; B is SIGKILLed past its first checkpoint and resumed while C goes on;
3. prints the precision chosen (auto: bf16 from sm_80, fp16 + GradScaler below), whether B's
   resumed streams equal C's and A's, and the largest relative difference of the training loss
   (A vs C is the card's own run-to-run nondeterminism, the baseline for B);
4. prints what the analysis metrics cost run A on this card (its recorded ``timing``), and
   that scaled to a 50-epoch CIFAR run at the protocol's cadences: the figure METRICS.md's 5%
   budget is about, which the CPU benches cannot give for a GPU.

Exit code 0 when every run completed with the expected precision and B matches C as closely
as A does; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPE = 100  # steps per epoch of the tiled digits (12,800 training images / 128)
STREAMS = ("step", "val", "curvature", "noise", "shape")


EXTRA: list[str] = []  # --set overrides (a CPU dry run of the script itself, e.g.)


def _cfg(variant: str, steps: int):
    from deconcnn_cli.config import load_run_config

    epochs = max(1, math.ceil(steps / SPE))
    overrides = [
        'data.dataset="digits"',
        "data.image_size=32",
        f"schedule.epochs={epochs}",
        "schedule.warmup_epochs=0.5",
        "cadence.curvature_every_steps=150",
        'device="cuda"',
        *EXTRA,
    ]
    return load_run_config(variant=variant, profiles=None, overrides=overrides, flags={})


def worker(variant: str, steps: int, run_dir: Path) -> None:
    """One run (or its resume) in this process; writes peak memory beside the run."""
    import torch

    sys.path.insert(0, str(REPO))
    from bench._common import cifar_shaped_loop
    from deconcnn_cli.config import prepare_run_dir
    from deconcnn_cli.training.loop import train_run

    cfg = _cfg(variant, steps)
    prepare_run_dir(cfg, run_dir)
    with cifar_shaped_loop(cfg, n_train=SPE * cfg.data.batch_size):
        result = train_run(cfg, run_dir)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    out = {"state": result.state, "peak_bytes": peak}
    (run_dir.parent / f"{run_dir.name}.gpu.json").write_text(json.dumps(out))


def _start(variant: str, steps: int, run_dir: Path) -> subprocess.Popen:
    args = [sys.executable, __file__, "--worker", variant, "--steps", str(steps)]
    extra = [x for e in EXTRA for x in ("--set", e)]
    return subprocess.Popen([*args, *extra, "--run-dir", str(run_dir)], cwd=REPO)


def _status(run_dir: Path) -> dict:
    from deconcnn_cli.contract import read_json

    return read_json(run_dir / "status.json") or {}


def _rate(run_dir: Path) -> float:
    from deconcnn_cli.contract import read_attempts

    lines = [a for a in read_attempts(run_dir) if a.get("event") != "end"]
    ends = [a for a in read_attempts(run_dir) if a.get("event") == "end"]
    return _status(run_dir)["step"] / (ends[-1]["end_unix"] - lines[0]["start_unix"])


def _peak_gib(run_dir: Path) -> float:
    data = json.loads((run_dir.parent / f"{run_dir.name}.gpu.json").read_text())
    return data["peak_bytes"] / 2**30


def _max_rel_diff(a: Path, b: Path) -> float:
    from deconcnn_cli.contract import read_stream

    ra, rb = (read_stream(p / "metrics" / "step.csv") for p in (a, b))
    if len(ra) != len(rb):
        return math.inf
    diffs = [
        abs(float(x["loss_train_nats"]) - float(y["loss_train_nats"]))
        / max(abs(float(x["loss_train_nats"])), 1e-12)
        for x, y in zip(ra, rb, strict=True)
    ]
    return max(diffs, default=0.0)


def _same(a: Path, b: Path) -> bool:
    return all(
        (a / "metrics" / f"{n}.csv").read_text() == (b / "metrics" / f"{n}.csv").read_text()
        for n in STREAMS
        if (a / "metrics" / f"{n}.csv").exists()
    )


def _metrics_cost(run_dir: Path) -> str:
    """What the analysis metrics cost run A on this card, from its recorded ``timing``
    (docs/run-directory.md), and that scaled to a 50-epoch CIFAR run at the protocol's
    cadences (36 curvature, 25 noise, 50 shape evaluations over 17,600 steps). The per-call
    means include the cold curvature evaluation at step 0, so the curvature part is an upper
    bound; this check validates 3.5x more often per step than CIFAR, so the step time is a
    little high. Read it to about ±20%."""
    from _common import CIFAR_STEPS, N_CURV, N_NOISE, N_SHAPE  # bench/ sibling

    from deconcnn_cli.contract import analysis_split, read_stream, stream_path

    status = _status(run_dir)
    timing, steps = status.get("timing") or {}, int(status.get("step") or 0)
    counts = {k: len(read_stream(stream_path(run_dir, k))) for k in ("curvature", "noise", "shape")}
    if not timing or not steps or not counts["curvature"]:
        return "metrics cost: no timing recorded"
    analysis, rest = analysis_split(timing)
    per_call = {k: timing[f"{k}_s"] / n if n else 0.0 for k, n in counts.items()}
    cost = sum(
        n * per_call[k] for k, n in (("curvature", N_CURV), ("noise", N_NOISE), ("shape", N_SHAPE))
    )
    return (
        f"metrics {analysis / rest:.1%} of the rest at this check's cadences; scaled to a "
        f"50-epoch CIFAR run about {cost / (CIFAR_STEPS * rest / steps):.1%} (curvature "
        f"{per_call['curvature'] / (rest / steps):.0f} steps per evaluation, cold included)"
    )


def check_variant(variant: str, steps: int, tmp: Path) -> bool:
    import torch

    a, b, c = (tmp / f"{variant}_{x}" for x in "abc")
    t0 = time.time()
    proc = _start(variant, steps, a)
    assert proc.wait() == 0, f"{variant}: run A failed"
    pb, pc = _start(variant, steps, b), _start(variant, steps, c)
    while _status(b).get("step", 0) <= SPE + 20:  # past the first checkpoint (epoch 1)
        assert pb.poll() is None, f"{variant}: run B ended before it could be killed"
        time.sleep(0.2)
    pb.send_signal(signal.SIGKILL)
    pb.wait()
    killed_at = _status(b).get("step")
    pb = _start(variant, steps, b)
    ok = pb.wait() == 0 and pc.wait() == 0
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        expected, arch = ("bf16" if major >= 8 else "fp16"), f"sm_{major}{minor}"
    else:  # a CPU dry run of this script
        expected, arch = "fp32", "cpu"
    precision = _status(a).get("precision")
    states = [_status(r).get("state") for r in (a, b, c)]
    base_diff, resume_diff = _max_rel_diff(a, c), _max_rel_diff(b, c)
    matches = _same(b, c) or resume_diff <= base_diff + 1e-7
    print(
        f"{variant:7s} precision {precision} (expected {expected} on {arch}); "
        f"{_rate(a):6.1f} steps/s alone; peak {_peak_gib(a):.2f} GiB alone, "
        f"{_peak_gib(b):.2f} + {_peak_gib(c):.2f} GiB two at once; killed at step {killed_at}; "
        f"resumed streams identical to C: {_same(b, c)}, to A: {_same(b, a)}; "
        f"max rel diff of loss B-C {resume_diff:.1e} (A-C baseline {base_diff:.1e}); "
        f"states {states}; {time.time() - t0:.0f} s; {_metrics_cost(a)}",
        flush=True,
    )
    return ok and precision == expected and states == ["completed"] * 3 and matches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["base", "bn_off", "narrow", "adamw"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], help="extra config override")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    EXTRA.extend(a.set)
    if a.worker:
        worker(a.worker, a.steps, a.run_dir)
        return
    import torch

    if not torch.cuda.is_available() and not any(e.startswith("device=") for e in EXTRA):
        raise SystemExit("gpu_check: no CUDA device visible")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
    print(f"{name}, torch {torch.__version__}", flush=True)
    os.environ.setdefault("DECON_CONCURRENT_RUNS", "2")
    with tempfile.TemporaryDirectory() as tmp:
        results = [check_variant(v, a.steps, Path(tmp)) for v in a.variants]
    print("gpu_check:", "PASS" if all(results) else "FAIL")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
