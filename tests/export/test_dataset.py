"""decon export: rows, dtypes, float text, metadata, time series, schema errors, CLI."""

from __future__ import annotations

import csv
import json
import math
import random
import re
import sys
from pathlib import Path

import pytest

from deconcnn_cli import contract, streambound
from deconcnn_cli.export.columns import COLUMN_NAMES, COLUMNS, SchemaError
from deconcnn_cli.export.files import ExportError, format_float, read_results
from deconcnn_cli.export.outputs import export
from tests.conftest import REPO, run_cli
from tests.export.conftest import RUNS
from tests.export.synthetic import real_run_id, write_manifest, write_run


@pytest.fixture(scope="module")
def exported(sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "results.csv"
    export(sweep, out)
    return out


def _cells(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["run_id"]: row for row in csv.DictReader(f)}


def test_one_row_per_manifest_run_with_its_status(exported: Path):
    cells = _cells(exported)
    assert list(cells) == list(RUNS)
    assert {k: v["status"] for k, v in cells.items()} == {
        "done": "completed",
        "blown": "diverged",
        "broken": "failed",
        "absent": "missing",
    }
    with open(exported) as f:
        assert next(csv.reader(f)) == list(COLUMN_NAMES)


def test_values_come_from_the_run_and_undefined_cells_are_empty(sweep: Path, exported: Path):
    cells = _cells(exported)
    summary = contract.read_summary(sweep / "runs" / "done")
    assert summary is not None
    done = cells["done"]
    for col, key in (("alpha_early", "alpha_early"), ("r_squared", "power_law_r2")):
        assert float(done[col]) == summary[key]  # exact, not approximately
    assert float(done["best_val_ce"]) == summary["best_val_ce"]
    assert done["failure_reason"] == ""
    assert done["checkpoint_path"].startswith("runs/done/checkpoints/ckpt_")
    # the diverged run keeps its partial metrics and its cause; its fits are not defined
    blown = cells["blown"]
    assert blown["alpha_early"] == ""
    # its validations ran on a blown-up model: computed, non-finite -> nan (not "not defined")
    blown_summary = contract.read_summary(sweep / "runs" / "blown")
    assert blown_summary is not None and math.isnan(blown_summary["best_val_ce"])
    assert blown["best_val_ce"] == "nan"
    assert blown["final_loss_train_nats"] == "nan"  # the non-finite loss that ended it
    assert float(blown["lambda_max_last"]) == float(
        contract.read_stream(contract.stream_path(sweep / "runs" / "blown", "curvature"))[-1][
            "lambda_max"
        ]
    )
    assert "non-finite" in blown["failure_reason"]
    broken = cells["broken"]
    assert broken["exception_type"] == "RuntimeError"
    assert broken["host"] == "node01" and broken["job_ids"] == "77_1"
    assert broken["r_squared"] == "0.99"  # no summary: last defined shape.csv value
    # a missing run: axes from the manifest, everything else empty
    absent = cells["absent"]
    assert absent["variant"] == "narrow" and absent["seed"] == "3" and absent["lr"] == "0.2"
    empties = [c for c in COLUMN_NAMES if absent[c] == ""]
    assert set(empties) == set(COLUMN_NAMES) - {
        "run_id",
        "variant",
        "seed",
        "lr",
        "weight_decay",
        "status",
        "submitted_job_ids",
        "code_version",
    }


def test_code_version_is_what_ran_else_what_was_submitted(exported: Path, sweep: Path):
    cells = {r["run_id"]: r for r in csv.DictReader(exported.open())}
    ran = {a["code_version"] for a in contract.read_attempt_starts(sweep / "runs" / "done")}
    assert cells["done"]["code_version"] == ran.pop() and not ran  # the real run's attempts
    assert cells["absent"]["code_version"] == "0.1.0+gtest"  # never ran: the submission's


def test_dtypes_read_back(exported: Path):
    df = read_results(str(exported))  # a str path as well as a Path
    for col in COLUMNS:
        expected = {"int": "int64", "Int64": "Int64", "float": "float64", "string": "string"}
        assert str(df[col.name].dtype) == expected[col.dtype], col.name
    assert df["steps_done"].dtype == "Int64" and df["steps_done"].isna().sum() == 1  # absent
    assert df["seed"].tolist() == [0, 1, 2, 3]
    assert df["weight_decay"].tolist() == [1e-3, 1e-7, 1e-5, 1e-2]


def test_a_plain_reader_gets_the_declared_dtypes(exported: Path):
    """pandas.read_csv with no help: float columns float64 (even whole values), integer
    columns int64, or float64 only where a nullable count has an empty cell."""
    import pandas as pd

    meta = json.loads((exported.parent / "results_metadata.json").read_text())
    plain = pd.read_csv(exported)
    for col in meta["columns"]:
        got, kind = str(plain[col["name"]].dtype), col["dtype"]
        has_empty = bool(plain[col["name"]].isna().any())
        if kind == "float":
            assert got == "float64", col["name"]
        elif kind in ("int", "Int64"):
            assert got == ("float64" if has_empty else "int64"), col["name"]
            assert kind == "Int64" or not has_empty, col["name"]
    cells = _cells(exported)
    assert "." in cells["done"]["best_val_epoch"]  # whole epoch, still a float's text
    assert cells["done"]["steps_done"].isdigit() and cells["done"]["attempts"] == "1"


def test_small_floats_are_written_positionally_and_read_back_exactly(exported: Path):
    cells = _cells(exported)
    assert cells["blown"]["weight_decay"] == "0.0000001"  # %.6f would have written 0.000000
    assert cells["broken"]["weight_decay"] == "0.00001"
    assert cells["blown"]["lr"] == "10000.0"  # whole, with its point: a float to any reader
    assert format_float(6.0) == "6.0" and format_float(0.1) == "0.1"
    assert format_float(None) == "" and format_float(math.nan) == "nan"
    assert format_float(-math.inf) == "-inf"
    rng = random.Random(0)
    values = [rng.uniform(-1, 1) * 10 ** rng.randint(-12, 8) for _ in range(2000)]
    values += [0.1, 1 / 3, 2.0**-30, 5e-8, 123456789.125, 0.0, -0.0]
    for v in values:
        text = format_float(v)
        assert "e" not in text and float(text) == v, (v, text)


def test_metadata(sweep: Path, exported: Path):
    meta = json.loads((exported.parent / "results_metadata.json").read_text())
    assert meta["total_runs"] == 4
    assert meta["counts_by_status"] == {"completed": 1, "diverged": 1, "failed": 1, "missing": 1}
    assert meta["grid"] == "test" and meta["grid_hash"] == "0123456789abcdef"
    assert meta["source_root"] == str(sweep.resolve())
    assert meta["schema_version"] == 2 and meta["package_version"]
    assert [c["name"] for c in meta["columns"]] == list(COLUMN_NAMES)
    assert {c["name"]: c["dtype"] for c in meta["columns"]}["seed"] == "int"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["export_time_utc"])


