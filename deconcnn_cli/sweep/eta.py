"""When a sweep will end, from what has been measured: a pure estimate, no I/O.

Every unfinished run is work: the steps it has left, at its own measured rate while it runs,
else at the sweep's typical seconds per step (the completed runs' wall time per step, else the
running runs' rates). Work is done in *pools* of slots: a local runner runs ``parallel_runs``
runs at once; a SLURM array runs ``%N`` jobs at once, each job's runs together on one GPU (a
job is one *unit*: it holds its slot until its slowest run ends). Running units hold their
slots first; waiting units take the next free slot in order (list scheduling). The ETA is the
time the last pool ends. ``None`` (unknown) only while nothing has been measured.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    """One unfinished run's remaining work."""

    run_id: str
    pool: str  # whose slots run it: a local runner's job id, a SLURM array, ...
    unit: str  # what starts and ends together: a SLURM job; a local run itself
    steps_left: int
    steps_per_s: float | None  # measured on this run now (a running run's rate), else None
    running: bool  # it holds a slot now


@dataclass(frozen=True)
class EtaEstimate:
    eta_s: float | None
    s_per_step: float | None  # the typical seconds per step used for runs without a rate
    n_completed_measured: int  # completed runs whose wall time gave s_per_step
    n_running_measured: int  # running runs timed by their own rate
    slots: int  # slots of the pools that still have work (runs or jobs at once)
    busy: int  # of which held now


def typical_s_per_step(
    completed: list[tuple[float, int]], running_rates: list[float]
) -> tuple[float | None, int]:
    """(median seconds per step, how many completed runs it came from).

    ``completed``: ``(wall seconds, steps)`` of each completed run; without one that has both,
    the median of the running runs' ``1 / steps_per_s``; None when neither was measured.
    """
    per_step = [s / n for s, n in completed if s > 0 and n > 0]
    if per_step:
        return statistics.median(per_step), len(per_step)
    rates = [r for r in running_rates if r > 0]
    if rates:
        return statistics.median(1.0 / r for r in rates), 0
    return None, 0


def estimate_eta(
    work: list[Work], slots: dict[str, int], s_per_step: float | None, n_completed: int = 0
) -> EtaEstimate:
    """Seconds until every unit of ``work`` has ended, given each pool's ``slots``
    (a pool not in ``slots`` has 1). ``s_per_step`` times the runs that have no rate."""
    n_rated = sum(1 for w in work if w.running and w.steps_per_s)
    if not work:
        return EtaEstimate(0.0, s_per_step, n_completed, 0, 0, 0)
    units: dict[tuple[str, str], list[float]] = {}  # (pool, unit) -> [seconds, running]
    for w in work:
        if w.steps_per_s and w.steps_per_s > 0:
            secs = w.steps_left / w.steps_per_s
        elif s_per_step is not None:
            secs = w.steps_left * s_per_step
        else:
            return EtaEstimate(None, None, n_completed, n_rated, 0, 0)
        entry = units.setdefault((w.pool, w.unit), [0.0, 0.0])
        entry[0] = max(entry[0], secs)
        entry[1] = max(entry[1], 1.0 if w.running else 0.0)
    by_pool: dict[str, tuple[list[float], list[float]]] = {}
    for (pool, _), (secs, running) in units.items():
        busy, waiting = by_pool.setdefault(pool, ([], []))
        (busy if running else waiting).append(secs)
    end = 0.0
    total_slots = total_busy = 0
    for pool, (busy, waiting) in by_pool.items():
        n = max(slots.get(pool, 1), len(busy), 1)
        total_slots += n
        total_busy += len(busy)
        free = busy + [0.0] * (n - len(busy))
        heapq.heapify(free)
        for secs in waiting:
            heapq.heappush(free, heapq.heappop(free) + secs)
        end = max(end, max(free))
    return EtaEstimate(end, s_per_step, n_completed, n_rated, total_slots, total_busy)
