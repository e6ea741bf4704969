"""One meaning of ``--root`` across the sweep commands, and a message that says which folder
was given when it is not a sweep root (one that does not exist, one inside a sweep, a folder
of ``decon train`` runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from deconcnn_cli.cli import app
from tests.sweep.synthetic import write_sweep

READERS = ["monitor", "recover", "verify", "export", "report"]
COMMAND = typer.main.get_command(app)


def _root_param(name: str):
    (param,) = [p for p in COMMAND.commands[name].params if p.name == "root"]  # type: ignore[attr-defined]
    return param


def test_every_sweep_reader_defaults_to_the_current_folder_and_says_what_it_takes() -> None:
    for name in READERS:
        param = _root_param(name)
        assert Path(param.default) == Path("."), name
        assert "decon submit" in param.help and "decon train" in param.help, name
    assert "not a sweep root" in _root_param("train").help


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootopt") / "sweeps" / "lls"
    write_sweep(root, 8)
    return root


def _error(args: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(cwd)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    return " ".join(res.stderr.split())


@pytest.mark.parametrize("cmd", READERS)
def test_a_folder_that_does_not_exist(cmd: str, sweep: Path, monkeypatch) -> None:
    err = _error([cmd, "--root", "nope"], sweep.parent.parent, monkeypatch)
    assert "sweep root nope does not exist" in err
    assert "sweeps/lls" in err  # the sweep roots found here are suggested


@pytest.mark.parametrize("cmd", READERS)
def test_the_runs_folder_inside_a_sweep_is_one_level_too_deep(
    cmd: str, sweep: Path, monkeypatch
) -> None:
    err = _error([cmd, "--root", "sweeps/lls/runs"], sweep.parent.parent, monkeypatch)
    assert "inside the sweep root sweeps/lls (one level too deep)" in err
    assert "give --root sweeps/lls" in err


@pytest.mark.parametrize("cmd", READERS)
def test_a_folder_of_train_runs_is_named_as_such(cmd: str, tmp_path: Path, monkeypatch) -> None:
    for rid in ("base_a", "base_b"):
        (tmp_path / "runs" / rid).mkdir(parents=True)
        (tmp_path / "runs" / rid / "config.json").write_text("{}")
    err = _error([cmd, "--root", "runs"], tmp_path, monkeypatch)
    assert "runs is a folder of 2 `decon train` run directories, not a sweep root" in err
    assert "decon submit" in err
