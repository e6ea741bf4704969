"""A clean sweep made by real tiny training runs, shared by the verify/monitor tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY
from tests.sweep.fakes import write_manifest

# two completed runs and one that diverges at once (lr 1e6): the three outcomes verify knows
RUN_ARGS = (["--seed", "0"], ["--seed", "1"], ["--seed", "0", "--lr", "1e6"])


@pytest.fixture(scope="session")
def clean_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "sweep"
    runs = root / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "deconcnn_cli", "train", "--variant", "base", *TINY, *extra]
            + ["--root", str(runs)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in RUN_ARGS
    ]
    for p in procs:
        out, _ = p.communicate(timeout=1800)  # a guard against a hang, not a speed check
        assert p.returncode == 0, out
    run_ids = sorted(p.name for p in runs.iterdir())
    assert len(run_ids) == 3
    write_manifest(
        root, run_ids, [(f"local-{i}", [r]) for i, r in enumerate(run_ids)], executor="local"
    )
    return root


@pytest.fixture
def sweep_copy(clean_sweep: Path, tmp_path: Path) -> Path:
    """A private copy of the clean sweep to break."""
    dest = tmp_path / "sweep"
    shutil.copytree(clean_sweep, dest)
    return dest