def test_metadata_states_the_analysis_settings_the_runs_used(exported: Path):
    """The smoke profile's windows ([1, 3) epochs, burn-in at 2 nats), not the defaults'."""
    meta = json.loads((exported.parent / "results_metadata.json").read_text())
    (group,) = [g for g in meta["analysis_settings"] if g["id"] is not None]
    assert group["runs"] == 3  # done, blown (recorded), broken (its config.json); absent: none
    assert group["settings"]["alpha_early_epochs"] == [1.0, 3.0]
    assert group["settings"]["burn_in_ce_nats"] == 2.0
    assert group["settings"]["burn_in_smooth_window_steps"] == 3  # 13 steps per epoch
    assert {"id": None, "runs": 1, "settings": None} in meta["analysis_settings"]
    described = {c["name"]: c["description"] for c in meta["columns"]}
    assert "over epochs [1, 3) (20 log-uniform bins)" in described["alpha_early"]
    assert "(3-step centred window) <= 2 nats" in described["burn_in_step"]
    assert "[5, 15)" not in json.dumps(meta["columns"])
    cells = _cells(exported)
    assert {cells[r]["analysis_settings"] for r in ("done", "blown", "broken")} == {group["id"]}
    assert cells["absent"]["analysis_settings"] == ""
    assert not any("analysis settings" in w for w in meta["warnings"])


