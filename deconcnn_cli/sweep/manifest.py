"""sweep.json's names and tolerant readers (docs/sweep-root.md). No torch.

A manifest is edited by hand and copied around: an entry of the wrong type is skipped, never
a crash, and every name it holds is checked against its pattern before it becomes a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deconcnn_cli.contract import NAME_PATTERN, RUN_ID_PATTERN, name_problem
from deconcnn_cli.errors import DeconError, SweepError
from deconcnn_cli.fileio import read_json

SCHEMA_VERSION = 1
MANIFEST_FILE = "sweep.json"  # what makes a folder a sweep root
RUNS_DIR = "runs"  # <root>/runs/<run_id>/: the run directories
JOBS_DIR = "jobs"  # <root>/jobs/: the scheduler's job folders


def read_manifest(root: Path, error: type[DeconError] = SweepError) -> dict[str, Any]:
    """The sweep root's ``sweep.json``, checked: the one reader of the manifest.

    Raises ``error`` (a :class:`DeconError` subclass, so each command keeps its own error
    type) when the root is not a folder, holds no manifest, or the manifest is unreadable,
    has no ``runs`` object, holds a name that does not match its pattern, or is of another
    schema version.
    """
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():  # which folder it is instead, and the sweep root to give
        from deconcnn_cli.sweep.rootcheck import not_a_sweep_root

        raise error(*not_a_sweep_root(root))
    manifest = read_json(path)
    if manifest is None or not isinstance(manifest.get("runs"), dict):
        raise error(
            f"{path}: unreadable or not a sweep manifest (no `runs` object)",
            "restore it from a backup, or start a new sweep root (docs/sweep-root.md)",
        )
    why = manifest_name_problem(manifest)
    if why is not None:
        raise error(
            f"{path}: {why}",
            "a name read from sweep.json becomes a path or a script line: fix or restore "
            "the file (docs/sweep-root.md, Names)",
        )
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise error(
            f"{path}: schema_version {manifest.get('schema_version')!r}, "
            f"this decon reads {SCHEMA_VERSION}",
            "use the decon version that created the sweep",
        )
    return manifest


def manifest_name_problem(manifest: dict[str, Any]) -> str | None:
    """The first run id, grid name, job id or resource profile in a sweep.json that does not
    match its pattern (a ``resources`` may also be the absolute path of a .toml file)."""
    checks: list[tuple[Any, str, str]] = [(manifest.get("grid"), NAME_PATTERN, "grid name")]
    for key in ("runs", "retired_runs"):
        ids = manifest.get(key)
        checks += [(r, RUN_ID_PATTERN, "run id") for r in (ids if isinstance(ids, dict) else {})]
    for sub in submissions(manifest):
        res = sub.get("resources")
        if res is not None and not (isinstance(res, str) and _is_toml_path(res)):
            checks.append((res, NAME_PATTERN, "resource profile"))
        for job in sub["jobs"]:
            checks.append((str(job.get("job_id")), NAME_PATTERN, "job id"))
            checks += [(r, RUN_ID_PATTERN, "run id") for r in job_run_ids(job)]
    for value, pattern, what in checks:
        why = name_problem(value, pattern, what)
        if why is not None:
            return why
    return None


def _is_toml_path(text: str) -> bool:
    """An absolute path of a .toml file without control characters."""
    return text.startswith("/") and text.endswith(".toml") and text.isprintable()


# ---- sweep.json (docs/sweep-root.md): tolerant readers of what its lists hold. A manifest is
# edited by hand and copied around; an entry of the wrong type is skipped, never a crash.
def submissions(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's submissions that are objects, each with ``jobs`` as a list of objects."""
    subs = manifest.get("submissions")
    out = []
    for sub in subs if isinstance(subs, list) else []:
        if isinstance(sub, dict):
            jobs = sub.get("jobs")
            jobs = [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []
            out.append({**sub, "jobs": jobs})
    return out


def job_run_ids(job: dict[str, Any]) -> list[str]:
    """A manifest job's run ids (strings only)."""
    ids = job.get("run_ids")
    return [r for r in ids if isinstance(r, str)] if isinstance(ids, list) else []
