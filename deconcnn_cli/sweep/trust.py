"""Who can write into a sweep root: the paths others could plant files in. No torch.

A sweep root holds files that later processes load: checkpoints (``decon train`` resumes
from them) and the job pickles submitit writes under ``jobs/`` (the compute node unpickles
them). Checkpoints load with ``weights_only=True`` (training/checkpoint.py), but a job
pickle is an ordinary pickle, and anyone who can replace a checkpoint can still change
what a run resumes from. So the root must be writable by its owner only (docs/cluster.md,
"Who may write a sweep root"); :func:`writable_by_others` lists where it is not.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from deconcnn_cli import contract
from deconcnn_cli.sweep.manifest import JOBS_DIR, RUNS_DIR

_OTHERS_MAY_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _loose(path: Path) -> bool:
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    return not stat.S_ISLNK(mode) and bool(mode & _OTHERS_MAY_WRITE)


def _candidates(root: Path) -> list[Path]:
    """The root, ``runs/`` and ``jobs/``, every run directory and its checkpoints (folder
    and files), every folder and pickle under ``jobs/``."""
    paths = [root, root / RUNS_DIR, root / JOBS_DIR]
    runs = root / RUNS_DIR
    if runs.is_dir():
        for run in sorted(runs.iterdir()):
            ckpts = run / contract.CHECKPOINT_DIR
            paths += [run, ckpts]
            if ckpts.is_dir():
                paths += sorted(ckpts.iterdir())
    jobs = root / JOBS_DIR
    if jobs.is_dir():
        for folder, dirs, files in os.walk(jobs):
            dirs.sort()
            paths += [Path(folder, d) for d in dirs]
            paths += [Path(folder, f) for f in sorted(files) if f.endswith(".pkl")]
    return paths


def writable_by_others(root: Path) -> list[Path]:
    """Paths of the sweep root that its group or everyone may write (none: ``[]``)."""
    if not root.is_dir():
        return []
    return [p for p in _candidates(root) if _loose(p)]


def writable_warning(root: Path, shown: int = 3) -> str | None:
    """One ``warning:`` sentence naming the loosely writable paths, or None."""
    loose = writable_by_others(root)
    if not loose:
        return None
    names = ", ".join(str(p) for p in loose[:shown])
    more = f" and {len(loose) - shown} more" if len(loose) > shown else ""
    return (
        f"{len(loose)} path(s) of sweep root {root} are group- or world-writable ({names}{more}): "
        "whoever can write there can change what a run resumes from or what a job unpickles. "
        f"Make it yours alone: chmod -R go-w {root} (docs/cluster.md, 'Who may write a sweep root')"
    )
