"""Shared fixtures: tiny CPU runs of the real CLI and loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DECON = str(Path(sys.executable).parent / "decon")  # the console script pip installed

# A run small enough for CPU tests: smoke profile (digits, width 1/8, 3 epochs) at 8x8 pixels.
TINY = ["-p", "smoke", "--set", "data.image_size=8", "--quiet"]


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m deconcnn_cli ...`` in a real subprocess, on one torch thread (``env``:
    variables to set on top of this process's environment)."""
    env = subprocess_env() | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "deconcnn_cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=timeout,
    )


def subprocess_env() -> dict[str, str]:
    """One thread per subprocess run: the test suite is several runs sharing this machine, so
    it says so the way a launcher does (``$DECON_CONCURRENT_RUNS``, see contract.py)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "DECON_CONCURRENT_RUNS": str(cpus or 1),
    }


def only_run(root: Path) -> Path:
    """The single run directory under ``root`` (fails if there is not exactly one)."""
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return run


@pytest.fixture
def tiny_args() -> list[str]:
    return list(TINY)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    """In-process torch on one thread: on a 2-core machine shared with subprocess runs, two
    spinning OpenMP threads slow every op by orders of magnitude (see docs/performance.md)."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where CUDA is visible, SLURM tests where a controller answers; elsewhere
    they are deselected, and said so in one line."""
    _deselect(config, items, "slurm", _slurm_missing)
    _deselect(config, items, "gpu", _cuda_missing)


def _cuda_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "no CUDA device on this machine"


def _slurm_missing() -> str | None:
    from deconcnn_cli.sweep.executors import slurm_unavailable

    why = slurm_unavailable()
    return f"no SLURM reachable ({why}); run `make test-slurm`" if why else None


def _deselect(config: pytest.Config, items: list[pytest.Item], marker: str, missing) -> None:
    marked = [item for item in items if marker in item.keywords]
    if not marked:
        return
    why = missing()
    if why is None:
        return
    items[:] = [item for item in items if marker not in item.keywords]
    config.hook.pytest_deselected(items=marked)
    print(f"\n{len(marked)} {marker}-marked test(s) deselected: {why}")


def complete_words(words: str) -> list[str]:
    """What the installed `decon` completes for the command line ``words`` (bash)."""
    env = {
        **os.environ,
        "_DECON_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split(" ")) - 1),
    }
    out = subprocess.run([DECON], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()