def test_runs_with_different_analysis_settings_are_flagged_and_never_pooled(tmp_path: Path):
    from deconcnn_cli.analysis.settings import analysis_settings
    from deconcnn_cli.export.report import build_report

    root = tmp_path / "sweep"
    ids = [real_run_id(steps=200, curvature_every=50, seed=i) for i in range(10)]
    runs = {ids[i]: {"variant": "base", "lr": 0.1, "weight_decay": 1e-3, "seed": i}
            for i in range(10)}  # fmt: skip
    write_manifest(root, runs)
    early = analysis_settings([5, 15], 1.0, 20)
    late = analysis_settings([1, 4], 2.0, 20)
    rng = random.Random(0)
    for i in range(10):
        chosen = early if i < 6 else late
        alpha = 0.3 + 0.05 * i
        summary = {"alpha_early": alpha, "power_law_r2": 0.99, "analysis_settings": chosen,
                   "best_val_ce": 2.0 - alpha + 0.01 * rng.random()}  # fmt: skip
        write_run(root, ids[i], steps=200, summary=summary, curvature_every=50, seed=i)
    data, meta = export(root, tmp_path / "r.csv", verify=None)
    ids = {g["id"]: g["runs"] for g in meta["analysis_settings"]}
    assert sorted(ids.values()) == [4, 6] and None not in ids
    (warning,) = [w for w in meta["warnings"] if "different analysis settings" in w]
    assert "never pooled" in warning
    described = {c["name"]: c["description"] for c in meta["columns"]}
    assert "differs between runs: see analysis_settings" in described["alpha_early"]
    assert len({c["analysis_settings"] for c in _cells(tmp_path / "r.csv").values()}) == 2
    report = build_report(root, tmp_path / "report")
    for rows in (report.h1, report.h2):
        assert {r.analysis_settings for r in rows} == set(ids)  # one "all" row per settings
        assert sorted(r.n_runs for r in rows if r.group == "all") == [4, 6]  # never 10
    page = report.html.read_text()
    assert "The runs used different analysis settings" in page
    for sid in ids:
        assert f"[{sid}]" in page
    proc = run_cli("report", "--root", str(root), "--out", str(tmp_path / "rep2"))
    assert proc.returncode == 0 and "different analysis settings" in proc.stderr
    assert proc.stdout.count("H2 (step time, analysis settings ") == 2


def test_time_series_round_trip_csv(sweep: Path, exported: Path):
    ts = exported.parent / "results_timeseries"
    names = sorted(p.name for p in ts.iterdir())
    assert names == [".decon_export.json", "blown", "broken", "done"]  # not `absent`
    for run_id in ("done", "blown"):
        for name in contract.STREAMS:
            original = contract.read_stream(contract.stream_path(sweep / "runs" / run_id, name))
            copied = contract.read_stream(ts / run_id / f"{name}.csv")
            src_exists = contract.stream_path(sweep / "runs" / run_id, name).is_file()
            assert (ts / run_id / f"{name}.csv").is_file() == src_exists
            assert copied == original, (run_id, name)
            assert run_id == "blown" or len(copied) > 0  # the diverged run stopped at step 7


