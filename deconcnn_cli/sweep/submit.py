"""``decon submit`` as a library: plan what to run, then submit it once. No torch.

``submit`` is idempotent: the runs of the grid minus the completed, diverged, live and queued
ones (and the failed ones unless asked) are submitted; everything happens under the sweep
lock, so concurrent calls never submit a run twice. ``recover`` reuses :func:`submit_runs`.
Planning and submitting stay in one file of over 500 lines on purpose: the plan is what the
submission records under the same lock, and a split would put the lock's scope in two places.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deconcnn_cli import contract
from deconcnn_cli.config import RunConfig
from deconcnn_cli.errors import DeconError, SweepError
from deconcnn_cli.sweep import executors
from deconcnn_cli.sweep.grid import GridRun, check_grid_size, expand_grid_runs, grid_hash
from deconcnn_cli.sweep.manifest import MANIFEST_FILE, job_run_ids, submissions
from deconcnn_cli.sweep.profiles import GridSpec, ResourceProfile, load_grid, load_resources
from deconcnn_cli.sweep.store import LOCK_FILE, SweepLockError, SweepStore
from deconcnn_cli.training.rundir import dict_changes

FORCE_GRID = "grid"  # `--force grid`: adopt a changed grid for an existing sweep root
DEFAULT_RESOURCES = {"slurm": "rtx8000", "local": "local"}


class GridChangedError(SweepError):
    """The grid differs from the one the sweep root was made with."""


@dataclass(frozen=True)
class RunDecision:
    run_id: str
    variant: str
    submit: bool
    reason: str  # why it is submitted or skipped


def decide(
    view: contract.RunView,
    *,
    queued_in: str | None = None,
    retry_failed: bool = False,
    forced: bool = False,
) -> tuple[bool, str]:
    """Submit this run? Terminal, live and queued runs never; failed ones only when asked."""
    if view.state == contract.COMPLETED:
        return False, "completed"
    if view.state == contract.DIVERGED:
        return False, "diverged (a result, never retried)"
    if view.state == contract.UNREADABLE:
        return False, f"unreadable ({view.reason}): a person must look"
    if view.state == contract.RUNNING:
        return False, f"live (heartbeat {view.heartbeat_age_s or 0:.0f} s ago)"
    if queued_in is not None:
        return False, f"queued in job {queued_in}"
    if view.state == contract.FAILED:
        if forced:
            return True, f"failed ({view.reason}), forced"
        if retry_failed:
            return True, f"failed ({view.reason}), retried"
        return False, f"failed ({view.reason}): --retry-failed or --force {view.run_id}"
    if view.state == contract.INTERRUPTED:
        return True, f"interrupted at step {view.steps_done}: resumes"
    if view.state == contract.STALLED:
        return True, f"stalled at step {view.steps_done} (no live job): resumes"
    return True, "new"


def _absent(run_dir: Path) -> contract.RunView:
    """The view of a run that has no directory (what view_run would say, without asking)."""
    return contract.RunView(run_dir, run_dir.name, contract.MISSING, None, 0, None, 0.0,
                            None, 0, None, {})  # fmt: skip


@dataclass(frozen=True)
class GridChange:
    added: list[str]
    removed: list[str]
    spec_changes: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.spec_changes)

    def render(self, limit: int = 12) -> str:
        lines = [f"  {c}" for c in self.spec_changes]
        for sign, ids in (("+", self.added), ("-", self.removed)):
            lines += [f"  {sign} {rid}" for rid in ids[:limit]]
            if len(ids) > limit:
                lines.append(f"  {sign} ... {len(ids) - limit} more")
        lines.append(f"  ({len(self.added)} runs added, {len(self.removed)} removed)")
        return "\n".join(lines)


@dataclass
class SubmitPlan:
    root: Path
    grid: str
    grid_hash: str
    executor: str
    resources: ResourceProfile
    new_sweep: bool
    change: GridChange | None
    decisions: list[RunDecision]
    groups: list[list[str]]
    chunks: list[tuple[int, int]] = field(default_factory=list)
    max_array_size: tuple[int, str] | None = None
    warnings: list[str] = field(default_factory=list)
    runs: dict[str, GridRun] = field(default_factory=dict, repr=False)

    @property
    def to_submit(self) -> list[str]:
        return [d.run_id for d in self.decisions if d.submit]

    def per_variant(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        job_of = {rid: i for i, g in enumerate(self.groups) for rid in g}
        for d in self.decisions:
            row = table.setdefault(d.variant, {"runs": 0, "submit": 0, "skip": 0, "jobs": 0})
            row["runs"] += 1
            row["submit" if d.submit else "skip"] += 1
        for variant in table:
            jobs = {job_of[d.run_id] for d in self.decisions if d.variant == variant and d.submit}
            table[variant]["jobs"] = len(jobs)
        return table


@dataclass
class SubmitResult:
    plan: SubmitPlan
    submission: dict[str, Any] | None  # the manifest entry written (None: nothing submitted)
    error: DeconError | None = None  # a scheduler error after part of the jobs went in
    refusal: DeconError | None = None  # a dry run: why the real submit would refuse
    elsewhere: DeconError | None = None  # a dry run: the executor does not run on this machine


def resolve_executor(executor: str | None, resources: str | None) -> tuple[str, ResourceProfile]:
    """Executor and resource profile from the flags: each defaults from the other; without
    either, SLURM when a controller answers, else this machine."""
    if resources is not None:
        profile = load_resources(resources)
        if executor is not None and executor != profile.executor:
            raise SweepError(
                f"--executor {executor} but resource profile {profile.name!r} is for "
                f"{profile.executor}",
                f"use a {executor} profile (e.g. --resources {DEFAULT_RESOURCES[executor]})",
            )
        return profile.executor, profile
    if executor is None:
        executor = "slurm" if executors.slurm_unavailable() is None else "local"
    if executor not in DEFAULT_RESOURCES:
        raise SweepError(f"unknown executor {executor!r}", "use --executor slurm or local")
    return executor, load_resources(DEFAULT_RESOURCES[executor])


def _with_data_dir(run: GridRun, resources: ResourceProfile) -> GridRun:
    if run.config.data.data_dir is not None or resources.data_dir is None:
        return run
    data = run.config.data.model_copy(update={"data_dir": Path(resources.data_dir)})
    cfg = RunConfig.model_validate(
        {**run.config.model_dump(mode="json"), "data": data.model_dump(mode="json")}
    )
    return GridRun(run.run_id, run.variant, run.lr, run.weight_decay, run.seed, cfg, run.identity)


def _data_problems(runs: Iterable[GridRun], resources: ResourceProfile) -> list[str]:
    """What keeps the runs from finding their data, each saying where its data_dir was set."""
    out: set[str] = set()
    for run in runs:
        data = run.config.data
        if data.dataset not in ("cifar10", "cifar100"):
            continue
        if data.data_dir is None:
            out.add(
                f"{data.dataset} needs a data directory: set data_dir in the resource profile "
                "or [overrides.data] data_dir in the grid"
            )
            continue
        folder = "cifar-10-batches-py" if data.dataset == "cifar10" else "cifar-100-python"
        root = Path(data.data_dir).expanduser()
        if not (root / folder).is_dir() and not data.download:
            from_profile = resources.data_dir is not None and data.data_dir == Path(
                resources.data_dir
            )
            where = (
                f"data_dir of resource profile {resources.name!r}"
                if from_profile
                else "[overrides.data] data_dir of the grid"
            )
            out.add(
                f"{data.dataset} not found: no {root / folder} (data_dir {data.data_dir} is the "
                f"{where}: fix it there, or set data.download = true in the grid's "
                "[overrides.data])"
            )
    return sorted(out)


def _spec_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    if old is None:
        return []
    return [f"{path}: {a!r} -> {b!r}" for path, a, b in dict_changes(old, new)]


def _manifest_jobs(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (str(sub.get("executor", "slurm")), {**job, "run_ids": job_run_ids(job)})
        for sub in submissions(manifest)
        for job in sub["jobs"]
        if isinstance(job.get("job_id"), str)
    ]


def queued_runs(manifest: dict[str, Any]) -> dict[str, str]:
    """``{run_id: job_id}`` of runs held by a job the scheduler still has (one query)."""
    jobs = _manifest_jobs(manifest)
    if not jobs:
        return {}
    live = executors.live_jobs(jobs)
    out: dict[str, str] = {}
    for _, job in jobs:
        if job["job_id"] in live:
            for rid in job.get("run_ids", []):
                out[rid] = job["job_id"]
    return out


def plan_submit(
    store: SweepStore,
    spec: GridSpec,
    executor: str,
    resources: ResourceProfile,
    *,
    retry_failed: bool = False,
    force: Iterable[str] = (),
    now: float | None = None,
) -> SubmitPlan:
    """What ``submit`` would do now. Reads only: the manifest, run dirs, one scheduler query."""
    force = set(force)
    runs = [_with_data_dir(r, resources) for r in expand_grid_runs(spec)]
    by_id = {r.run_id: r for r in runs}
    ghash = grid_hash(runs)
    manifest = store.read_manifest() if store.exists() else None
    change = None
    if manifest is not None:
        if manifest.get("grid") != spec.name:
            raise SweepError(
                f"{store.root} is the sweep of grid {manifest.get('grid')!r}, not {spec.name!r}",
                "give another --root for another grid",
            )
        if manifest.get("grid_hash") != ghash:
            added = sorted(set(by_id) - set(manifest["runs"]))
            removed = sorted(set(manifest["runs"]) - set(by_id))
            spec_new = spec.model_dump(mode="json")
            change = GridChange(added, removed, _spec_changes(manifest.get("grid_spec"), spec_new))
    _check_force(spec, sorted(force), set(by_id))
    queued = queued_runs(manifest) if manifest else {}
    decisions = []
    try:  # one listing, so a run without a directory costs no stat calls
        present = set(os.listdir(store.runs_dir))
    except OSError:
        present = set()
    for run in runs:
        run_dir = store.run_dir(run.run_id)
        view = contract.view_run(run_dir, now) if run.run_id in present else _absent(run_dir)
        ok, why = decide(
            view,
            queued_in=queued.get(run.run_id),
            retry_failed=retry_failed,
            forced=run.run_id in force,
        )
        decisions.append(RunDecision(run.run_id, run.variant, ok, why))
    chosen = [(d.run_id, d.variant) for d in decisions if d.submit]
    plan = SubmitPlan(
        root=store.root,
        grid=spec.name,
        grid_hash=ghash,
        executor=executor,
        resources=resources,
        new_sweep=manifest is None,
        change=change,
        decisions=decisions,
        groups=[],
        runs=by_id,
    )
    _layout(plan, chosen, alone=False)
    plan.warnings += _data_problems((by_id[rid] for rid, _ in chosen), resources)
    return plan


def _layout(plan: SubmitPlan, chosen: list[tuple[str, str]], *, alone: bool) -> None:
    res = plan.resources
    if plan.executor == "slurm" and res.container is not None:
        from deconcnn_cli.sweep.container import check_root

        why = check_root(plan.root.absolute())
        if why:
            raise SweepError(why, "give a --root whose path the container can bind")
    if plan.executor == "slurm":
        plan.groups = executors.group_for_gpus(chosen, res.runs_per_gpu, alone=alone)
        if plan.groups:
            plan.max_array_size = executors.max_array_size(res)
            plan.chunks = executors.array_chunks(len(plan.groups), plan.max_array_size[0])
    else:
        plan.groups = [[rid for rid, _ in chosen]] if chosen else []
        per_run = max(res.host_memory_gb_per_run.values(), default=0.0)
        total_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9
        if per_run * res.parallel_runs > total_gb:
            plan.warnings.append(
                f"{res.parallel_runs} parallel runs x {per_run} GB exceed this machine's "
                f"{total_gb:.0f} GB: lower parallel_runs"
            )


def submit_grid(
    store: SweepStore,
    grid: str,
    *,
    executor: str | None = None,
    resources: str | None = None,
    retry_failed: bool = False,
    force: Iterable[str] = (),
    dry_run: bool = False,
) -> SubmitResult:
    """Plan and (unless ``dry_run``) submit the grid into the sweep root, once.

    Bad input (unknown grid or profile, no SLURM, a changed grid without ``--force grid``,
    missing data) raises before anything is written.
    """
    store.check_folder()
    spec = load_grid(grid)
    check_grid_size(spec)  # counted from the axes, before anything is built or asked
    chosen_by = f"--executor {executor}" if executor else None
    executor, profile = resolve_executor(executor, resources)
    chosen_by = chosen_by or f"resource profile {profile.name!r} says executor = {executor!r}"
    force = list(force)
    if dry_run:
        plan = plan_submit(store, spec, executor, profile, retry_failed=retry_failed, force=force)
        try:  # the refusals the real submit decides from the sweep and the grid
            _check_force(spec, force)
            _check_not_foreign(store)
            _check_change(spec, plan, force, warnings=False)
        except DeconError as exc:
            return SubmitResult(plan, None, refusal=exc)
        try:  # a plan is often read on a laptop before it is submitted on the cluster
            executors.check_executor(executor, None, chosen_by=chosen_by)
        except DeconError as exc:
            return SubmitResult(plan, None, elsewhere=exc)
        return SubmitResult(plan, None)
    executors.check_executor(executor, profile, chosen_by=chosen_by)
    _check_force(spec, force)
    _check_not_foreign(store)
    created = not store.root.exists()
    try:
        with store.lock():
            _check_not_foreign(store)
            plan = plan_submit(
                store, spec, executor, profile, retry_failed=retry_failed, force=force
            )
            _check_change(spec, plan, force)
            manifest = _updated_manifest(store, spec, plan)
            store.write_manifest(manifest)
            if not plan.to_submit:
                return SubmitResult(plan, None)
            return _submit_groups(store, manifest, plan, reason="submit")
    except SweepLockError:
        # a root that cannot be locked (read-only) still answers when there is nothing to do
        plan = plan_submit(store, spec, executor, profile, retry_failed=retry_failed, force=force)
        if plan.to_submit or plan.change is not None or not store.exists():
            raise
        return SubmitResult(plan, None)
    except DeconError:
        only_lock = store.root.is_dir() and all(p.name == LOCK_FILE for p in store.root.iterdir())
        if created and only_lock:  # leave no trace of a refused first submit
            shutil.rmtree(store.root, ignore_errors=True)
        raise


def _check_change(
    spec: GridSpec, plan: SubmitPlan, force: list[str], *, warnings: bool = True
) -> None:
    """Refuse a changed grid without ``--force grid``, and (``warnings``) a plan with warnings
    (data missing on this machine: a dry run shows them, they may hold where the runs run)."""
    if plan.change is not None and FORCE_GRID not in force:
        raise GridChangedError(
            f"grid {spec.name} changed since this sweep was created:\n{plan.change.render()}",
            "submit with `--force grid` to adopt the new grid (finished runs are "
            "kept), or give a new --root",
        )
    if warnings and plan.to_submit and plan.warnings:
        raise SweepError(plan.warnings[0], "nothing was submitted")


def _check_force(spec: GridSpec, force: list[str], ids: set[str] | None = None) -> None:
    if not set(force) - {FORCE_GRID}:
        return  # nothing to look up: the grid is not expanded for it
    ids = ids if ids is not None else {r.run_id for r in expand_grid_runs(spec)}
    unknown = sorted(set(force) - ids - {FORCE_GRID})
    if unknown:
        raise SweepError(
            f"--force names runs not in grid {spec.name}: {', '.join(unknown)}",
            "give run ids of the grid (see --dry-run), or `--force grid` to adopt a changed grid",
        )


def _check_not_foreign(store: SweepStore) -> None:
    """Refuse a folder that holds anything but a sweep being created: its lock and the
    manifest's temporary file (another ``submit`` writing the first ``sweep.json`` at this
    moment, or one that died doing so)."""
    if store.exists() or not store.root.exists():
        return
    being_created = (LOCK_FILE, f".{MANIFEST_FILE}.tmp")
    if any(not p.name.startswith(being_created) for p in store.root.iterdir()):
        raise SweepError(
            f"{store.root} exists and is not a sweep root",
            "give an empty or new --root (decon never writes into a foreign folder)",
        )


def _updated_manifest(store: SweepStore, spec: GridSpec, plan: SubmitPlan) -> dict[str, Any]:
    entries = {rid: run.manifest_entry() for rid, run in plan.runs.items()}
    if plan.new_sweep:
        manifest = store.new_manifest(spec.name, plan.grid_hash, entries)
    else:
        manifest = store.read_manifest()
        if plan.change is not None:
            retired = manifest.setdefault("retired_runs", {})
            for rid in plan.change.removed:
                retired[rid] = manifest["runs"][rid]
            manifest.setdefault("grid_changes", []).append(
                {
                    "time_unix": time.time(),
                    "from_hash": manifest["grid_hash"],
                    "to_hash": plan.grid_hash,
                    "added": plan.change.added,
                    "removed": plan.change.removed,
                    "spec_changes": plan.change.spec_changes,
                }
            )
        manifest["grid_hash"] = plan.grid_hash
        manifest["runs"] = entries
    manifest["grid_spec"] = spec.model_dump(mode="json")
    return manifest


def _submit_groups(
    store: SweepStore, manifest: dict[str, Any], plan: SubmitPlan, *, reason: str, **extra: Any
) -> SubmitResult:
    for group in plan.groups:
        for rid in group:
            store.write_run_config(plan.runs[rid].config)
    error = None
    if plan.executor == "slurm":
        jobs, error = executors.submit_slurm(
            store, plan.groups, plan.resources, f"decon-{plan.grid}"
        )
    else:
        jobs = [executors.submit_local(store, g, plan.resources) for g in plan.groups]
    if not jobs:
        raise error or SweepError("nothing was submitted")
    entry = store.record_submission(
        manifest,
        executor=plan.executor,
        resources=plan.resources.reference,
        jobs=jobs,
        reason=reason,
        **extra,
    )
    return SubmitResult(plan, entry, error)


def submit_runs(
    store: SweepStore,
    run_ids: Iterable[str],
    resources: ResourceProfile,
    executor: str | None = None,
    *,
    alone: bool = False,
    reason: str,
) -> SubmitResult:
    """(Re)submit these runs of the sweep; for ``recover``. Call it under ``store.lock()``.

    Failed runs are submitted (the caller decided); completed, diverged, live and queued
    ones are still skipped, so this never runs anything twice. ``alone``: one run per GPU
    job (after an out-of-memory). ``reason`` is recorded with the submission.
    """
    manifest = store.read_manifest()
    executor = executor or resources.executor
    run_ids = list(dict.fromkeys(run_ids))
    unknown = [r for r in run_ids if r not in manifest["runs"]]
    if unknown:
        raise SweepError(
            f"not runs of this sweep: {', '.join(unknown)}", "see `decon monitor` for run ids"
        )
    queued = queued_runs(manifest)
    decisions, runs = [], {}
    for rid in run_ids:
        entry = manifest["runs"][rid]
        try:
            cfg = RunConfig.model_validate(entry["config"])
            runs[rid] = GridRun(
                rid, entry["variant"], entry["lr"], entry["weight_decay"], entry["seed"], cfg
            )
        except (KeyError, TypeError, ValidationError) as exc:
            raise SweepError(
                f"{store.manifest_path}: run {rid} is not a whole run entry "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]})",
                "restore sweep.json, or submit the grid again (decon submit --grid NAME)",
            ) from None
        ok, why = decide(
            contract.view_run(store.run_dir(rid)), queued_in=queued.get(rid), forced=True
        )
        decisions.append(RunDecision(rid, entry["variant"], ok, why))
    plan = SubmitPlan(
        root=store.root,
        grid=manifest["grid"],
        grid_hash=manifest["grid_hash"],
        executor=executor,
        resources=resources,
        new_sweep=False,
        change=None,
        decisions=decisions,
        groups=[],
        runs=runs,
    )
    _layout(plan, [(d.run_id, d.variant) for d in decisions if d.submit], alone=alone)
    if not plan.to_submit:
        return SubmitResult(plan, None)
    executors.check_executor(executor, resources)
    return _submit_groups(store, manifest, plan, reason=reason, alone=alone)


def wait_targets(submission: dict[str, Any]) -> list[str]:
    """The run ids a submission asked for (what ``--wait`` watches)."""
    return [rid for job in submission.get("jobs", []) for rid in job.get("run_ids", [])]


def jobs_holding(manifest: dict[str, Any], run_ids: Iterable[str]) -> list[tuple[str, dict]]:
    """``(executor, job record)`` of every submitted job that holds one of ``run_ids``."""
    wanted = set(run_ids)
    return [(ex, job) for ex, job in _manifest_jobs(manifest) if wanted & set(job["run_ids"])]


def runs_done(
    store: SweepStore,
    jobs: list[tuple[str, dict[str, Any]]],
    run_ids: Iterable[str],
    now: float | None = None,
) -> bool:
    """True when each run is completed, diverged or failed, or no live job holds it."""
    live = executors.live_jobs(jobs)
    live_runs = {rid for _, job in jobs if job["job_id"] in live for rid in job["run_ids"]}
    for rid in run_ids:
        view = contract.view_run(store.run_dir(rid), now)
        if view.terminal or view.state == contract.FAILED:
            continue
        if rid in live_runs or view.state == contract.RUNNING:
            return False
    return True


def wait_done(store: SweepStore, submission: dict[str, Any], now: float | None = None) -> bool:
    """:func:`runs_done` for the runs of one submission."""
    jobs = [(submission["executor"], j) for j in submission.get("jobs", [])]
    return runs_done(store, jobs, wait_targets(submission), now)
