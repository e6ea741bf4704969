from __future__ import annotations

from pathlib import Path

import pytest

from deconcnn_cli.config import (
    RunConfig,
    config_hash,
    load_run_config,
    parse_override,
    run_id,
    variant_names,
)
from deconcnn_cli.errors import ConfigError


def test_protocol_run_is_built_from_variant_and_flags():
    cfg = load_run_config(
        variant="base", flags={"optim": {"lr": 0.1, "weight_decay": 1e-3}, "seed": 0}
    )
    assert cfg.model.norm == "batchnorm" and cfg.model.width_mult == 1.0
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.seed) == (0.1, 1e-3, 0)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (50, 5.0)
    assert (cfg.data.dataset, cfg.data.batch_size, cfg.data.val_fraction) == ("cifar10", 128, 0.1)
    assert cfg.grad_clip_norm is None
    assert (cfg.cadence.val_per_epoch, cfg.cadence.curvature_every_steps) == (4, 500)
    assert cfg.cadence.noise_every_epochs == 2


def test_four_variants_differ_as_the_protocol_says():
    assert set(variant_names()) >= {"base", "bn_off", "narrow", "adamw"}
    bn_off = load_run_config(variant="bn_off")
    assert bn_off.model.norm == "none" and bn_off.grad_clip_norm == 1.0
    assert load_run_config(variant="narrow").model.width_mult == 0.5
    adamw = load_run_config(variant="adamw")
    assert adamw.optim.name == "adamw" and adamw.optim.betas == (0.9, 0.999)


def test_precedence_defaults_profile_set_flags():
    cfg = load_run_config(variant="base", profiles=["smoke"])
    assert cfg.schedule.epochs == 3  # profile beats variant
    cfg = load_run_config(variant="base", profiles=["smoke"], overrides=["schedule.epochs=7"])
    assert cfg.schedule.epochs == 7  # --set beats profile
    cfg = load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=["schedule.epochs=7"],
        flags={"schedule": {"epochs": 9}},
    )
    assert cfg.schedule.epochs == 9  # flags beat --set
    assert cfg.model.width_mult == 0.125  # untouched profile values survive the merge


def test_override_values_are_toml_typed():
    assert parse_override("optim.lr=0.05") == {"optim": {"lr": 0.05}}
    assert parse_override("analysis.alpha_early_epochs=[1, 2]") == {
        "analysis": {"alpha_early_epochs": [1, 2]}
    }
    assert parse_override("variant=foo") == {"variant": "foo"}
    with pytest.raises(ConfigError):
        parse_override("nokey")


def test_run_id_is_stable_and_tracks_result_affecting_fields():
    a = load_run_config(variant="base", flags={"seed": 1})
    b = load_run_config(variant="base", flags={"seed": 1})
    assert run_id(a) == run_id(b)
    assert run_id(a).startswith("base_lr0.1_wd0.001_s1_")
    c = load_run_config(variant="base", flags={"seed": 2})
    assert config_hash(a) != config_hash(c)
    # where the data lives, or the device, does not change the run's identity
    d = load_run_config(
        variant="base", flags={"seed": 1, "device": "cpu", "data": {"data_dir": "/x"}}
    )
    assert config_hash(a) == config_hash(d)
    e = load_run_config(variant="base", flags={"seed": 1, "optim": {"momentum": 0.8}})
    assert config_hash(a) != config_hash(e)


def test_bad_key_names_file_and_field(tmp_path: Path):
    prof = tmp_path / "bad.toml"
    prof.write_text("[model]\nwidht_mult = 2.0\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(variant="base", profiles=[str(prof)])
    assert str(prof) in err.value.message and "model.widht_mult" in err.value.message
    assert "width_mult" in err.value.hint  # the hint lists the valid keys


def test_bad_type_and_negative_lr(tmp_path: Path):
    prof = tmp_path / "t.toml"
    prof.write_text('[data]\nbatch_size = "big"\n')
    with pytest.raises(ConfigError) as err:
        load_run_config(variant="base", profiles=[str(prof)])
    assert "data.batch_size" in err.value.message and str(prof) in err.value.message
    with pytest.raises(ConfigError) as err:
        load_run_config(variant="base", flags={"optim": {"lr": -0.1}})
    assert "optim.lr" in err.value.message and "command-line flags" in err.value.message


def test_malformed_toml_and_missing_file(tmp_path: Path):
    prof = tmp_path / "m.toml"
    prof.write_text("[model\nwidth_mult = 1\n")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_run_config(variant="base", profiles=[str(prof)])
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(variant="base", profiles=[str(tmp_path / "nope.toml")])
    with pytest.raises(ConfigError, match="unknown variant"):
        load_run_config(variant="wide")


def test_warmup_longer_than_run_is_rejected():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_run_config(variant="base", flags={"schedule": {"epochs": 2}})


def test_defaults_are_valid():
    assert RunConfig().optim.lr > 0


def test_a_file_named_like_a_profile_in_the_current_folder_is_not_used(tmp_path, monkeypatch):
    """`smoke` is the shipped profile wherever the command runs; `./smoke.toml` or a path with
    a `/` is a file. (A bare name that existed in the folder used to win, silently changing
    the config and run id with the folder, or failing with 'profile file not found'.)"""
    from deconcnn_cli.config import resolve_profile
    from deconcnn_cli.sweep.profiles import resolve_named

    shipped = resolve_profile("smoke")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smoke").write_text("[model]\nwidth_mult = 3.0\n")
    (tmp_path / "base").mkdir()
    (tmp_path / "demo").write_text("not a grid")
    assert resolve_profile("smoke") == shipped
    assert resolve_profile("base", variant=True).name == "base.toml"
    assert resolve_profile("base", variant=True).parent.name == "variants"
    assert resolve_named("demo", "grid").parent.name == "grids"
    assert resolve_profile("./smoke") == Path("./smoke")
    assert resolve_profile("my.toml") == Path("my.toml")


def test_grid_axes_take_numbers_as_written_and_the_early_window_is_ordered(tmp_path):
    """`lr = ["0.1"]` or `seed = [true]` are refused (they were coerced into runs), and an
    early window [15, 5) is no window."""
    from deconcnn_cli.sweep.profiles import load_grid

    grid = tmp_path / "g.toml"
    grid.write_text(
        'name = "g"\nvariants = ["base"]\n[axes]\nlr = ["0.1"]\nweight_decay = [0.001]\n'
        "seed = [true]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_grid(str(grid))
    assert "axes.lr.0" in info.value.message and "axes.seed.0" in info.value.message
    grid.write_text(grid.read_text().replace('["0.1"]', "[1]").replace("[true]", "[0]"))
    assert load_grid(str(grid)).axes.lr == [1.0]  # an integer is a number
    with pytest.raises(ConfigError, match="alpha_early_epochs"):
        load_run_config(variant="base", overrides=["analysis.alpha_early_epochs=[15, 5]"])
