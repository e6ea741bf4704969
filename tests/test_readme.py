"""Every `decon` command the README and docs/ show runs as shown (on the offline digits data).

Commands are read from the ```bash blocks of README.md and docs/*.md, so an edit there is
tested here (a line shown in several places runs once). Each runs in a real subprocess
(``python -m deconcnn_cli``) from a scratch directory, with three additions to ``decon train``
lines that make them CPU-sized without changing what they mean: ``--max-steps 2`` (the run
stops checkpointed, exit 3), ``--set model.width_mult=0.125`` and ``--set data.image_size=8``
(a full-width ResNet-18's cold Lanczos at step 0 alone takes minutes on one CPU thread).

- ``decon train`` lines whose config trains on CIFAR (this machine has no CIFAR and no
  network) are skipped with that reason; their flags are still parsed and validated.
- ``decon submit`` lines that go to a SLURM cluster run as shown on a machine without one
  (``sbatch``/``srun`` taken off PATH, the root moved into the scratch directory): they must
  exit 2 with an ``error:``/``hint:`` and write nothing. tests/sweep/test_slurm.py submits to
  a real SLURM. Their ``--dry-run`` twins run as shown and must write nothing either.
- ``decon export`` / ``decon report`` run as shown against the sweep the README's local
  ``decon submit ... --wait`` line makes (their ``--root`` is replaced by that sweep's root,
  as the resume example's ``<hash>`` is replaced by the run it resumes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from deconcnn_cli.commands.train import _flags, resolve_config
from deconcnn_cli.fileio import read_json
from deconcnn_cli.sweep.grid import expand_grid, load_grid
from tests.conftest import REPO, run_cli

CPU_SIZED = ["--max-steps", "2", "--set", "model.width_mult=0.125", "--set", "data.image_size=8"]
EXIT_STOPPED = 3  # stopped by --max-steps: checkpointed, resumable


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shown_commands(paths: list[Path] = DOCUMENTS) -> list[list[str]]:
    """The ``decon ...`` lines of the ```bash blocks of ``paths``, split like a shell would,
    each once (in the order first shown)."""
    seen: dict[tuple[str, ...], None] = {}
    for path in paths:
        blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
        lines = [ln.strip() for b in blocks for ln in b.splitlines()]
        for ln in lines:
            if ln.startswith("decon "):
                seen.setdefault(tuple(shlex.split(ln, comments=True)), None)
    return [list(c) for c in seen]


COMMANDS = shown_commands()


def _option(args: list[str], *names: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in names]


def _config(args: list[str]):
    """The config a ``decon train`` line resolves to (flags parsed as the command does)."""
    flags = _flags(
        lr=float(v[0]) if (v := _option(args, "--lr")) else None,
        wd=float(v[0]) if (v := _option(args, "--wd")) else None,
        seed=int(v[0]) if (v := _option(args, "--seed")) else None,
        epochs=int(v[0]) if (v := _option(args, "--epochs")) else None,
        dataset=v[0] if (v := _option(args, "--dataset")) else None,
        data_dir=Path(v[0]) if (v := _option(args, "--data-dir")) else None,
    )
    variant = (_option(args, "--variant", "-v") or [None])[0]
    return resolve_config(
        variant, _option(args, "--profile", "-p"), _option(args, "--set"), None, flags
    )


TRAIN = [c for c in COMMANDS if c[1] == "train"]
SWEEP = [c for c in COMMANDS if c[1] != "train"]


def test_readme_shows_train_and_sweep_commands() -> None:
    assert len(TRAIN) >= 5
    assert {c[1] for c in SWEEP} >= {"submit", "export", "report", "validate"}
    docs_only = shown_commands(DOCUMENTS[1:])
    assert any(c[1] == "validate" and "--json" in c for c in docs_only)  # docs/ are read too


def _without_slurm() -> dict[str, str]:
    """PATH with every directory that holds ``sbatch`` or ``srun`` left out."""
    keep = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not any((Path(d) / exe).exists() for exe in ("sbatch", "srun"))
    ]
    return {"PATH": os.pathsep.join([str(Path(sys.executable).parent), *keep])}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's local ``decon submit ... --wait`` line, run as shown in a scratch dir."""
    (line,) = [c for c in SWEEP if c[1] == "submit" and "local" in c]
    cwd = tmp_path_factory.mktemp("readme_sweep")
    proc = run_cli(*line[1:], cwd=cwd, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd / _option(line, "--root")[0], proc.stdout


@pytest.mark.parametrize("args", SWEEP, ids=[" ".join(c[1:]) for c in SWEEP])
def test_readme_sweep_command_runs_as_shown(
    args: list[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cmd = args[1]
    if cmd == "submit" and "local" not in args:  # to SLURM: a root in the scratch dir
        shown = _option(args, "--root")[0]
        root = tmp_path / "sweep" / Path(shown).name
        args = [str(root) if a == shown else a for a in args]
    if cmd == "submit" and "--dry-run" in args:
        proc = run_cli(*args[1:], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs = len(expand_grid(load_grid(_option(args, "--grid")[0])))
        assert re.search(rf"\b{runs}\b", proc.stdout), proc.stdout  # the plan's total
        if _option(args, "--grid") == ["loss_lin_slope"]:
            assert runs == 216 and "108" in proc.stdout  # runs, GPU jobs
        assert not any(tmp_path.iterdir())  # a dry run writes nothing
    elif cmd == "submit" and "local" not in args:  # no SLURM here: a clear refusal
        proc = run_cli(*args[1:], cwd=tmp_path, env=_without_slurm())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("error:") and "hint:" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not any(tmp_path.iterdir())  # nothing written
    elif cmd == "submit":
        root, stdout = request.getfixturevalue("local_sweep")
        n = len(read_json(root / "sweep.json")["runs"])
        assert f"all {n} runs ended: {n} completed" in " ".join(stdout.split())
    elif cmd in ("export", "report"):
        root, _ = request.getfixturevalue("local_sweep")
        shown = _option(args, "--root")[0]
        args = [str(root) if a == shown else a for a in args]
        proc = run_cli(*args[1:], cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = tmp_path / args[2] if cmd == "export" else tmp_path / _option(args, "--out")[0]
        assert (out if cmd == "export" else out / "report.html").is_file()
    else:  # validate: every variant trains a few steps here, memory against the profile
        proc = run_cli(*args[1:], cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if "--json" in args:
            report = json.loads(proc.stdout)
            assert report["ok"] is True and report["checks"], report
        else:
            assert "PASS: 0 failed" in proc.stdout


@pytest.mark.parametrize("args", TRAIN, ids=[" ".join(c[1:]) for c in TRAIN])
def test_readme_train_command_runs_as_shown(args: list[str], tmp_path: Path) -> None:
    resume = _option(args, "--run-dir")
    if resume:  # resume the run the digits example made (the README writes <hash>)
        (digits,) = [c for c in TRAIN if "digits" in c]
        first = run_cli(*digits[1:], *CPU_SIZED, cwd=tmp_path)
        assert first.returncode == EXIT_STOPPED, first.stderr
        (run_dir,) = (tmp_path / "runs").iterdir()
        args = [a if a not in resume else str(run_dir) for a in args]
    else:
        cfg = _config(args)  # the flags parse and the config validates, CIFAR or not
        if cfg.data.dataset != "digits":
            pytest.skip(f"trains on {cfg.data.dataset}: needs CIFAR on disk or a download")
    proc = run_cli(*args[1:], *CPU_SIZED, cwd=tmp_path)
    assert proc.returncode == EXIT_STOPPED, proc.stderr
    steps_done = 3 if resume else 2  # a resumed run stops after its next step
    assert "interrupted" in proc.stdout and f"(step {steps_done})" in proc.stdout
    assert "error" not in proc.stderr