def test_time_series_and_table_round_trip_parquet(sweep: Path, tmp_path: Path):
    pytest.importorskip("pyarrow")  # the [parquet] extra; part of [dev]
    import pandas as pd

    out = tmp_path / "results.parquet"
    export(sweep, out, fmt="parquet")
    df = read_results(out)
    assert df["run_id"].tolist() == list(RUNS) and str(df["seed"].dtype) == "int64"
    assert df["weight_decay"].tolist() == [1e-3, 1e-7, 1e-5, 1e-2]
    step = pd.read_parquet(tmp_path / "results_timeseries" / "done" / "step.parquet")
    rows = contract.read_stream(contract.stream_path(sweep / "runs" / "done", "step"))
    assert step["step"].tolist() == [int(r["step"]) for r in rows]
    assert step["loss_train_nats"].tolist() == [float(r["loss_train_nats"]) for r in rows]
    # "" (not defined) is null and "nan" (could not be computed) is NaN: both kept apart
    import pyarrow.parquet as pq

    shape = pq.read_table(tmp_path / "results_timeseries" / "done" / "shape.parquet")
    src = contract.read_stream(contract.stream_path(sweep / "runs" / "done", "shape"))
    col = shape.column("alpha_early").to_pylist()
    for cell, value in zip([r["alpha_early"] for r in src], col, strict=True):
        if cell == "":
            assert value is None
        elif cell == "nan":
            assert value is not None and math.isnan(value)
        else:
            assert value == float(cell)


def test_missing_pyarrow_is_a_clear_error(sweep: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ExportError, match="pyarrow") as info:
        export(sweep, tmp_path / "r.parquet", fmt="parquet")
    assert "[parquet]'" in (info.value.hint or "")  # the install command (tests/test_install.py)
    assert not (tmp_path / "r.parquet").exists()


def test_schema_check_names_the_missing_columns(exported: Path, tmp_path: Path):
    with open(exported) as f:
        rows = list(csv.reader(f))
    keep = [i for i, name in enumerate(rows[0]) if name not in ("status", "r_squared")]
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(",".join(r[i] for i in keep) for r in rows) + "\n")
    with pytest.raises(SchemaError, match=r"^Missing required columns: status, r_squared"):
        read_results(bad)


def test_refuses_to_overwrite_without_force(sweep: Path, exported: Path):
    before = exported.read_bytes()
    exported.write_bytes(before + b"marker\n")
    with pytest.raises(ExportError, match="would overwrite"):
        export(sweep, exported)
    assert exported.read_bytes().endswith(b"marker\n")  # untouched
    export(sweep, exported, force=True)
    assert exported.read_bytes() == before


def test_bad_root_and_cli_render_error_without_traceback(tmp_path: Path):
    (tmp_path / "runs").mkdir()
    with pytest.raises(ExportError, match="sweep.json"):
        export(tmp_path, tmp_path / "r.csv")
    proc = run_cli("export", str(tmp_path / "r.csv"), "--root", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "hint: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.csv").exists()


def test_cli_prints_where_it_wrote(sweep: Path, tmp_path: Path):
    out = tmp_path / "res.csv"
    proc = run_cli("export", str(out), "--root", str(sweep), "--no-timeseries")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and str(tmp_path / "res_metadata.json") in proc.stdout
    assert "1 completed, 1 diverged, 1 failed, 1 missing" in proc.stdout
    assert out.is_file() and not (tmp_path / "res_timeseries").exists()


def test_data_dictionary_documents_every_column():
    text = (REPO / "docs" / "data-dictionary.md").read_text()
    documented = re.findall(r"^\| `([a-z_0-9]+)` \|", text, flags=re.M)
    assert documented == list(COLUMN_NAMES)


def test_runs_failing_verification_are_exported_with_a_warning(tmp_path: Path):
    root = tmp_path / "sweep"
    spec = {"variant": "base", "lr": 0.1, "weight_decay": 1e-3}
    shape = {"steps": 200, "steps_per_epoch": 20, "curvature_every": 50}
    good, bad_id = real_run_id(**shape, seed=0), real_run_id(**shape, seed=1)
    write_manifest(root, {good: {**spec, "seed": 0}, bad_id: {**spec, "seed": 1}})
    write_run(root, good, **shape, seed=0, summary={})
    bad = write_run(root, bad_id, **shape, seed=1, summary={})
    (bad / "checkpoints" / "ckpt_000000200.pt").write_bytes(b"tampered")
    data, meta = export(root, tmp_path / "r.csv")
    cells = _cells(tmp_path / "r.csv")
    cells["good"], cells["bad"] = cells.pop(good), cells.pop(bad_id)
    assert cells["good"]["verify_problem"] == "" and cells["good"]["status"] == "completed"
    assert cells["bad"]["status"] == "completed"  # kept, with its status
    assert cells["bad"]["verify_problem"].startswith("checksum: checkpoints/ckpt_000000200.pt")
    assert meta["warnings"] == [f"{bad_id} fails verification: {cells['bad']['verify_problem']}"]
    proc = run_cli("export", str(tmp_path / "r2.csv"), "--root", str(root), "--no-timeseries")
    assert proc.returncode == 0 and f"warning: {bad_id} fails verification" in proc.stderr
    export(root, tmp_path / "r3.csv", verify=None)  # --no-verify
    assert _cells(tmp_path / "r3.csv")[bad_id]["verify_problem"] == ""


