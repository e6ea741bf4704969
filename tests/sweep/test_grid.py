"""Grids and resource profiles: expansion, ids, hash, errors naming file and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deconcnn_cli.config import run_id
from deconcnn_cli.errors import ConfigError
from deconcnn_cli.sweep.grid import expand_grid, expand_grid_runs, grid_hash
from deconcnn_cli.sweep.profiles import load_grid, load_resources


def test_demo_grid_is_every_variant_on_offline_data_with_a_sane_adamw_lr():
    runs = expand_grid_runs(load_grid("demo"))
    assert sorted((r.variant, r.seed) for r in runs) == sorted(
        (v, s) for v in ("base", "bn_off", "narrow", "adamw") for s in (0, 1)
    )
    assert {r.config.data.dataset for r in runs} == {"digits"}
    assert {r.lr for r in runs if r.variant == "adamw"} == {0.003}
    assert {r.lr for r in runs if r.variant != "adamw"} == {0.1}
    assert all(r.config.schedule.epochs == 6 for r in runs)
    width = {r.variant: r.config.model.width_mult for r in runs}
    assert width["narrow"] == width["base"] / 2  # narrow stays narrower than base


def test_loss_lin_slope_is_the_216_runs_of_the_protocol():
    runs = expand_grid_runs(load_grid("loss_lin_slope"))
    assert len(runs) == 216
    assert len({r.run_id for r in runs}) == 216
    by_variant: dict[str, int] = {}
    for r in runs:
        by_variant[r.variant] = by_variant.get(r.variant, 0) + 1
        cfg = r.config
        assert run_id(cfg) == r.run_id
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.seed) == (r.lr, r.weight_decay, r.seed)
        assert cfg.schedule.epochs == 50 and cfg.data.batch_size == 128
    assert by_variant == {"base": 54, "bn_off": 54, "narrow": 54, "adamw": 54}
    assert {r.lr for r in runs} == {0.05, 0.1, 0.2}
    assert {r.weight_decay for r in runs} == {1e-4, 1e-3, 1e-2}
    assert {r.seed for r in runs} == set(range(6))
    adamw = next(r.config for r in runs if r.variant == "adamw")
    bn_off = next(r.config for r in runs if r.variant == "bn_off")
    assert adamw.optim.name == "adamw" and bn_off.model.norm == "none"
    assert bn_off.grad_clip_norm == 1.0


def test_smoke_grid_is_tiny_cpu_runs_on_digits():
    cfgs = expand_grid(load_grid("smoke"))
    assert len(cfgs) == 4
    for cfg in cfgs:
        assert cfg.data.dataset == "digits" and cfg.data.image_size == 8
        assert cfg.schedule.epochs == 2 and cfg.model.width_mult == 0.125


def _write(tmp_path: Path, text: str, name: str = "g.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GRID = """
name = "t"
variants = ["base", "adamw"]
profiles = ["smoke"]
[axes]
lr = [0.1, 0.2]
weight_decay = [1e-3]
seed = [0, 1]
"""


def test_per_variant_axes_replace_the_common_ones(tmp_path):
    path = _write(tmp_path, GRID + "[variant_axes.adamw]\nlr = [1e-3]\n")
    runs = expand_grid_runs(load_grid(str(path)))
    assert sorted((r.variant, r.lr) for r in runs) == [
        ("adamw", 1e-3),
        ("adamw", 1e-3),
        ("base", 0.1),
        ("base", 0.1),
        ("base", 0.2),
        ("base", 0.2),
    ]


def test_variant_overrides_apply_to_their_variant_only(tmp_path):
    text = (
        GRID
        + "[overrides.model]\nwidth_mult = 0.25\n"
        + "[variant_overrides.adamw.model]\nwidth_mult = 0.125\n"
    )
    runs = expand_grid_runs(load_grid(str(_write(tmp_path, text))))
    assert {(r.variant, r.config.model.width_mult) for r in runs} == {
        ("base", 0.25),
        ("adamw", 0.125),
    }


def test_grid_hash_tracks_results_not_locations(tmp_path):
    spec = load_grid(str(_write(tmp_path, GRID)))
    h = grid_hash(expand_grid(spec))
    assert len(h) == 16 and h == grid_hash(expand_grid_runs(spec))
    moved = spec.model_copy(update={"overrides": {"data": {"data_dir": "/elsewhere"}}})
    assert grid_hash(expand_grid(moved)) == h  # data_dir is not part of any run's identity
    longer = spec.model_copy(update={"overrides": {"schedule": {"epochs": 4}}})
    assert grid_hash(expand_grid(longer)) != h


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GRID + "bogus = 1\n", "bogus"),
        (GRID.replace("lr = [0.1, 0.2]", "lr = [-0.1]"), "axes.lr.0"),
        (GRID + "[variant_axes.narrow]\nlr = [0.1]\n", "narrow"),
        (GRID + "[variant_overrides.narrow.model]\nwidth_mult = 0.5\n", "narrow"),
        (GRID + "[variant_overrides.base.model]\nwidth = 0.5\n", "model.width"),
        (GRID + "[overrides.optim]\nnope = 1\n", "optim.nope"),
        (GRID.replace('variants = ["base", "adamw"]', 'variants = ["nosuch"]'), "nosuch"),
    ],
)
def test_bad_grids_name_file_and_field(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        expand_grid(load_grid(str(path)))
    assert needle in info.value.message + (info.value.hint or "")


def test_unknown_grid_and_malformed_toml(tmp_path):
    with pytest.raises(ConfigError, match="unknown grid 'nope'") as info:
        load_grid("nope")
    assert "loss_lin_slope" in info.value.hint and "smoke" in info.value.hint
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_grid(str(_write(tmp_path, "name = [")))


def test_resource_profiles_load_and_check_memory(tmp_path):
    rtx = load_resources("rtx8000")
    assert rtx.executor == "slurm" and rtx.runs_per_gpu == 2 and rtx.gpu_memory_gb == 48.0
    assert set(rtx.gpu_memory_gb_per_run) == {"base", "bn_off", "narrow", "adamw"}
    local = load_resources("local")
    assert local.executor == "local" and local.parallel_runs == 2
    bad = _write(
        tmp_path,
        'executor = "slurm"\ngpu_memory_gb = 10\n[gpu_memory_gb_per_run]\nbase = 6\n',
        "r.toml",
    )
    with pytest.raises(ConfigError, match="gpu_memory_gb_per_run.base") as info:
        load_resources(str(bad))
    assert str(bad) in info.value.message
    with pytest.raises(ConfigError, match="unknown resource profile 'gpu9'") as info:
        load_resources("gpu9")
    assert "rtx8000" in info.value.hint


def test_grid_module_imports_no_torch():
    code = (
        "import sys; import deconcnn_cli.sweep.grid, deconcnn_cli.sweep.store; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _huge_grid(tmp_path: Path) -> Path:
    """The issue's 5.5 KB grid: 200 lr x 200 weight decay x 250 seeds = 10^7 runs."""
    lr = ", ".join(f"{0.001 * (i + 1):g}" for i in range(200))
    wd = ", ".join(f"{1e-6 * (i + 1):g}" for i in range(200))
    seeds = ", ".join(str(i) for i in range(250))
    path = tmp_path / "huge.toml"
    path.write_text(
        f'name = "huge"\nvariants = ["base", "adamw"]\n[axes]\nlr = [{lr}]\n'
        f"weight_decay = [{wd}]\nseed = [{seeds}]\n[variant_axes.adamw]\nseed = [0]\n"
    )
    return path


def test_a_huge_grid_is_counted_not_expanded(tmp_path):
    import time

    from deconcnn_cli.sweep.grid import MAX_GRID_RUNS, count_grid_runs

    spec = load_grid(str(_huge_grid(tmp_path)))
    assert count_grid_runs(spec) == {"base": (200, 200, 250), "adamw": (200, 200, 1)}
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        expand_grid_runs(spec)
    assert time.perf_counter() - start < 1.0
    msg = err.value.message
    assert f"10,040,000 runs, over the limit of {MAX_GRID_RUNS:,}" in msg
    assert "base: lr 200 x weight_decay 200 x seed 250 = 10,000,000" in msg
    assert "adamw: lr 200 x weight_decay 200 x seed 1 = 40,000" in msg


def test_submit_refuses_a_huge_grid_with_error_and_exit_2(tmp_path):
    from typer.testing import CliRunner

    from deconcnn_cli.cli import app

    args = ["submit", "--grid", str(_huge_grid(tmp_path)), "--executor", "local"]
    result = CliRunner().invoke(app, [*args, "--root", str(tmp_path / "s"), "--dry-run"])
    assert result.exit_code == 2 and "error: grid huge has 10,040,000 runs" in result.output
    assert not (tmp_path / "s").exists()
