"""A small real sweep shared by the export and report tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli
from tests.export.synthetic import write_manifest, write_run

RUNS = {
    "done": {"variant": "base", "lr": 0.1, "weight_decay": 1e-3, "seed": 0},
    "blown": {"variant": "base", "lr": 1e4, "weight_decay": 1e-7, "seed": 1},
    "broken": {"variant": "narrow", "lr": 0.05, "weight_decay": 1e-5, "seed": 2},
    "absent": {"variant": "narrow", "lr": 0.2, "weight_decay": 1e-2, "seed": 3},
}


@pytest.fixture(scope="package")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep root with a real completed run, a real diverged run (lr 1e4), a failed run
    (an exception cannot be provoked on purpose in a real run: written per the contract)
    and a run of the manifest that never started."""
    root = tmp_path_factory.mktemp("sweep")
    write_manifest(root, RUNS)
    for run_id, lr in (("done", "0.1"), ("blown", "10000")):
        proc = run_cli(
            "train", "--variant", "base", *TINY, "--lr", lr, "--run-dir", f"{root}/runs/{run_id}"
        )
        assert proc.returncode == 0, proc.stderr
    write_run(
        root,
        "broken",
        state="failed",
        summary=None,
        steps_per_epoch=13,  # the smoke profile's runs: its analysis settings, as theirs
        analysis={"alpha_early_epochs": [1.0, 3.0], "burn_in_ce_nats": 2.0},
        status_extra={"exception_type": "RuntimeError", "reason": "RuntimeError: boom"},
    )
    return root
