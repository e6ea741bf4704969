"""Bad input: `error: ...` naming file and field, a hint, exit 2, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from deconcnn_cli.cli import app
from tests.conftest import run_cli


def _assert_clean_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and "hint: " in err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


@pytest.mark.parametrize(
    ("profile_text", "needles"),
    [
        ("[model]\nwidht_mult = 2.0\n", ["model.widht_mult", "valid keys"]),
        ('[optim]\nlr = "fast"\n', ["optim.lr"]),
        ("[optim]\nlr = -0.1\n", ["optim.lr", "greater than 0"]),
        ("[model\n", ["malformed TOML"]),
    ],
)
def test_bad_profile(tmp_path: Path, profile_text: str, needles: list[str]):
    prof = tmp_path / "p.toml"
    prof.write_text(profile_text)
    root = tmp_path / "runs"
    proc = run_cli("train", "-v", "base", "-p", str(prof), "--root", str(root))
    _assert_clean_error(proc.returncode, proc.stderr, str(prof), *needles)
    assert not root.exists()  # nothing written


def test_negative_lr_flag_missing_file_unknown_variant(tmp_path: Path):
    runner = CliRunner()
    root = tmp_path / "runs"
    res = runner.invoke(app, ["train", "-v", "base", "--lr", "-1", "--root", str(root)])
    _assert_clean_error(res.exit_code, res.stderr, "optim.lr", "command-line flags")
    res = runner.invoke(app, ["train", "-p", str(tmp_path / "nope.toml"), "--root", str(root)])
    _assert_clean_error(res.exit_code, res.stderr, "nope.toml", "not found")
    res = runner.invoke(app, ["train", "-v", "wide", "--root", str(root)])
    _assert_clean_error(res.exit_code, res.stderr, "unknown variant", "bn_off")
    res = runner.invoke(app, ["train", "--set", "optim.lr", "--root", str(root)])
    _assert_clean_error(res.exit_code, res.stderr, "bad override")
    assert not root.exists()


def test_missing_cifar_data_is_a_clean_error(tmp_path: Path):
    root = tmp_path / "runs"
    res = CliRunner().invoke(
        app, ["train", "-v", "base", "--data-dir", str(tmp_path / "nodata"), "--root", str(root)]
    )
    _assert_clean_error(res.exit_code, res.stderr, "nodata", "--download")


def test_run_dir_without_config(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["train", "--run-dir", str(tmp_path / "empty")])
    _assert_clean_error(res.exit_code, res.stderr, "config.json")


def test_help_everywhere():
    runner = CliRunner()
    assert "train" in runner.invoke(app, ["--help"]).stdout
    out = runner.invoke(app, ["train", "--help"]).stdout
    assert "--variant" in out and "--set" in out


def test_fp16_without_cuda_is_refused_before_writing(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is valid here")
    root = tmp_path / "runs"
    res = CliRunner().invoke(
        app, ["train", "-v", "base", "-p", "smoke", "--precision", "fp16", "--root", str(root)]
    )
    _assert_clean_error(res.exit_code, res.stderr, "fp16")
    assert not root.exists()


def test_changing_a_runs_config_on_resume_is_refused_and_loses_nothing(tmp_path: Path):
    from tests.conftest import TINY

    root = tmp_path / "runs"
    first = run_cli("train", "-v", "base", *TINY, "--root", str(root), "--max-steps", "2")
    assert first.returncode == 3, first.stderr
    (run,) = list(root.iterdir())
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = run_cli("train", "--run-dir", str(run), "--lr", "0.2", "-q")
    _assert_clean_error(res.returncode, res.stderr, "different run", "optim.lr")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _completed_run(tmp_path: Path) -> Path:
    """A run directory whose status says completed (its config as `decon train` wrote it)."""
    from deconcnn_cli.config import load_run_config, run_id
    from deconcnn_cli.contract import STATUS_FILE
    from deconcnn_cli.fileio import atomic_write_json
    from deconcnn_cli.training.rundir import prepare_run_dir

    cfg = load_run_config(variant="base", profiles=["smoke"], overrides=None, flags={})
    run = tmp_path / "runs" / run_id(cfg)
    prepare_run_dir(cfg, run)
    atomic_write_json(run / STATUS_FILE, {"state": "completed", "step": 39})
    return run


def test_run_dir_flags_that_change_the_run_are_refused_by_name(tmp_path: Path):
    run = _completed_run(tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--run-dir", str(run), "--lr", "0.5", "--device", "cpu"])
    _assert_clean_error(res.exit_code, res.stderr, "different run: --lr change optim.lr\n")
    res = runner.invoke(app, ["train", "--run-dir", str(run), "--set", "optim.lr=0.5"])
    _assert_clean_error(res.exit_code, res.stderr, "--set optim.lr=0.5 change optim.lr")
    res = runner.invoke(app, ["train", "--run-dir", str(run), "--variant", "adamw"])
    _assert_clean_error(res.exit_code, res.stderr, "--variant would describe another run")
    assert "cifar10" not in res.stderr  # the cause, not a consequence of it
    # flags that re-state the run, or change nothing it computes, still resume it
    res = runner.invoke(app, ["train", "--run-dir", str(run), "--lr", "0.1", "--device", "cpu"])
    assert res.exit_code == 0 and "already completed" in res.stdout, res.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_run_dir_that_does_not_exist_is_named(tmp_path: Path):
    res = CliRunner().invoke(app, ["train", "--run-dir", str(tmp_path / "runs" / "nope")])
    _assert_clean_error(res.exit_code, res.stderr, "nope does not exist")
    assert not (tmp_path / "runs").exists()
