"""Every `decon train` command the README shows runs as shown (on the offline digits data).

Commands are read from the README's ```bash blocks, so an edit there is tested here. Each runs
in a real subprocess (``python -m deconcnn_cli``) from a scratch directory, with three
additions that make it CPU-sized without changing what it means: ``--max-steps 2`` (the run
stops checkpointed, exit 3), ``--set model.width_mult=0.125`` and ``--set data.image_size=8``
(a full-width ResNet-18's cold Lanczos at step 0 alone takes minutes on one CPU thread).
Skipped, each with its reason in the test id and the skip message:

- commands whose config trains on CIFAR (this machine has no CIFAR and no network); their
  flags are still parsed and validated, which is what the check below does instead;
- other subcommands (``decon validate``, ``submit``, ... are not built yet): none is shown.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deconcnn_cli.commands.train import _flags, resolve_config
from tests.conftest import REPO, run_cli

CPU_SIZED = ["--max-steps", "2", "--set", "model.width_mult=0.125", "--set", "data.image_size=8"]
EXIT_STOPPED = 3  # stopped by --max-steps: checkpointed, resumable


def readme_commands() -> list[list[str]]:
    """The ``decon ...`` lines of the README's ```bash blocks, split like a shell would."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines()]
    return [shlex.split(ln) for ln in lines if ln.startswith("decon ")]


COMMANDS = readme_commands()


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


def test_readme_shows_train_commands() -> None:
    assert len(COMMANDS) >= 5 and all(c[1] == "train" for c in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c[1:]) for c in COMMANDS])
def test_readme_train_command_runs_as_shown(args: list[str], tmp_path: Path) -> None:
    assert args[:2] == ["decon", "train"], "only `decon train` is built: no other command shown"
    resume = _option(args, "--run-dir")
    if resume:  # resume the run the digits example made (the README writes <hash>)
        (digits,) = [c for c in COMMANDS if "digits" in c]
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
