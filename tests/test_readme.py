"""Every `decon` command the README and docs/ show runs as shown (on the offline digits data).

Commands are read from the ```bash blocks of README.md and docs/*.md, and the ``$ decon``
lines of their other blocks (examples of output), so an edit there is tested here (a line
shown in several places runs once). Each runs in a real subprocess (``python -m
deconcnn_cli``), exactly as shown, within a time limit: a ``decon train`` line states how long
it takes on a laptop CPU, and must end within :data:`SLOWER_HERE` times that here (this test
machine is a shared 2-core box), so an example that becomes slow is caught.

A line that needs what this machine lacks is marked by :func:`needs` and checked as far as
it can be here:

- CIFAR: ``decon train`` lines whose config trains on CIFAR (no CIFAR, no network here). Their
  flags are parsed and validated; the line's comment must say it is a CIFAR (GPU) run.
- SLURM: ``decon submit`` lines that go to a cluster run as shown on a machine without one
  (``sbatch``/``srun`` taken off PATH, the root moved into a scratch directory): they must exit
  2 with an ``error:``/``hint:`` and write nothing (tests/sweep/test_slurm.py submits to a
  real SLURM). Their ``--dry-run`` twins run as shown and must write nothing either. The
  monitor/export/report lines shown for such a sweep run on the README's local sweep instead.

The README's local sweep (``decon submit ... --executor local --wait``) runs in a scratch
directory, and the lines that read it run after it in that same directory, as a reader who
copies the page in order would.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from deconcnn_cli.commands.train import _flags, resolve_config
from deconcnn_cli.fileio import read_json
from deconcnn_cli.sweep.grid import expand_grid
from deconcnn_cli.sweep.profiles import load_grid
from tests.conftest import REPO, run_cli

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SLOWER_HERE = 6  # this box (2 shared cores, one thread a run) against a laptop CPU
MIN_LIMIT_S = 120.0  # process start, imports and the data load are not in "about N s"
SWEEP_LIMIT_S = 900.0  # a local sweep, a validate: their own timings are in docs/performance.md
EXIT_STOPPED = 3  # stopped by --max-steps: checkpointed, resumable


@dataclass(frozen=True)
class Shown:
    """One ``decon`` line as a document shows it."""

    args: tuple[str, ...]  # split like a shell would, without its comment
    note: str  # the comment on the line and the comment lines just above it
    doc: str  # the document's name
    output_example: bool  # a ``$ decon`` line of a block of output

    @property
    def cmd(self) -> str:
        return self.args[1]

    @property
    def id(self) -> str:
        return " ".join(self.args[1:])


def shown_commands(paths: list[Path] = DOCUMENTS) -> list[Shown]:
    """The ``decon ...`` lines of ``paths``' code blocks, each once (in the order first
    shown): every line of a ```bash block, and ``$ decon`` lines of the others."""
    seen: dict[tuple[str, ...], Shown] = {}
    for path in paths:
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), flags=re.S):
            note: list[str] = []
            for raw in body.splitlines():
                line = raw.strip()
                if lang == "bash" and line.startswith("#"):
                    note.append(line.lstrip("# "))
                    continue
                example = lang != "bash" and line.startswith("$ decon ")
                if example:
                    line = line[2:]
                if line.startswith("decon ") and (lang == "bash" or example):
                    args = tuple(shlex.split(line, comments=True))
                    trailing = line.partition(" # ")[2] if " # " in line else ""
                    text = " ".join([*note, trailing])
                    seen.setdefault(args, Shown(args, text, path.name, example))
                note = []
    return list(seen.values())


COMMANDS = shown_commands()
TRAIN = [c for c in COMMANDS if c.cmd == "train"]
SWEEP = [c for c in COMMANDS if c.cmd != "train"]


def _option(args: tuple[str, ...] | list[str], *names: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in names]


def _config(args: tuple[str, ...]):
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


def _submits_to_slurm(args: tuple[str, ...]) -> bool:
    return args[1] == "submit" and "local" not in _option(args, "--executor")


def _local_roots() -> set[str]:
    return {r for c in SWEEP if c.cmd == "submit" and not _submits_to_slurm(c.args)
            for r in _option(c.args, "--root")}  # fmt: skip


def _copied_profiles() -> dict[str, str]:
    """``cp profiles/resources/X.toml ~/Y.toml`` in the docs: ``{"~/Y.toml": <X's path>}``."""
    out = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in re.finditer(r"^cp (profiles/\S+\.toml) (~/\S+\.toml)", path.read_text(), re.M):
            out[m.group(2)] = str(REPO / m.group(1))
    return out


def _has_container(args: list[str]) -> bool:
    """Whether the line's resource profile runs its jobs inside a container image."""
    import tomllib

    for name in _option(tuple(args), "--resources"):
        path = (
            Path(name) if name.endswith(".toml") else REPO / "profiles/resources" / f"{name}.toml"
        )
        if path.is_file() and "container" in tomllib.loads(path.read_text()):
            return True
    return False


def needs(shown: Shown) -> str | None:
    """What a shown line needs that this machine lacks (it is then checked as far as it can
    be here, see the module's docstring), or None: it runs as shown."""
    if shown.cmd == "train" and not _option(shown.args, "--run-dir"):
        dataset = _config(shown.args).data.dataset
        return None if dataset == "digits" else "CIFAR"
    if _submits_to_slurm(shown.args):
        return "SLURM"
    roots = _option(shown.args, "--root")
    if shown.cmd != "submit" and roots and roots[0] not in _local_roots():
        return "SLURM"  # shown for a cluster sweep: it runs on the local sweep instead
    return None


def stated_seconds(note: str) -> float | None:
    """The laptop time a line's comment states ("about 1 min", "about 30 s"), in seconds."""
    m = re.search(r"about (\d+(?:\.\d+)?) ?(s|min|h)\b", note)
    return None if m is None else float(m.group(1)) * {"s": 1, "min": 60, "h": 3600}[m.group(2)]


def test_readme_shows_train_and_sweep_commands() -> None:
    assert len(TRAIN) >= 5
    assert {c.cmd for c in SWEEP} >= {"submit", "monitor", "export", "report", "validate"}
    docs_only = shown_commands(DOCUMENTS[1:])
    assert any(c.cmd == "validate" and "--json" in c.args for c in docs_only)  # docs/ too


def test_every_train_example_says_how_long_it_takes_on_a_laptop() -> None:
    for shown in TRAIN:
        if needs(shown) == "CIFAR":
            assert "CIFAR" in shown.note, shown.id  # says what it needs
            continue
        seconds = stated_seconds(shown.note)
        assert seconds is not None, f"{shown.id}: no 'about N s|min' in {shown.note!r}"
        assert seconds <= 5 * 60, f"{shown.id}: more than a few minutes on a laptop"


def test_sweep_commands_read_the_root_a_shown_submit_makes() -> None:
    """Copied in order, each page's export/report/monitor reads the sweep its submit made."""
    made = {r for c in SWEEP if c.cmd == "submit" for r in _option(c.args, "--root")}
    for c in SWEEP:
        if c.cmd != "submit" and (roots := _option(c.args, "--root")):
            assert roots[0] in made, f"{c.doc}: {c.id}: no shown submit makes {roots[0]}"


def test_inline_decon_commands_exist() -> None:
    """Every ``decon WORD`` the pages name in code spans is a command of the tool."""
    import typer

    from deconcnn_cli.cli import app

    names = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    for path in DOCUMENTS:
        for word in re.findall(r"`decon ([a-z][a-z-]*)", path.read_text()):
            assert word in names, f"{path.name}: `decon {word}` is not a command"