def test_format_must_match_the_file_name_and_a_bad_root_is_named_first(
    sweep: Path, exported: Path, tmp_path: Path
):
    with pytest.raises(ExportError, match="does not end in .parquet"):
        export(sweep, tmp_path / "r.csv", fmt="parquet")
    with pytest.raises(ExportError, match="unknown format"):
        export(sweep, tmp_path / "r.csv", fmt="xlsx")
    with pytest.raises(ExportError, match="sweep root .* does not exist"):
        export(tmp_path / "nowhere", exported)  # not "would overwrite"
    assert not list(tmp_path.iterdir())


def test_export_creates_a_missing_folder_as_report_does(sweep: Path, tmp_path: Path):
    """One rule for an output folder that is not there yet: created (report --out did,
    export refused)."""
    from typer.testing import CliRunner

    from deconcnn_cli.cli import app

    table = tmp_path / "new" / "deeper" / "results.csv"
    res = CliRunner().invoke(app, ["export", str(table), "--root", str(sweep), "--no-verify"])
    assert res.exit_code == 0, res.output
    assert table.is_file() and (table.parent / "results_timeseries").is_dir()
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(
        app, ["export", str(tmp_path / "afile" / "r.csv"), "--root", str(sweep)]
    )
    assert res.exit_code == 2 and "afile is not a folder" in res.stderr


def test_a_stream_far_longer_than_its_run_allows_is_named_and_not_read(tmp_path: Path):
    """A step stream grown to 64 MiB (sparse) in a run of 200 steps: the row's values from it
    are empty, the time series leaves it out, verification and the warnings name it."""
    from deconcnn_cli.export import figures

    root = tmp_path / "sweep"
    shape = {"steps": 200, "steps_per_epoch": 20, "curvature_every": 50}
    ok_id, big_id = real_run_id(**shape, seed=0), real_run_id(**shape, seed=1)
    spec = {"variant": "base", "lr": 0.1, "weight_decay": 1e-3}
    write_manifest(root, {ok_id: {**spec, "seed": 0}, big_id: {**spec, "seed": 1}})
    write_run(root, ok_id, **shape, seed=0, summary={})
    big = write_run(root, big_id, **shape, seed=1, summary={})
    with contract.stream_path(big, "step").open("r+b") as f:
        f.truncate(64 * 2**20)
    data, meta = export(root, tmp_path / "r.csv")
    cells = _cells(tmp_path / "r.csv")
    assert cells[ok_id]["final_loss_train_nats"] and cells[ok_id]["verify_problem"] == ""
    assert cells[big_id]["final_loss_train_nats"] == ""
    assert cells[big_id]["verify_problem"].startswith("stream_too_long: metrics/step.csv 67,108")
    limit = streambound.stream_byte_limit("step", 200)
    assert f"{big_id}: metrics/step.csv: {64 * 2**20:,} bytes, over 2x the largest file its " \
           f"200 expected rows can make ({limit:,} bytes): not read; its values left empty" \
           in meta["warnings"]  # fmt: skip
    series = tmp_path / "r_timeseries"
    assert (series / ok_id / "step.csv").is_file() and not (series / big_id / "step.csv").exists()
    assert (series / big_id / "val.csv").is_file()  # the run's other streams are kept
    assert any(w.startswith(f"{big_id}: step stream 67,108,864 bytes") for w in meta["warnings"])
    read = figures.read_series(root, [ok_id, big_id])
    assert "step" in read[ok_id] and "step" not in read[big_id]
