"""A read-only view of a sweep root: its manifest, its runs and the jobs that ran them.

monitor, recover and verify judge a sweep from ``sweep.json`` (docs/sweep-root.md) and the run
directories alone. This module reads them without locking or writing anything, so it can be
pointed at any root (and refuses one that is not a sweep). No torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deconcnn_cli.errors import SweepError
from deconcnn_cli.sweep.manifest import RUNS_DIR, job_run_ids, submissions
from deconcnn_cli.sweep.store import SweepStore

RECOVER_LOG_FILE = "recover.jsonl"  # one line per action `decon recover` took (append-only)


class UnknownRunError(SweepError):
    """A run id that is not part of the sweep's manifest."""


@dataclass(frozen=True)
class JobRef:
    """One scheduler job of one submission, as the manifest records it."""

    job_id: str  # "1234", or "1234_5" for an array task
    run_ids: tuple[str, ...]
    submitted_unix: float  # the submission's time: a scheduler record older than this is stale
    executor: str  # "slurm" | "local"
    alone: bool = False
    pid: int | None = None  # a local runner's process
    host: str | None = None


@dataclass(frozen=True)
class SweepView:
    root: Path
    manifest: dict[str, Any]
    run_ids: tuple[str, ...]
    jobs_by_run: dict[str, JobRef] = field(default_factory=dict)  # the run's latest job

    @property
    def grid(self) -> str:
        return str(self.manifest.get("grid", "?"))

    @property
    def code_version(self) -> str | None:
        return self.manifest.get("code_version")

    def run_dir(self, run_id: str) -> Path:
        return self.root / RUNS_DIR / run_id

    def slurm_job_ids(self) -> list[str]:
        """Every SLURM job id the manifest holds a run's latest job under (sorted, unique)."""
        return sorted({j.job_id for j in self.jobs_by_run.values() if j.executor == "slurm"})

    def check_run_ids(self, run_ids: list[str]) -> None:
        unknown = [r for r in run_ids if r not in self.run_ids]
        if unknown:
            raise UnknownRunError(
                f"run id {unknown[0]!r} is not part of the sweep at {self.root}",
                hint="`decon monitor --json --root DIR` lists the sweep's run ids",
            )


def load_sweep(root: Path) -> SweepView:
    """Read ``<root>/sweep.json``; :class:`SweepError` when root is not a sweep."""
    manifest = SweepStore(root).read_manifest()  # SweepError when root is not a sweep
    runs = manifest["runs"]
    jobs_by_run: dict[str, JobRef] = {}
    for sub in submissions(manifest):
        t = sub.get("time_unix")
        for job in sub["jobs"]:
            if not isinstance(job.get("job_id"), str | int) or isinstance(job["job_id"], bool):
                continue
            ref = JobRef(
                job_id=str(job["job_id"]),
                run_ids=tuple(job_run_ids(job)),
                submitted_unix=float(t) if isinstance(t, int | float) else 0.0,
                executor=str(sub.get("executor") or "slurm"),
                alone=bool(job.get("alone") or sub.get("alone")),
                pid=job["pid"] if isinstance(job.get("pid"), int) else None,
                host=job["host"] if isinstance(job.get("host"), str) else None,
            )
            for rid in ref.run_ids:
                jobs_by_run[rid] = ref  # submissions are in time order: the last one wins
    return SweepView(
        root=Path(root),
        manifest=manifest,
        run_ids=tuple(sorted(runs)),
        jobs_by_run=jobs_by_run,
    )
