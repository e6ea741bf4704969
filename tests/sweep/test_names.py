"""Issue 14, item 6: names read from files are checked against their patterns before they
become paths (docs/sweep-root.md, "Names"); the error names the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deconcnn_cli.cli import app
from deconcnn_cli.errors import ConfigError
from deconcnn_cli.sweep.manifest import manifest_name_problem
from deconcnn_cli.sweep.profiles import load_grid, load_resources
from tests.export.synthetic import write_manifest, write_run

RUNS = {"done": {"variant": "base", "lr": 0.1, "weight_decay": 1e-3, "seed": 0}}


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return result.exit_code, result.output


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "t1" / "out" / "deep" / "sweep"
    write_manifest(root, RUNS)
    write_run(root, "done", steps=40, steps_per_epoch=10, summary={}, curvature_every=10)
    return root


def _edit(root: Path, edit) -> None:
    manifest = json.loads((root / "sweep.json").read_text())
    edit(manifest)
    (root / "sweep.json").write_text(json.dumps(manifest))


def test_a_run_id_that_climbs_out_is_refused_by_export(root: Path) -> None:
    victim = root.parent.parent.parent / "victim_src"  # what "../../victim_src" reached
    _edit(root, lambda m: m["runs"].update({"../../victim_src": m["runs"].pop("done")}))
    code, out = invoke("export", root.parent / "r.csv", "--root", root)
    assert code == 2 and f"error: {root / 'sweep.json'}: run id '../../victim_src'" in out
    assert not victim.exists() and not (root.parent / "r.csv").exists()


@pytest.mark.parametrize("command", [["monitor"], ["verify"], ["recover", "--dry-run"]])
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(grid="../x"),
        lambda m: m["submissions"][0]["jobs"][0].update(job_id="../../etc/x"),
        lambda m: m["submissions"][0]["jobs"][0].update(run_ids=["a/b"]),
        lambda m: m["submissions"][0].update(resources="local\nrm -rf ~"),
        lambda m: m["runs"].update({".hidden": {}}),
    ],
    ids=["grid", "job_id", "job_run_id", "resources", "dot_run_id"],
)
def test_bad_names_in_sweep_json_are_refused(root: Path, command: list[str], edit) -> None:
    _edit(root, edit)
    code, out = invoke(*command, "--root", root)
    assert code == 2 and f"error: {root / 'sweep.json'}:" in out and "does not match" in out


def test_a_resources_path_is_allowed(root: Path) -> None:
    _edit(root, lambda m: m["submissions"][0].update(resources="/opt/profiles/my gpu.toml"))
    assert manifest_name_problem(json.loads((root / "sweep.json").read_text())) is None


def test_grid_and_resource_names_in_toml_files(tmp_path: Path) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text('name = ".."\nvariants = ["base"]\n[axes]\nlr=[0.1]\nweight_decay=[0.0]\n'
                    "seed=[0]\n")  # fmt: skip
    with pytest.raises(ConfigError, match=rf"{grid}: name"):
        load_grid(str(grid))
    res = tmp_path / "r.toml"
    res.write_text('name = "a b"\nexecutor = "local"\n')
    with pytest.raises(ConfigError, match=rf"{res}: name"):
        load_resources(str(res))