def test_shipped_grids_are_all_documented() -> None:
    text = " ".join((REPO / "docs" / "configuration.md").read_text().split())
    shipped = text.partition("Shipped: `loss_lin_slope`")[2].partition(".")[0]
    for grid in sorted((REPO / "profiles" / "grids").glob("*.toml")):
        assert f"`{grid.stem}`" in "`loss_lin_slope`" + shipped, grid.stem


def test_threads_are_documented_as_the_runs_own() -> None:
    readme = " ".join((REPO / "README.md").read_text().split())
    sentence = readme[readme.index("`--threads N`") :].partition(". ")[0]
    assert "OMP_NUM_THREADS" in sentence  # said where a reader of --threads looks


def _without_slurm() -> dict[str, str]:
    """PATH with every directory that holds ``sbatch`` or ``srun`` left out."""
    keep = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not any((Path(d) / exe).exists() for exe in ("sbatch", "srun"))
    ]
    return {"PATH": os.pathsep.join([str(Path(sys.executable).parent), *keep])}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The README's local ``decon submit ... --wait`` line, run as shown in a scratch dir:
    (that directory, the sweep root, its output)."""
    (line,) = [c for c in SWEEP if c.cmd == "submit" and c.doc == "README.md" and not needs(c)]
    cwd = tmp_path_factory.mktemp("readme_sweep")
    proc = run_cli(*line.args[1:], cwd=cwd, timeout=SWEEP_LIMIT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cwd, cwd / _option(line.args, "--root")[0], proc.stdout


_WORDS = {"six": 6, "seven": 7, "eight": 8, "nine": 9}


@pytest.mark.parametrize("shown", SWEEP, ids=[c.id for c in SWEEP])
def test_readme_sweep_command_runs_as_shown(
    shown: Shown, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    args, cmd, need = list(shown.args), shown.cmd, needs(shown)
    copies = _copied_profiles()  # the user's copy of a shipped profile reads as its source
    args = [copies.get(a, a) for a in args]
    if cmd == "submit" and need == "SLURM":  # a root in the scratch dir
        shown_root = _option(args, "--root")[0]
        root = tmp_path / "sweep" / Path(shown_root).name
        args = [str(root) if a == shown_root else a for a in args]
    if cmd == "submit" and "--dry-run" in args:
        proc = run_cli(*args[1:], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        runs = len(expand_grid(load_grid(_option(args, "--grid")[0])))
        assert re.search(rf"\b{runs}\b", proc.stdout), proc.stdout  # the plan's total
        if _option(args, "--grid") == ["loss_lin_slope"]:
            assert runs == 216 and "108" in proc.stdout  # runs, GPU jobs
        assert not any(tmp_path.iterdir())  # a dry run writes nothing
    elif cmd == "submit" and need == "SLURM":  # no SLURM here: a clear refusal
        proc = run_cli(*args[1:], cwd=tmp_path, env=_without_slurm())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("error:") and "hint:" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not any(tmp_path.iterdir())  # nothing written
    elif cmd == "submit":
        _, root, stdout = request.getfixturevalue("local_sweep")
        runs = read_json(root / "sweep.json")["runs"]
        lines = stdout.splitlines()
        assert f"all {len(runs)} runs ended: {len(runs)} completed" in lines  # a line of its own
        for rid in runs:  # not a terminal: a line as each run changes state, in one word
            changes = [ln.split(f" {rid}: ")[1].split()[0] for ln in lines if f" {rid}: " in ln]
            # in the order a run goes through them (a fast run may finish between two looks)
            order = [c for c in ("pending", "running", "completed") if c in changes]
            assert changes[-1] == "completed" and changes == order, (rid, stdout)
            assert "missing" not in changes
    elif cmd in ("monitor", "export", "report", "verify", "recover"):
        cwd, root, _ = request.getfixturevalue("local_sweep")
        if need == "SLURM":  # shown for a cluster sweep: read the local one
            shown_root = _option(args, "--root")[0]
            args = [str(root) if a == shown_root else a for a in args]
        proc = run_cli(*args[1:], cwd=cwd)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if cmd == "monitor":
            assert re.match(r"\w+: \d+ runs ", proc.stdout), proc.stdout
        elif cmd == "export":
            assert (cwd / args[2]).is_file()
        elif cmd == "report":
            out = cwd / _option(args, "--out")[0]
            assert (out / "report.html").is_file()
            _check_figure_count(out)
    elif cmd == "validate" and _has_container(args):  # checked on a login node, not here
        proc = run_cli(*args[1:], cwd=tmp_path)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert re.search(r"warn\s+container runtime: \S+ not found on PATH", proc.stdout)
        assert not re.search(r"pass\s+container", proc.stdout), proc.stdout
    else:  # validate: every variant trains a few steps here, memory against the profile
        proc = run_cli(*args[1:], cwd=tmp_path, timeout=SWEEP_LIMIT_S)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if "--json" in args:
            report = json.loads(proc.stdout)
            assert report["ok"] is True and report["checks"], report
        else:
            assert "PASS: 0 failed" in proc.stdout


def _check_figure_count(out: Path) -> None:
    """The pages' "N figures (M with lr-time fits)" is what the report draws."""
    pngs = sorted(out.glob("*.png"))
    with_lr = (out / "loss_curves_lr.png").is_file()
    for path in DOCUMENTS:
        text = " ".join(path.read_text().replace("#", " ").split())
        for plain, lr in re.findall(r"(\w+) figures \((\w+) with lr-time fits\)", text):
            expected = _WORDS[lr] if with_lr else _WORDS[plain]
            assert len(pngs) == expected, f"{path.name}: {plain} ({lr}); drawn: {pngs}"


