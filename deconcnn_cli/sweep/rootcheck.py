"""Why a folder given as ``--root`` is not a sweep root, said so that the user can fix it.

Every sweep command (monitor, recover, verify, export, report) reads a sweep root: the folder
``decon submit`` made, holding ``sweep.json``, ``runs/`` and ``jobs/`` (docs/sweep-root.md).
A user arrives with other folders: one that does not exist, the sweep's own ``runs/`` folder
or a run directory inside it (one or two levels too deep), or a plain folder of ``decon
train`` runs. :func:`not_a_sweep_root` tells these apart and names the sweep root to give
instead when there is one. No torch, reads only.
"""

from __future__ import annotations

from pathlib import Path

from deconcnn_cli.contract import CONFIG_FILE
from deconcnn_cli.sweep.manifest import MANIFEST_FILE

_LOOK_FOR = ("sweeps", "runs")  # where `decon submit` and `make demo` put sweep roots
_LIST_AT_MOST = 4


def not_a_sweep_root(root: Path) -> tuple[str, str]:
    """``(message, hint)`` saying why ``root`` (which holds no ``sweep.json``) is not a
    sweep root, and which folder to give instead."""
    root = Path(root)
    above = _sweep_root_above(root)
    if not root.exists():
        message = f"sweep root {root} does not exist"
        if above is not None:
            return message, f"the sweep root above it is {above}: give --root {above}"
        return message, _suggest(root)
    if not root.is_dir():
        return f"{root} is not a folder", "give --root a sweep root (docs/sweep-root.md)"
    if above is not None:
        levels = "one level" if root.parent.resolve() == above.resolve() else "two levels"
        return (
            f"{root} is inside the sweep root {above} ({levels} too deep), not a sweep root",
            f"give --root {above}",
        )
    runs = _train_runs(root)
    if runs:
        return (
            f"{root} is a folder of {runs} `decon train` run director"
            f"{'y' if runs == 1 else 'ies'}, not a sweep root (no {MANIFEST_FILE})",
            "the sweep commands read a sweep made by `decon submit --grid GRID --root DIR`; "
            f"a single run's state is in {root}/<run_id>/status.json and train.log "
            "(docs/run-directory.md)",
        )
    return f"{root} is not a sweep root (no {MANIFEST_FILE})", _suggest(root)


def _sweep_root_above(path: Path) -> Path | None:
    """The nearest folder above ``path`` (up to two levels: ``runs/`` and a run directory
    in it) that holds a ``sweep.json``."""
    for parent in list(path.parents)[:2]:
        if (parent / MANIFEST_FILE).is_file():
            return parent
    return None


def _train_runs(folder: Path) -> int:
    try:
        return sum(1 for p in folder.iterdir() if (p / CONFIG_FILE).is_file())
    except OSError:
        return 0


def _suggest(root: Path) -> str:
    found = [
        p
        for base in (Path(b) for b in _LOOK_FOR)
        if base.is_dir()
        for p in sorted(base.iterdir())
        if (p / MANIFEST_FILE).is_file()
    ]
    if found:
        names = ", ".join(str(p) for p in found[:_LIST_AT_MOST])
        more = f" (and {len(found) - _LIST_AT_MOST} more)" if len(found) > _LIST_AT_MOST else ""
        return f"sweep roots here: {names}{more}: give one as --root"
    return "give the --root that `decon submit` created, or submit a grid there first"
