"""A checkpoint never runs code: the safe load, its allow-list, and a planted checkpoint."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from deconcnn_cli.contract import read_attempts, read_events
from deconcnn_cli.fileio import read_json
from deconcnn_cli.training.checkpoint import (
    UnsafeCheckpointError,
    load_latest_checkpoint,
    save_checkpoint,
)
from tests.conftest import run_cli


class _Planted:
    """Unpickling this runs ``code``: what an adversary would put in a run directory."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):  # noqa: ANN204 - the pickle protocol's signature
        return (exec, (self.code,))


def _plant(run: Path, step: int, state: object) -> Path:
    """``state`` as ``ckpt_<step>.pt`` with a matching checksum, as anyone able to write the
    folder could leave it (a checksum proves nothing about who wrote the file)."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = folder / f"ckpt_{step:09d}.pt"
    path.write_bytes(buf.getvalue())
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    path.with_suffix(".sha256").write_text(f"{digest}  {path.name}\n")
    return path


def _cfg():
    from deconcnn_cli.config import load_run_config

    return load_run_config(
        variant="base", profiles=["smoke"], overrides=["data.image_size=8"], flags={"seed": 3}
    )


def test_what_save_checkpoint_writes_loads_safely_and_whole(tmp_path: Path):
    """The allow-list covers everything a checkpoint holds: RNG states (numpy's uint32 key
    included), tensors, nested dicts, None."""
    random.seed(5)
    np.random.seed(5)
    model = torch.nn.Linear(3, 2)
    state = {"model": model.state_dict(), "analysis": {"eigenvector": None}, "precision": "fp32"}
    save_checkpoint(tmp_path, 7, state)
    loaded, skipped = load_latest_checkpoint(tmp_path)
    assert skipped == [] and loaded["next_step"] == 7 and loaded["precision"] == "fp32"
    assert torch.equal(loaded["model"]["weight"], model.state_dict()["weight"])
    name, key, pos, *_ = loaded["rng"]["numpy"]
    want = np.random.get_state()
    assert (name, pos) == (want[0], want[2]) and np.array_equal(key, want[1])
    assert key.dtype == np.uint32
    assert loaded["rng"]["python"] == random.getstate()


def test_a_checkpoint_that_would_run_code_is_refused_not_skipped(tmp_path: Path):
    """Even with a loadable older checkpoint beside it, the planted newest one is refused."""
    witness = tmp_path / "ran"
    _plant(tmp_path, 26, {"next_step": 26})  # older, harmless and loadable
    bad = _plant(tmp_path, 30, {"model": _Planted(f"open({str(witness)!r}, 'w')")})
    with pytest.raises(UnsafeCheckpointError) as info:
        load_latest_checkpoint(tmp_path)
    assert str(bad) in info.value.message and "exec" in info.value.message
    assert not witness.exists()


def test_resuming_a_run_with_a_planted_checkpoint_runs_nothing_and_fails_it(tmp_path: Path):
    """`decon train --run-dir` (what `recover` and every job run): nothing executes, the run
    ends `failed` with a reason naming the file, no step is trained."""
    from deconcnn_cli.training.rundir import prepare_run_dir

    run, witness = tmp_path / "run", tmp_path / "pwned"
    prepare_run_dir(_cfg(), run)
    code = f"import os; os.system('touch {witness}')"
    bad = _plant(run, 30, {"model": {}, "next_step": 30, "rng": _Planted(code)})
    proc = run_cli("train", "--run-dir", str(run), "--quiet")
    assert not witness.exists()
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"error: checkpoint {bad} fails the safe load")
    assert "hint: " in proc.stderr and "Traceback" not in proc.stderr
    status = read_json(run / "status.json")
    assert status["state"] == "failed" and status["exception_type"] == "UnsafeCheckpointError"
    assert str(bad) in status["reason"]
    (end,) = [a for a in read_attempts(run) if a.get("event") == "end"]
    assert (end["state"], end["exit_code"]) == ("failed", 1)
    assert any(str(bad) in e["message"] for e in read_events(run) if e["level"] == "error")
    steps = run / "metrics" / "step.csv"
    assert not steps.exists() or len(steps.read_text().splitlines()) <= 1  # no step trained