def test_jq_example_finds_the_sweeps_status_files(local_sweep: tuple[Path, Path, str]) -> None:
    """docs/run-directory.md's ``jq ... runs/demo/runs/*/status.json`` (after ``make demo``)
    names files that are there: a sweep's runs are under ``ROOT/runs/``."""
    _, root, _ = local_sweep
    text = (REPO / "docs" / "run-directory.md").read_text()
    (pattern,) = re.findall(r"jq '\.timing\.analysis_overhead' (\S+)`", text)
    assert pattern.startswith("runs/demo/")  # the demo's root (Makefile DEMO_ROOT)
    found = sorted(root.glob(pattern.removeprefix("runs/demo/")))
    assert found, pattern
    assert all("analysis_overhead" in read_json(p)["timing"] for p in found)


@pytest.mark.parametrize("shown", TRAIN, ids=[c.id for c in TRAIN])
def test_readme_train_command_runs_as_shown(shown: Shown, tmp_path: Path) -> None:
    args = list(shown.args)
    if needs(shown) == "CIFAR":
        pytest.skip("trains on CIFAR: needs CIFAR on disk or a download (flags validated)")
    resume = _option(args, "--run-dir")
    if resume:  # resume the run the digits example made (the README writes <hash>)
        (digits,) = [c for c in TRAIN if "digits" in c.args]
        first = run_cli(*digits.args[1:], "--max-steps", "2", cwd=tmp_path)
        assert first.returncode == EXIT_STOPPED, first.stderr
        (run_dir,) = (tmp_path / "runs").iterdir()
        args = [a if a not in resume else str(run_dir) for a in args]
    limit = max(MIN_LIMIT_S, SLOWER_HERE * (stated_seconds(shown.note) or 0))
    proc = run_cli(*args[1:], cwd=tmp_path, timeout=limit)  # a slow example fails here
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed:" in proc.stdout and "error" not in proc.stderr
    if resume:  # it went on from the checkpoint, and said so
        assert "resumed at step 2 " in proc.stdout + proc.stderr
