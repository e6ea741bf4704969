"""``decon validate``: the pre-flight check before cluster hours are spent. Torch-free here;
each short training run is a subprocess (:mod:`deconcnn_cli.sweep.validate_probe`).

Checks, each a :class:`Check` row of the pass/fail table (docs/validate.md):

1. every variant profile, grid and resource profile under ``profiles/`` loads; every grid
   expands to the product of its axes per variant (no duplicates, no dropped points);
2. every variant of the chosen grid trains a few steps on this machine, at its largest
   learning rate (the likeliest to diverge), on the offline digits data: at reduced size on a
   CPU, at full size on a GPU. Its streams must exist with the documented header and cells;
   a run that diverges or whose loss does not fall is flagged (``warn``);
3. its peak memory (process peak RSS on a CPU; ``torch.cuda.max_memory_allocated``, one
   curvature evaluation included, on a GPU) against the resource profile's figure, and on a
   GPU whether ``runs_per_gpu`` such runs fit on the card;
4. with a ``[container]`` section: the runtime on PATH, the image and overlays present, and
   the image's python importing decon, submitit and torch (:mod:`deconcnn_cli.sweep.container`);
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deconcnn_cli import contract, fileio
from deconcnn_cli.config import load_run_config, variant_names
from deconcnn_cli.errors import DeconError
from deconcnn_cli.sweep.gpu_figures import (
    FAIL,
    GPU_CRITERIA,
    PASS,
    SKIP,
    WARN,
    UtilizationSampler,
    WarmupWatch,
    judge,
    project_protocol_run,
)
from deconcnn_cli.sweep.grid import expand_grid_runs, grid_run_count
from deconcnn_cli.sweep.profiles import (
    GridSpec,
    ResourceProfile,
    grid_names,
    load_grid,
    load_resources,
    resource_names,
)
from deconcnn_cli.sweep.validate_probe import GB

STALL_RATIO = 0.98  # "stalls": mean loss of the last quarter of steps >= 98% of the first's
PROBE_TIMEOUT_S = 900.0  # one short run; longer is a hang


@dataclass(frozen=True)
class Check:
    name: str  # what was checked: "grid loss_lin_slope", "base: memory", ...
    status: str  # pass | warn | fail | skip
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# 1. profiles and grids


def check_profiles() -> list[Check]:
    """Every variant, grid and resource profile on disk loads; every grid expands in full."""
    checks: list[Check] = []
    for variant in variant_names():
        checks.append(_try(f"variant {variant}", lambda v=variant: _load_variant(v)))
    for name in grid_names():
        checks.append(_try(f"grid {name}", lambda n=name: _expand(n)))
    for name in resource_names():
        checks.append(_try(f"resources {name}", lambda n=name: _describe_resources(n)))
    return checks


def _try(name: str, fn: Any) -> Check:
    try:
        return Check(name, PASS, fn())
    except DeconError as exc:
        return Check(name, FAIL, exc.message + (f" ({exc.hint})" if exc.hint else ""))


def _load_variant(variant: str) -> str:
    cfg = load_run_config(variant=variant, profiles=None, overrides=None, flags={})
    return f"{cfg.optim.name}, {cfg.model.norm}, width {cfg.model.width_mult:g}"


def _expand(name: str) -> str:
    spec = load_grid(name)
    runs = expand_grid_runs(spec)
    want = grid_run_count(spec)
    if len(runs) != want:
        raise DeconError(f"expands to {len(runs)} runs, its axes give {want}")
    per = ", ".join(f"{v} {sum(r.variant == v for r in runs)}" for v in spec.variants)
    return f"{len(runs)} runs ({per})"


def _describe_resources(name: str) -> str:
    prof = load_resources(name)
    return f"{prof.executor}" + (f", {prof.gpu_memory_gb:g} GB cards" if prof.gpu_memory_gb else "")


# ---------------------------------------------------------------------------------------------
# 2-3. short runs


# ---------------------------------------------------------------------------------------------
# The protocol's criteria on a GPU: measured and judged as bench/gpu_check.py does
# (sweep.gpu_figures)


def gpu_criteria(
    variant: str,
    results: list[ProbeResult],
    card_gb: float | None,
    util: float | None,
    since: list[dict[str, Any] | None] | None = None,
    why_no_util: str = "not measured (no NVML)",
) -> list[Check]:
    """The protocol's GPU criteria for ``variant``'s runs measured together on one card;
    ``since``: each run's status.json after warm-up (its figures then count from there)."""
    since = since or [None] * len(results)
    pairs = zip(results, since, strict=True)
    proj = [project_protocol_run(r.run_dir, r.n_val or 1, s) for r, s in pairs]
    if not all(proj):
        return [Check(f"{variant}: {c}", FAIL, "no timing recorded") for c in GPU_CRITERIA]
    verdicts = judge(
        steps_per_s=[q["steps_per_s"] for q in proj],
        utilization=util,
        memory_gb=[(r.cuda_peak_reserved_gb or 0.0) + (r.cuda_context_gb or 0.0) for r in results],
        card_gb=card_gb,
        projected_min=max(q["projected_min"] for q in proj),
        metrics_share=max(q["metrics_share"] for q in proj),
        why_no_utilization=why_no_util,
    )
    return [Check(f"{variant}: {name}", verdict, detail) for name, verdict, detail in verdicts]


