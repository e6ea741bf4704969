"""The GPU figures ``decon validate`` and ``bench/gpu_check.py`` report, and one rule to judge
them: measured on the job's card, after warm-up. No torch here.

- **The job's card.** NVML numbers every card of the node and ignores
  ``CUDA_VISIBLE_DEVICES``; torch's ``cuda:0`` is the first card that variable names (an
  index or a UUID). :func:`nvml_handle` looks that card up, so on a shared node the
  utilization is the job's card's, not card 0's.
- **After warm-up.** The first steps pay for cuDNN's algorithm choice and lazy kernel
  loading, the first curvature evaluation is a cold Lanczos run. :class:`WarmupWatch` keeps
  each run's first status.json at or past ``warmup_steps``; :func:`project_protocol_run` then
  uses only what the run did after it, and :class:`UtilizationSampler` samples only while
  every run is past it and still running.
- **One rule.** :func:`judge` gives each protocol criterion its verdict; both tools call it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from deconcnn_cli import contract, fileio

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"

# The protocol's criteria on a GPU (METRICS.md): 2 runs per card, no OOM, utilization > 80%,
# a 50-epoch run < 30 min, memory within the card; the metrics <= 10% of a run (5% the goal)
LIMIT_WALL_MIN, LIMIT_UTIL, LIMIT_METRICS, GOAL_METRICS = 30.0, 0.80, 0.10, 0.05
GPU_CRITERIA = (
    "steps/s per run",
    "GPU utilization",
    "peak memory per run and card",
    "projected 50-epoch run",
    "metrics' share of the run",
)
# one 50-epoch CIFAR-10 run at batch 128: 352 steps an epoch; curvature at step 0 and every
# 500 steps, noise every 2 epochs, shape every epoch, validation 4 times an epoch over 5,000
# images; about 6 checkpoints (every 10 minutes of a < 30 min run, and at the end)
PROTOCOL_RUN = {
    "steps": 17_600,
    "curvature": 36,
    "noise": 25,
    "shape": 50,
    "validation": 200,
    "val_images": 5_000,
    "checkpoints": 6,
}
POLL_S = 0.1  # how often the watch reads status.json and the sampler asks NVML


def judge(
    *,
    steps_per_s: Sequence[float],
    utilization: float | None,
    memory_gb: Sequence[float],
    card_gb: float | None,
    projected_min: float,
    metrics_share: float,
    why_no_utilization: str = "not measured (no NVML)",
) -> list[tuple[str, str, str]]:
    """``(criterion, verdict, detail)`` for each of ``GPU_CRITERIA``, from the figures of the
    runs measured together on one card (``memory_gb``: each run's peak, context included;
    ``projected_min`` and ``metrics_share``: the worst run's). Utilization at or under 80%,
    or not measured, is a warning; the metrics between the 5% goal and the 10% ceiling too."""
    n = len(steps_per_s)
    rates = ", ".join(f"{r:.1f}" for r in steps_per_s)
    out = [(GPU_CRITERIA[0], PASS, f"{rates} steps/s, {n} on one card")]
    if utilization is None:
        out.append((GPU_CRITERIA[1], WARN, why_no_utilization))
    else:
        ok = utilization > LIMIT_UTIL
        sign = ">" if ok else "<="
        detail = f"{utilization:.0%} after warm-up {sign} {LIMIT_UTIL:.0%}"
        out.append((GPU_CRITERIA[1], PASS if ok else WARN, detail))
    total = sum(memory_gb)
    fits = card_gb is None or total <= card_gb
    detail = " + ".join(f"{x:.2f}" for x in memory_gb) + f" = {total:.2f} GB"
    out.append((GPU_CRITERIA[2], PASS if fits else FAIL, detail + _of(card_gb)))
    fast = projected_min < LIMIT_WALL_MIN
    sign = "<" if fast else ">="
    detail = f"{projected_min:.1f} min with {n} per card {sign} {LIMIT_WALL_MIN:.0f} min"
    out.append((GPU_CRITERIA[3], PASS if fast else FAIL, detail))
    share = metrics_share
    verdict = PASS if share <= GOAL_METRICS else WARN if share <= LIMIT_METRICS else FAIL
    detail = f"{share:.1%} (goal {GOAL_METRICS:.0%}, ceiling {LIMIT_METRICS:.0%})"
    out.append((GPU_CRITERIA[4], verdict, detail))
    return out


def _of(card_gb: float | None) -> str:
    return f" of a {card_gb:.1f} GB card" if card_gb else ""


# ---------------------------------------------------------------------------------------------
# The projection of a protocol run from a short run's own costs


def _number(value: object) -> float:
    """``value`` as a finite, non-negative float; 0.0 for anything else (bool included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    v = float(value)
    return v if math.isfinite(v) and v > 0 else 0.0


def _timing(status: object) -> tuple[int, dict[str, float]] | None:
    raw = status.get("timing") if isinstance(status, dict) else None
    if not isinstance(raw, dict):
        return None
    # a number or 0.0: a damaged status.json never crashes the projection
    return int(_number(status.get("step"))), {k: _number(v) for k, v in raw.items()}


def project_protocol_run(
    run_dir: Path, val_images: int, since: dict[str, Any] | None = None
) -> dict[str, float] | None:
    """One 50-epoch protocol run's wall time, from a short run's own measured costs.

    Each action's cost per call comes from the run's ``timing`` (status.json; the last
    attempt) divided by the rows its stream holds: the training step (wall time less every
    timed action, per step), one curvature, noise and shape evaluation, one validation pass
    (scaled from the short run's ``val_images`` to CIFAR-10's 5,000) and one checkpoint;
    then multiplied by the counts of ``PROTOCOL_RUN``.

    ``since``: an earlier status.json of the same attempt (:class:`WarmupWatch`'s): only what
    came after it counts (its timing subtracted, the rows of its steps and before left out),
    so the warm-up's steps and the cold step-0 curvature are not in the figures. An action
    with no call after it keeps the whole attempt's cost. None before a timing.
    """
    now = _timing(fileio.read_json(run_dir / contract.STATUS_FILE))
    if now is None:
        return None
    steps, timing = now
    if steps < 1 or timing.get("wall_s", 0.0) <= 0:
        return None
    rows = {
        k: [r.get("step") for r in contract.read_stream(contract.stream_path(run_dir, k))]
        for k in ("curvature", "noise", "shape", "val")
    }
    base = _timing(since) if since is not None else None
    if base is not None and not (0 < base[0] < steps and base[1].get("wall_s", 0) > 0):
        base = None  # not an earlier point of this attempt
    if base is not None and base[1]["wall_s"] >= timing["wall_s"]:
        base = None
    start = base[0] if base is not None else 0
    earlier = base[1] if base is not None else {}

    def after(key: str, stream: str, first_step: int) -> tuple[float, int]:
        """Seconds and calls of an action after the snapshot (the whole attempt if none)."""
        later = [s for s in rows[stream] if _int(s) >= first_step]
        if base is not None and later:
            return timing.get(f"{key}_s", 0.0) - earlier.get(f"{key}_s", 0.0), len(later)
        return timing.get(f"{key}_s", 0.0), len(rows[stream])

    timed = contract.TIMED_ACTIONS
    span = {k: timing.get(k, 0.0) - earlier.get(k, 0.0) for k in ("wall_s", "checkpoints")}
    spent = {f"{k}_s": timing.get(f"{k}_s", 0.0) - earlier.get(f"{k}_s", 0.0) for k in timed}
    train_s = span["wall_s"] - sum(spent.values())
    # curvature at step s runs before step s; validation, noise and shape after it: the
    # snapshot, written at the flush after step start - 1, precedes both
    per = {
        "curvature": after("curvature", "curvature", start),
        "noise": after("noise", "noise", start - 1),
        "shape": after("shape", "shape", start - 1),
        "validation": after("validation", "val", start - 1),
    }
    n_ckpt = int(span["checkpoints"]) if base is not None else int(timing.get("checkpoints", 0))
    ckpt_s = spent["checkpoint_s"] if base is not None else timing.get("checkpoint_s", 0.0)
    if base is not None and n_ckpt < 1:
        n_ckpt, ckpt_s = int(timing.get("checkpoints", 0)), timing.get("checkpoint_s", 0.0)

    def each(seconds_calls: tuple[float, int]) -> float:
        seconds, calls = seconds_calls
        return max(seconds, 0.0) / calls if calls else 0.0

    p = PROTOCOL_RUN
    cost = {
        "step_s": max(train_s, 0.0) / (steps - start),
        "curvature_s": each(per["curvature"]),
        "noise_s": each(per["noise"]),
        "shape_s": each(per["shape"]),
        "validation_s": each(per["validation"]) * p["val_images"] / max(1, val_images),
        "checkpoint_s": each((ckpt_s, n_ckpt)),
    }
    metrics = sum(p[k] * cost[f"{k}_s"] for k in contract.ANALYSIS_ACTIONS)
    rest = (
        p["steps"] * cost["step_s"]
        + p["validation"] * cost["validation_s"]
        + p["checkpoints"] * cost["checkpoint_s"]
    )
    return {
        **cost,
        "steps_per_s": 1 / cost["step_s"] if cost["step_s"] > 0 else math.inf,
        "projected_min": (rest + metrics) / 60,
        "metrics_share": metrics / rest if rest > 0 else math.inf,
        "from_step": float(start),
    }


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return -1


# ---------------------------------------------------------------------------------------------
# Warm-up and the card's utilization


class WarmupWatch:
    """Inside the block, reads the runs' status.json every ``POLL_S``: ``snapshots[i]`` is the
    first one of run ``i`` at or past ``warmup_steps`` (its steps and timing so far);
    :meth:`all_warm` says whether every run is past warm-up and still running."""

    def __init__(self, run_dirs: Sequence[Path], warmup_steps: int) -> None:
        self.run_dirs, self.warmup_steps = list(run_dirs), warmup_steps
        self.snapshots: list[dict[str, Any] | None] = [None] * len(self.run_dirs)
        self._latest: list[dict[str, Any]] = [{} for _ in self.run_dirs]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        for i, d in enumerate(self.run_dirs):
            status = fileio.read_json(d / contract.STATUS_FILE)
            if not isinstance(status, dict):
                continue
            self._latest[i] = status
            if self.snapshots[i] is None and self._warm(status):
                self.snapshots[i] = status

    def _warm(self, status: dict[str, Any]) -> bool:
        return _int(status.get("step")) >= self.warmup_steps and isinstance(
            status.get("timing"), dict
        )

    def all_warm(self) -> bool:
        """Every run past warm-up and still running (the card holds all of them, warm)."""
        return all(
            s.get("state") == contract.RUNNING and self._warm(s) for s in self._latest
        ) and bool(self._latest)

    def __enter__(self) -> WarmupWatch:
        def loop() -> None:
            while not self._stop.wait(POLL_S):
                self.poll()

        self._thread = threading.Thread(target=loop, name="warmup-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()  # a run too short to be seen warm while it ran


def nvml_handle(nvml: Any, visible: str | None = None) -> Any:
    """The NVML handle of the card torch calls ``cuda:0`` in this environment: the first entry
    of ``CUDA_VISIBLE_DEVICES`` (``visible``, default the environment's), an index or a
    (prefix of a) ``GPU-``/``MIG-`` UUID as torch accepts it; card 0 where it is unset.
    ``nvml``: the ``pynvml`` module, initialised. Raises ``ValueError`` for a value that
    names no card."""
    visible = os.environ.get(VISIBLE_ENV) if visible is None else visible
    if visible is None:
        return nvml.nvmlDeviceGetHandleByIndex(0)
    first = visible.split(",")[0].strip()
    if not first:
        raise ValueError(f"{VISIBLE_ENV}={visible!r} names no card")
    if first.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(first))
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        if uuid.startswith(first):
            return handle
    raise ValueError(f"{VISIBLE_ENV}={visible!r}: no card has the UUID {first!r}")


class UtilizationSampler:
    """The job's card's utilization (NVML, ``nvidia-ml-py``: the GPU path's own dependency)
    sampled every ``POLL_S`` inside the block while ``gate()`` is true (every run past
    warm-up); ``mean`` over those samples, None where NVML is missing or none was taken."""

    def __init__(self, enabled: bool = True, gate: Callable[[], bool] | None = None) -> None:
        self.enabled, self.gate = enabled, gate
        self.samples: list[float] = []
        self.error = ""
        self._stop = threading.Event()

    def __enter__(self) -> UtilizationSampler:
        if not self.enabled:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = nvml_handle(pynvml)
        except Exception as exc:  # ImportError, NVML's own errors, a card not found
            self.error = f"NVML unavailable: {exc}"
            return self

        def sample() -> None:
            while not self._stop.wait(POLL_S):
                if self.gate is None or self.gate():
                    self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)

        threading.Thread(target=sample, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        """Mean over the samples taken while the gate was open."""
        if not self.samples and self.enabled and not self.error:
            self.error = "no sample after warm-up (the runs were too short)"
        return sum(self.samples) / len(self.samples) if self.samples else None
