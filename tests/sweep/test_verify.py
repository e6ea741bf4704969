"""decon verify on a clean sweep of real runs, and on each way it can be broken."""

from __future__ import annotations

import json
from pathlib import Path

from deconcnn_cli import contract, fileio, streambound
from deconcnn_cli.sweep.verify import (
    EXIT_PROBLEMS,
    EXIT_VERIFIED,
    expected_steps,
    verify_sweep,
)
from deconcnn_cli.training.schedule import val_steps_in_epoch
from deconcnn_cli.version import code_version
from tests.conftest import run_cli
from tests.sweep.fakes import tree_snapshot


def _runs(root: Path, state: str) -> list[Path]:
    return [
        p
        for p in sorted((root / "runs").iterdir())
        if json.loads((p / "status.json").read_text())["state"] == state
    ]


def _kinds(root: Path) -> set[tuple[str | None, str]]:
    return {(p.file, p.kind) for p in verify_sweep(root).problems}


def test_cadence_rule_matches_the_loop() -> None:
    assert sorted(val_steps_in_epoch(13, 4)) == [3, 6, 9, 12]
    assert sorted(val_steps_in_epoch(2, 4)) == [0, 1]
    cfg = {
        "schedule": {"epochs": 2},
        "cadence": {
            "val_per_epoch": 2,
            "curvature_every_steps": 4,
            "noise_every_epochs": 2,
            "shape_every_epochs": 1,
        },
    }
    exp = expected_steps(cfg, 5)
    assert exp["step"] == list(range(10))
    assert exp["val"] == [2, 4, 7, 9]
    assert exp["curvature"] == [0, 4, 8]
    assert exp["noise"] == [9] and exp["shape"] == [4, 9]


def test_clean_sweep_passes(clean_sweep: Path) -> None:
    before = tree_snapshot(clean_sweep)
    proc = run_cli("verify", "--root", str(clean_sweep))
    assert proc.returncode == EXIT_VERIFIED, proc.stdout + proc.stderr
    assert "verified: complete and clean" in proc.stdout
    assert "completed 2, diverged 1" in proc.stdout
    out = json.loads(run_cli("verify", "--json", "--root", str(clean_sweep)).stdout)
    assert out["ok"] and out["problems"] == [] and out["n_runs"] == 3
    assert tree_snapshot(clean_sweep) == before  # verify writes nothing


def test_truncated_stream_fails(sweep_copy: Path) -> None:
    run = _runs(sweep_copy, "completed")[0]
    path = contract.stream_path(run, "step")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-5]))
    proc = run_cli("verify", "--root", str(sweep_copy))
    assert proc.returncode == EXIT_PROBLEMS
    assert f"runs/{run.name}/metrics/step.csv: stream_gap: 5 of 39 expected rows missing" in (
        proc.stdout
    )


def test_truncated_diverged_stream_fails(sweep_copy: Path) -> None:
    run = _runs(sweep_copy, "diverged")[0]
    path = contract.stream_path(run, "step")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # the diverging step's row is part of the result
    assert (f"runs/{run.name}/metrics/step.csv", "stream_gap") in _kinds(sweep_copy)


def test_missing_run_fails(sweep_copy: Path) -> None:
    manifest = json.loads((sweep_copy / "sweep.json").read_text())
    manifest["runs"]["base_lr0.1_wd0.001_s9_0000000000"] = {"config": {}}
    (sweep_copy / "sweep.json").write_text(json.dumps(manifest))
    proc = run_cli("verify", "--json", "--root", str(sweep_copy))
    assert proc.returncode == EXIT_PROBLEMS
    (problem,) = json.loads(proc.stdout)["problems"]
    assert problem["kind"] == "missing_run"
    assert problem["run_id"] == "base_lr0.1_wd0.001_s9_0000000000"