@dataclass(frozen=True)
class ProbeResult:
    variant: str
    lr: float
    state: str | None  # the run's state after the short run; None when it crashed
    returncode: int
    steps_done: int
    peak_rss_gb: float
    cuda_peak_allocated_gb: float | None
    cuda_peak_reserved_gb: float | None
    cuda_context_gb: float | None
    cuda_total_gb: float | None
    run_dir: Path
    stderr_tail: str
    n_val: int | None = None  # images in the short run's validation split


def warmup_steps(steps: int) -> int:
    """A short run's warm-up: its first half (the step-0 curvature, cuDNN's choices, lazy
    kernel loading); the second curvature evaluation, at ``steps // 2``, falls after it."""
    return max(1, steps // 2)


def probe_config(spec: GridSpec, variant: str, steps: int, gpu: bool) -> dict[str, Any]:
    """The short run of ``variant``: the grid's run at its largest lr (seed of the first
    point), on the digits data, long enough for every stream's cadence to come due."""
    runs = [r for r in expand_grid_runs(spec) if r.variant == variant]
    run = max(runs, key=lambda r: (r.lr, -r.seed))
    cfg = run.config.model_dump(mode="json")
    # as many epochs as steps: the probe stops after `steps` steps, whatever an epoch's length
    cfg["schedule"].update(
        epochs=max(2, steps), warmup_epochs=min(cfg["schedule"]["warmup_epochs"], 0.5)
    )
    cfg["data"].update(dataset="digits", download=False, data_dir=None)
    cfg["cadence"].update(
        val_per_epoch=4,
        curvature_every_steps=warmup_steps(steps),
        noise_every_epochs=1,
        shape_every_epochs=1,
        flush_every_steps=8,
    )
    cfg["analysis"].update(alpha_early_epochs=[0.25, 1.0], burn_in_ce_nats=2.0)
    if not gpu:  # reduced size on a CPU: width x1/8 (variants keep their ratio), 16 px
        cfg["model"]["width_mult"] = cfg["model"]["width_mult"] / 8
        cfg["data"]["image_size"] = min(cfg["data"]["image_size"], 16)
        cfg["analysis"].update(n_probe=64, hutchinson_probes=3, noise_k=4)
        cfg["device"] = "cpu"
    return cfg


def run_probe(cfg: dict[str, Any], run_dir: Path, steps: int, timeout_s: float) -> ProbeResult:
    """Train ``cfg`` for ``steps`` steps in a child process; measure that child's peak RSS
    (``wait4``'s rusage, this child only) and, on a GPU, what the probe reports."""
    return run_probes(cfg, [run_dir], steps, timeout_s)[0]


def run_probes(
    cfg: dict[str, Any],
    run_dirs: list[Path],
    steps: int,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> list[ProbeResult]:
    """The short run of ``cfg`` in one child process per directory, all at once (as a job
    runs ``runs_per_gpu`` runs on one card), with ``env`` on top of this environment."""
    started = [_start_probe(cfg, d, steps, env) for d in run_dirs]
    return [_finish_probe(cfg, proc, d, timeout_s) for proc, d in started]


def _start_probe(
    cfg: dict[str, Any], run_dir: Path, steps: int, env: dict[str, str] | None
) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.config.json").write_text(json.dumps(cfg))
    report = run_dir.parent / f"{run_dir.name}.probe.json"
    err = run_dir.parent / f"{run_dir.name}.stderr"
    cmd = [sys.executable, "-m", "deconcnn_cli.sweep.validate_probe",
           str(run_dir.parent / f"{run_dir.name}.config.json"), str(run_dir), str(steps),
           str(report)]  # fmt: skip
    with open(err, "wb") as err_f:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err_f, env={**os.environ, **(env or {})}
        )
    return proc, run_dir


def _finish_probe(
    cfg: dict[str, Any], proc: subprocess.Popen, run_dir: Path, timeout_s: float
) -> ProbeResult:
    report = run_dir.parent / f"{run_dir.name}.probe.json"
    err = run_dir.parent / f"{run_dir.name}.stderr"
    try:
        _, status, usage = _wait4(proc, timeout_s)
        code = os.waitstatus_to_exitcode(status)
    except TimeoutError:
        proc.kill()
        _, status, usage = os.wait4(proc.pid, 0)
        code = -9
    probe = fileio.read_json(report) or {}
    view = contract.view_run(run_dir)
    tail = err.read_text(errors="replace")[-600:] if err.exists() else ""
    if code == -9:
        tail = f"no result after {timeout_s:.0f}s (killed)\n" + tail
    return ProbeResult(
        variant=cfg["variant"],
        lr=float(cfg["optim"]["lr"]),
        state=view.written_state,
        returncode=code,
        steps_done=view.steps_done,
        peak_rss_gb=usage.ru_maxrss * 1024 / GB,  # Linux: kilobytes
        cuda_peak_allocated_gb=probe.get("cuda_peak_allocated_gb"),
        cuda_peak_reserved_gb=probe.get("cuda_peak_reserved_gb"),
        cuda_context_gb=probe.get("cuda_context_gb"),
        cuda_total_gb=probe.get("cuda_total_gb"),
        run_dir=run_dir,
        stderr_tail=tail,
        n_val=probe.get("n_val"),
    )


def _wait4(proc: subprocess.Popen, timeout_s: float) -> tuple[int, int, Any]:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.1)


def check_streams(run_dir: Path) -> tuple[str, str]:
    """Every stream due by the run's last step exists, has the documented header, and every
    cell is empty, ``nan`` or a number."""
    status = fileio.read_json(run_dir / contract.STATUS_FILE) or {}
    spe = int(status.get("steps_per_epoch") or 0)
    steps = int(status.get("step") or 0)
    due = ["step", "val", "curvature"] + (["noise", "shape"] if spe and steps >= spe else [])
    problems = []
    for name in due:
        path = contract.stream_path(run_dir, name)
        lines = fileio.complete_lines(path)
        if not lines:
            problems.append(f"{name}.csv missing or empty")
            continue
        if tuple(lines[0].split(",")) != contract.STREAMS[name]:
            problems.append(f"{name}.csv header {lines[0]!r} is not the documented one")
            continue
        for row in contract.read_stream(path):
            try:
                [contract.parse_cell(v) for v in row.values()]
            except (TypeError, ValueError):
                problems.append(f"{name}.csv has a cell that is not a number: {row}")
                break
    if problems:
        return FAIL, "; ".join(problems)
    return PASS, f"{', '.join(due)} in the documented format ({steps} steps)"


def check_dynamics(run_dir: Path, state: str | None) -> tuple[str, str]:
    """``warn`` when the short run diverged or its training loss did not fall."""
    if state == contract.DIVERGED:
        return WARN, "diverged in the short run (non-finite loss): expect it on the cluster"
    rows = contract.read_stream(contract.stream_path(run_dir, "step"))
    loss = [float(r["loss_train_nats"]) for r in rows]
    if len(loss) < 8:
        return SKIP, f"only {len(loss)} steps logged: too few to judge"
    q = max(2, len(loss) // 4)
    first, last = sum(loss[:q]) / q, sum(loss[-q:]) / q
    if not math.isfinite(last) or last >= STALL_RATIO * first:
        return (
            WARN,
            f"stalls: mean train loss {first:.3f} -> {last:.3f} nats over {len(loss)} steps",
        )
    return PASS, f"train loss falls {first:.3f} -> {last:.3f} nats over {len(loss)} steps"


def check_memory(result: ProbeResult, prof: ResourceProfile, gpu: bool) -> list[Check]:
    v = result.variant
    if gpu:
        peak = result.cuda_peak_allocated_gb
        figure = prof.gpu_memory_gb_per_run.get(v)
        if peak is None:
            return [Check(f"{v}: GPU memory", FAIL, "the probe reported no CUDA peak")]
        out = [_against(f"{v}: GPU memory", peak, figure, "max_memory_allocated", prof.name)]
        per_run = (result.cuda_peak_reserved_gb or peak) + (result.cuda_context_gb or 0.0)
        card = result.cuda_total_gb
        if card:
            n = prof.runs_per_gpu
            fits = n * per_run <= card
            out.append(
                Check(
                    f"{v}: {n} runs per card",
                    PASS if fits else FAIL,
                    f"{n} x {per_run:.2f} GB (reserved + CUDA context) "
                    f"{'<=' if fits else '>'} {card:.1f} GB card",
                )
            )
        return out
    figure = prof.host_memory_gb_per_run.get(v)
    return [_against(f"{v}: host memory", result.peak_rss_gb, figure, "peak RSS", prof.name)]


def _against(name: str, measured: float, figure: float | None, what: str, prof: str) -> Check:
    if figure is None:
        return Check(name, WARN, f"{what} {measured:.2f} GB; {prof} gives no figure to check")
    ok = measured <= figure
    sign = "<=" if ok else ">"
    return Check(
        name, PASS if ok else FAIL, f"{what} {measured:.2f} GB {sign} {figure:g} GB ({prof})"
    )


def validate(
    grid: str,
    resources: str,
    steps: int = 26,
    gpu: bool = False,
    work_dir: Path | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    on_check: Callable[[Check], None] | None = None,
) -> list[Check]:
    """Run every check; the caller renders the table and exits non-zero on any ``fail``.
    ``on_check`` is called with each check as soon as it is decided (a short run takes
    tens of seconds: the caller shows the checks as they come)."""
    if steps < 1:
        raise DeconError(f"--steps must be at least 1, got {steps}", "e.g. --steps 26")
    checks: list[Check] = []

    def add(new: list[Check]) -> None:
        checks.extend(new)
        for check in new:
            if on_check is not None:
                on_check(check)

    add(check_profiles())
    try:
        spec = load_grid(grid)
        prof = load_resources(resources)
    except DeconError as exc:
        add([Check("short runs", FAIL, f"not run: {exc.message}")])
        return checks
    if prof.executor == "slurm":  # the image the jobs run in (sweep.container)
        from deconcnn_cli.sweep.container import check_container

        add([Check(*row) for row in check_container(prof)])
    with tempfile.TemporaryDirectory(prefix="decon-validate-", dir=work_dir) as tmp:
        daemon = _start_mps(prof) if gpu else None
        try:
            _short_runs(spec, prof, steps, gpu, Path(tmp), timeout_s, daemon, add)
        finally:
            if daemon is not None:
                daemon.stop()
    if not gpu:
        add([Check(name, SKIP, "skipped: no GPU") for name in GPU_CRITERIA])
    elif daemon is not None and prof.mps:
        state = "on" if daemon.active else f"not started: {daemon.reason}"
        add([Check("CUDA MPS", PASS if daemon.active else WARN, state)])
    return checks


def _start_mps(prof: ResourceProfile) -> Any:
    """The profile's MPS daemon for the probes, as a job starts it (None: not asked for)."""
    if not prof.mps:
        return None
    from deconcnn_cli.sweep.mps import start_mps

    return start_mps(f"validate-{os.getpid()}", thread_percentage=prof.mps_active_thread_percentage)


def _short_runs(
    spec: GridSpec,
    prof: ResourceProfile,
    steps: int,
    gpu: bool,
    tmp: Path,
    timeout_s: float,
    daemon: Any,
    add: Callable[[list[Check]], None],
) -> None:
    """Each variant's short run: alone on a CPU; on a GPU ``runs_per_gpu`` at once on the
    card, in the job's environment (its share of the card, MPS when the profile says so),
    with the card's utilization sampled while they run. Each variant's checks go to ``add``
    as its run ends."""
    from deconcnn_cli.runenv import child_env

    for variant in spec.variants:
        checks: list[Check] = []
        cfg = probe_config(spec, variant, steps, gpu)
        n = prof.runs_per_gpu if gpu else 1
        dirs = [tmp / (variant if i == 0 else f"{variant}_{i}") for i in range(n)]
        env = None
        if gpu:
            mps_env = daemon.env() if daemon is not None else {}
            env = child_env(prof.cpus_per_run, n, require_gpu=True, mps=mps_env)
        with (
            WarmupWatch(dirs, warmup_steps(steps)) as warm,
            UtilizationSampler(enabled=gpu, gate=warm.all_warm) as util,
        ):
            results = run_probes(cfg, dirs, steps, timeout_s, env)
        result = results[0]
        label = f"{variant} (lr {result.lr:g}, {result.steps_done} steps)"
        if result.state is None or result.state == contract.FAILED or result.returncode < 0:
            add([Check(f"{label}: trains", FAIL, result.stderr_tail.strip()[-300:])])
            continue
        how = "stopped as asked, resumable" if result.state == contract.INTERRUPTED else ""
        checks.append(Check(f"{label}: trains", PASS, f"state {result.state} {how}".strip()))
        checks.append(Check(f"{variant}: streams", *check_streams(result.run_dir)))
        checks.append(Check(f"{variant}: dynamics", *check_dynamics(result.run_dir, result.state)))
        checks.extend(check_memory(result, prof, gpu))
        if gpu:
            mean = util.mean
            checks.extend(
                gpu_criteria(
                    variant, results, result.cuda_total_gb, mean, warm.snapshots, util.error
                )
            )
        add(checks)


def failed(checks: list[Check]) -> bool:
    return any(c.status == FAIL for c in checks)