def test_checksum_mismatch_fails(sweep_copy: Path) -> None:
    run = _runs(sweep_copy, "completed")[1]
    final = run / "checkpoints" / "ckpt_000000039.pt"
    data = bytearray(final.read_bytes())
    data[len(data) // 2] ^= 0xFF
    final.write_bytes(bytes(data))
    assert _kinds(sweep_copy) == {(f"runs/{run.name}/checkpoints/ckpt_000000039.pt", "checksum")}
    final.unlink()
    final.with_suffix(".sha256").unlink()
    assert _kinds(sweep_copy) == {
        (f"runs/{run.name}/checkpoints/ckpt_000000039.pt", "checkpoint_missing")
    }


def test_duplicate_rows_and_unfinished_runs_fail(sweep_copy: Path) -> None:
    a, b = _runs(sweep_copy, "completed")
    val = contract.stream_path(a, "val")
    lines = val.read_text().splitlines(keepends=True)
    val.write_text("".join([*lines[:3], lines[2], *lines[3:]]))
    status = json.loads((b / "status.json").read_text())
    fileio.atomic_write_json(b / "status.json", {**status, "state": "interrupted"})
    kinds = _kinds(sweep_copy)
    assert (f"runs/{a.name}/metrics/val.csv", "stream_duplicate") in kinds
    assert (f"runs/{b.name}/status.json", "unfinished") in kinds


def test_nan_needs_a_warning_unless_diverged(sweep_copy: Path) -> None:
    run = _runs(sweep_copy, "completed")[0]
    path = contract.stream_path(run, "val")
    header, first, *rest = path.read_text().splitlines(keepends=True)
    cells = first.split(",")
    cells[2] = "nan"  # loss_val_nats at the first validation
    path.write_text("".join([header, ",".join(cells), *rest]))
    assert _kinds(sweep_copy) == {(f"runs/{run.name}/metrics/val.csv", "nan")}
    with open(run / "events.jsonl", "a") as f:
        f.write(json.dumps({"level": "warning", "message": "val failed", "step": int(cells[0])}))
        f.write("\n")
    assert _kinds(sweep_copy) == set()


def test_grad_noise_scale_may_be_nan_by_definition_other_noise_cells_may_not(
    sweep_copy: Path,
) -> None:
    run = _runs(sweep_copy, "completed")[0]
    path = contract.stream_path(run, "noise")
    header, first, *rest = path.read_text().splitlines(keepends=True)
    columns = header.strip().split(",")
    cells = first.rstrip("\n").split(",")
    cells[columns.index("grad_noise_scale")] = "nan"  # denominator <= 0: NaN by definition
    path.write_text("".join([header, ",".join(cells) + "\n", *rest]))
    assert _kinds(sweep_copy) == set()
    cells[columns.index("gradient_variance")] = "nan"  # always defined: a failure needs a reason
    path.write_text("".join([header, ",".join(cells) + "\n", *rest]))
    assert _kinds(sweep_copy) == {(f"runs/{run.name}/metrics/noise.csv", "nan")}


def _set_attempt_versions(run: Path, version: str | None) -> None:
    """Rewrite every attempt line of ``run`` with ``code_version`` (None: drop the field, as
    attempts written before it was recorded)."""
    lines = [json.loads(ln) for ln in (run / "attempts.jsonl").read_text().splitlines()]
    for rec in lines:
        rec.pop("code_version", None)
        if version is not None and rec.get("event") != "end":
            rec["code_version"] = version
    (run / "attempts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_attempts_record_the_code_version(clean_sweep: Path) -> None:
    for run in (clean_sweep / "runs").iterdir():
        starts = contract.read_attempt_starts(run)
        assert starts and all(a["code_version"] == code_version() for a in starts)
    assert verify_sweep(clean_sweep).code_versions == {
        code_version(): sorted(p.name for p in (clean_sweep / "runs").iterdir())
    }


def test_attempt_versions_win_over_the_manifest(sweep_copy: Path) -> None:
    a, b, c = sorted((sweep_copy / "runs").iterdir())
    for run in (a, b, c):
        _set_attempt_versions(run, "0.1.0+gsame")
    assert verify_sweep(sweep_copy).ok  # the manifest's 0.1.0+gtest is not consulted
    with open(c / "attempts.jsonl", "a") as f:  # a second attempt of c, by other code
        f.write(json.dumps({"attempt": 2, "code_version": "0.2.0+gother"}) + "\n")
    result = verify_sweep(sweep_copy)
    assert result.code_versions == {"0.1.0+gsame": [a.name, b.name, c.name],
                                    "0.2.0+gother": [c.name]}  # fmt: skip
    assert {(p.file, p.kind) for p in result.problems} == {("sweep.json", "code_version")}


def test_summary_fields_and_code_versions(sweep_copy: Path) -> None:
    for each in (sweep_copy / "runs").iterdir():  # attempts without a version: the manifest's
        _set_attempt_versions(each, None)
    run = _runs(sweep_copy, "completed")[0]
    summary = json.loads((run / "summary.json").read_text())
    del summary["best_val_ce"]
    (run / "summary.json").write_text(json.dumps(summary))
    manifest = json.loads((sweep_copy / "sweep.json").read_text())
    manifest["submissions"][0]["jobs"] = [
        j for j in manifest["submissions"][0]["jobs"] if j["run_ids"] != [run.name]
    ]
    manifest["submissions"].append(
        {
            "time_unix": 1.0,
            "executor": "local",
            "code_version": "0.2.0+gother",
            "jobs": [{"job_id": "local-9", "run_ids": [run.name]}],
        }
    )
    (sweep_copy / "sweep.json").write_text(json.dumps(manifest))
    result = verify_sweep(sweep_copy)
    kinds = {(p.file, p.kind) for p in result.problems}
    assert kinds == {(f"runs/{run.name}/summary.json", "summary"), ("sweep.json", "code_version")}
    assert sorted(result.code_versions) == ["0.1.0+gtest", "0.2.0+gother"]
    assert result.exit_code == EXIT_PROBLEMS


def test_not_a_sweep_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    proc = run_cli("verify", "--root", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "hint: " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def _drop_column(path: Path, column: str) -> None:
    lines = path.read_text().splitlines()
    at = lines[0].split(",").index(column)
    rows = [",".join(c for i, c in enumerate(line.split(",")) if i != at) for line in lines]
    path.write_text("\n".join(rows) + "\n")


def test_a_stream_header_not_the_documented_one_fails(sweep_copy: Path) -> None:
    """A duplicated column (lr renamed as another) or a documented column missing from the
    header and every row: the cells cannot be trusted, so verify names the header. A header
    of older code (curvature without the appended sharpness_norm) is still clean."""
    a, b = _runs(sweep_copy, "completed")
    step = contract.stream_path(a, "step")
    lines = step.read_text().splitlines(keepends=True)
    step.write_text(lines[0].replace(",lr,", ",loss_train_nats,") + "".join(lines[1:]))
    _drop_column(contract.stream_path(b, "val"), "weight_norm")
    _drop_column(contract.stream_path(a, "curvature"), "sharpness_norm")
    assert _kinds(sweep_copy) == {
        (f"runs/{a.name}/metrics/step.csv", "stream_header"),
        (f"runs/{b.name}/metrics/val.csv", "stream_header"),
    }


def test_a_completed_run_whose_status_claims_another_step_count_fails(sweep_copy: Path) -> None:
    run = _runs(sweep_copy, "completed")[0]
    path = run / contract.STATUS_FILE
    status = json.loads(path.read_text())
    status["step"] = 5
    path.write_text(json.dumps(status))
    assert _kinds(sweep_copy) == {(f"runs/{run.name}/status.json", "status_steps")}


def test_a_config_swapped_for_another_runs_fails_even_with_its_identity_kept(
    sweep_copy: Path,
) -> None:
    """config.json's run_id and config_hash are the run's own, its config another run's: the
    identity recomputed from the config gives it away; with the hash recomputed too, the id."""
    run, other = _runs(sweep_copy, "completed")
    path = run / contract.CONFIG_FILE
    record = json.loads(path.read_text())
    foreign = json.loads((other / contract.CONFIG_FILE).read_text())["config"]
    path.write_text(json.dumps({**record, "config": foreign}))
    found = [p for p in verify_sweep(sweep_copy).problems if p.kind == "identity"]
    assert [p.file for p in found] == [f"runs/{run.name}/config.json"] * 2
    assert f"hashes to {other.name.rsplit('_', 1)[1]!r}" in found[0].message
    assert f"its config is run {other.name!r}, not {run.name!r}" == found[1].message
    from deconcnn_cli.config import RunConfig, config_hash

    rehashed = {**record, "config": foreign,
                "config_hash": config_hash(RunConfig.model_validate(foreign))}  # fmt: skip
    path.write_text(json.dumps(rehashed))
    assert _kinds(sweep_copy) == {(f"runs/{run.name}/config.json", "identity")}


def test_a_stream_far_longer_than_its_config_allows_is_reported_unread(sweep_copy: Path) -> None:
    """A step stream grown (a runaway writer, NULs of a crash) to 64 MiB, a sparse file: over
    STREAM_SIZE_FACTOR x its 39 rows' largest size, so it is named from its size alone."""
    run = _runs(sweep_copy, "completed")[0]
    path = contract.stream_path(run, "step")
    with path.open("r+b") as f:
        f.truncate(64 * 2**20)
    limit = streambound.stream_byte_limit("step", 39)
    assert limit < 64 * 2**20 and limit == 2 * 40 * len(contract.STREAMS["step"]) * 25
    problems = [p for p in verify_sweep(sweep_copy).problems if p.file.endswith("step.csv")]
    assert [(p.kind, p.message) for p in problems] == [
        ("stream_too_long", f"{64 * 2**20:,} bytes, over 2x the largest file its 39 expected "
                            f"rows can make ({limit:,} bytes): not read"),
    ]  # fmt: skip
