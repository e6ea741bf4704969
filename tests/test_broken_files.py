"""Broken files give `error:` or a word, never a traceback or a wrong answer (the fuzz suite,
test_fuzz_contract.py, covers the same ground by brute force)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deconcnn_cli import contract, fileio
from deconcnn_cli.cli import app
from tests.export.synthetic import write_manifest, write_run

RUNS = {
    "done": {"variant": "base", "lr": 0.1, "weight_decay": 1e-3, "seed": 0},
    "live": {"variant": "base", "lr": 0.1, "weight_decay": 1e-3, "seed": 1},
    "broken": {"variant": "base", "lr": 0.1, "weight_decay": 1e-3, "seed": 2},
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A completed run with a summary, a failed one, one more completed run."""
    root = tmp_path / "sweep"
    write_manifest(root, RUNS)
    write_run(root, "done", steps=40, steps_per_epoch=10, summary={}, curvature_every=10)
    write_run(root, "live", steps=40, steps_per_epoch=10, summary={}, curvature_every=10)
    write_run(root, "broken", state="failed", steps=40, steps_per_epoch=10, curvature_every=10)
    return root


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"raised {result.exception!r}") from result.exception
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def status_path(root: Path, run: str) -> Path:
    return root / "runs" / run / contract.STATUS_FILE


def test_truncated_status_of_a_completed_run_is_never_a_rerun(root: Path) -> None:
    path = status_path(root, "done")
    path.write_bytes(path.read_bytes()[:30])
    view = contract.view_run(root / "runs" / "done")
    assert view.state == contract.COMPLETED and view.unreadable is not None
    assert "summary.json" in (view.reason or "")
    code, out = invoke("recover", "--root", root, "--dry-run", "--json")
    plan = json.loads(out)
    assert "done" not in {a["run_id"] for a in plan["actions"]}
    assert plan["untouched"].get("completed") == 2
    code, out = invoke("monitor", "--root", root, "--json")
    rows = {r["run_id"]: r for r in json.loads(out)["runs"]}
    assert rows["done"]["state"] == "completed"
    code, out = invoke("verify", "--root", root)
    assert code == 1 and "done: runs/done/status.json: unreadable" in out
    code, out = invoke("export", root / "r.csv", "--root", root, "--no-timeseries")
    assert code == 0
    line = next(ln for ln in (root / "r.csv").read_text().splitlines() if ln.startswith("done,"))
    assert ",completed," in line and "unreadable" in line  # the state and verify's word
    from deconcnn_cli.export.files import read_results

    row = read_results(root / "r.csv").set_index("run_id").loc["done"]
    summary = json.loads((root / "runs" / "done" / contract.SUMMARY_FILE).read_text())
    assert row["epochs_done"] == summary["epochs_done"] == 4.0  # from the summary, not empty
    assert row["steps_done"] == 40


def test_wrong_types_in_status_json_are_that_runs_problem(root: Path) -> None:
    status = json.loads(status_path(root, "live").read_text())
    status.update(state="running", step="abc", epoch=[1])
    (root / "runs" / "live" / contract.SUMMARY_FILE).unlink()
    status_path(root, "live").write_text(json.dumps(status))
    for args in (["monitor"], ["monitor", "--json"], ["verify"], ["recover", "--dry-run"]):
        code, out = invoke(*args, "--root", root)
        assert code in (0, 1), out
    code, out = invoke("monitor", "--root", root, "--json")
    rows = {r["run_id"]: r for r in json.loads(out)["runs"]}
    assert rows["live"]["state"] == "unreadable" and "`step` is str" in rows["live"]["detail"]
    assert rows["done"]["state"] == "completed"  # the others are still answered
    code, out = invoke("recover", "--root", root, "--dry-run", "--json")
    (action,) = [a for a in json.loads(out)["actions"] if a["run_id"] == "live"]
    assert action["action"] == "person"
    code, out = invoke("export", root / "r.csv", "--root", root)
    assert code == 0, out
    code, out = invoke("report", "--root", root, "--out", root.parent / "rep")
    assert code == 0, out


def test_a_bad_jsonl_line_is_skipped_and_reported(root: Path) -> None:
    events = root / "runs" / "done" / contract.EVENTS_FILE
    good = json.dumps({"level": "warning", "step": 3, "message": "m"})
    events.write_bytes(good.encode() + b"\n" + b'{"level": "\xff"}\n' + good.encode() + b"\n")
    records, bad = fileio.read_jsonl_checked(events)
    assert len(records) == 2 and bad == [2]
    code, out = invoke("verify", "--root", root)
    assert code == 1 and "runs/done/events.jsonl: bad_line" in out


def test_nuls_after_a_finished_stream_are_reported(root: Path) -> None:
    step = contract.stream_path(root / "runs" / "done", "step")
    step.write_bytes(step.read_bytes() + b"\0" * 300)
    code, out = invoke("verify", "--root", root)
    assert code == 1 and "300 NUL bytes after the last whole line" in out


def test_a_bad_byte_in_a_stream_is_reported(root: Path) -> None:
    step = contract.stream_path(root / "runs" / "done", "step")
    data = step.read_bytes()
    step.write_bytes(data[:200] + b"\xff" + data[200:])
    code, out = invoke("verify", "--root", root)
    assert code == 1 and "runs/done/metrics/step.csv" in out
    code, out = invoke("export", root / "r.csv", "--root", root)
    assert code == 0, out


def test_manifest_lists_of_the_wrong_type(root: Path) -> None:
    manifest = json.loads((root / "sweep.json").read_text())
    manifest["submissions"] = "abc"
    (root / "sweep.json").write_text(json.dumps(manifest))
    assert invoke("export", root / "r.csv", "--root", root)[0] == 0
    manifest["submissions"] = [{"jobs": "abc", "executor": "local"}]
    (root / "sweep.json").write_text(json.dumps(manifest))
    assert invoke("export", root / "r2.csv", "--root", root)[0] == 0
    assert invoke("report", "--root", root, "--out", root.parent / "rep")[0] == 0


def test_a_garbage_cell_in_val_csv_of_a_run_without_summary(root: Path) -> None:
    val = contract.stream_path(root / "runs" / "broken", "val")
    lines = val.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split(",")[2], "abc", 1)
    val.write_text("\n".join(lines) + "\n")
    code, out = invoke("export", root / "r.csv", "--root", root)
    assert code == 0 and "broken: 1 stream cell(s) not a number, left empty" in out
    assert invoke("report", "--root", root, "--out", root.parent / "rep")[0] == 0


def test_a_toml_that_is_not_utf8(tmp_path: Path) -> None:
    grid = tmp_path / "g.toml"
    grid.write_bytes(b'name = "g\xff"\n')
    code, out = invoke("submit", "--grid", grid, "--root", tmp_path / "s", "--dry-run")
    assert code == 2 and "error:" in out and "not UTF-8" in out and str(grid) in out


def test_markup_in_a_root_path_is_text(root: Path, tmp_path: Path) -> None:
    odd = tmp_path / "odd[" / "x]" / "sweep"  # the path holds "[/x]"
    odd.parent.mkdir(parents=True)
    root.rename(odd)
    code, out = invoke("monitor", "--root", odd)
    assert code == 0 and "[/x]" in out
    code, out = invoke(
        "submit", "--grid", "demo", "--executor", "local", "--root", odd, "--dry-run"
    )
    assert code == 2 and "error:" in out  # not this grid's sweep; said, not a MarkupError


def test_a_root_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    code, out = invoke("submit", "--grid", "demo", "--executor", "local", "--root", f)
    assert code == 2 and "error:" in out and "not a folder" in out
    code, out = invoke("train", "-p", "smoke", "--root", f, "--quiet")
    assert code == 2 and "error: cannot create run directory" in out
    assert f.read_text() == "x"


def test_recover_with_nothing_to_do_takes_no_lock(root: Path) -> None:
    """A root where the lock cannot be taken (read-only; here: the lock file is a folder,
    as root ignores permissions) still answers recover when nothing needs writing."""
    (root / "runs" / "broken").rename(root / "gone")  # failed run: would be retried
    manifest = json.loads((root / "sweep.json").read_text())
    del manifest["runs"]["broken"]
    (root / "sweep.json").write_text(json.dumps(manifest))
    (root / ".sweep.lock").mkdir()
    code, out = invoke("recover", "--root", root)
    assert code == 0 and "0 run(s) need action" in out
    assert not (root / "recover.jsonl").exists()


def test_submit_on_a_root_it_cannot_lock(root: Path) -> None:
    (root / ".sweep.lock").mkdir()
    code, out = invoke("recover", "--root", root)  # the failed run needs a retry: a write
    assert code == 2 and "error: cannot take the sweep lock" in out


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--lr", "inf"], "optim.lr"),
        (["--wd", "inf"], "optim.weight_decay"),
        (["--set", "analysis.lanczos_tol=inf"], "analysis.lanczos_tol"),
        (["--set", "analysis.alpha_early_epochs=[nan, 3.0]"], "analysis.alpha_early_epochs"),
        (["--max-steps", "0"], "--max-steps"),
        (["--max-steps", "-5"], "--max-steps"),
    ],
)
def test_non_finite_values_and_step_counts_are_refused(
    args: list[str], field: str, tmp_path: Path
) -> None:
    code, out = invoke("train", "-p", "smoke", "--root", tmp_path / "runs", *args)
    assert code == 2 and "error:" in out and field in out
    assert not (tmp_path / "runs").exists()


def test_submit_with_nothing_to_do_on_a_root_it_cannot_lock(tmp_path: Path) -> None:
    grid = tmp_path / "g.toml"
    grid.write_text('name = "g"\nvariants = ["base"]\nprofiles = ["smoke"]\n'
                    "[axes]\nlr = [0.1]\nweight_decay = [0.001]\nseed = [0]\n")  # fmt: skip
    from deconcnn_cli.sweep.grid import expand_grid_runs, grid_hash
    from deconcnn_cli.sweep.profiles import load_grid
    from deconcnn_cli.sweep.store import SweepStore

    (run,) = expand_grid_runs(load_grid(str(grid)))
    root = tmp_path / "sweep"
    store = SweepStore(root)
    entries = {run.run_id: run.manifest_entry()}
    store.write_manifest(store.new_manifest("g", grid_hash([run]), entries))
    write_run(root, run.run_id, steps=40, steps_per_epoch=10, summary={})
    (root / ".sweep.lock").mkdir()  # the lock cannot be taken (as on a read-only root)
    args = ["submit", "--grid", grid, "--executor", "local", "--root", root]
    code, out = invoke(*args)
    assert code == 0 and "nothing to submit" in out
    (root / "runs" / run.run_id / contract.STATUS_FILE).unlink()
    (root / "runs" / run.run_id / contract.SUMMARY_FILE).unlink()  # now it needs a submit
    code, out = invoke(*args)
    assert code == 2 and "error: cannot take the sweep lock" in out


def test_recover_on_a_manifest_entry_that_is_not_a_config(root: Path) -> None:
    manifest = json.loads((root / "sweep.json").read_text())
    manifest["runs"]["broken"]["config"] = "abc"  # the failed run recover would retry
    (root / "sweep.json").write_text(json.dumps(manifest))
    code, out = invoke("recover", "--root", root)
    assert code == 2 and "error:" in out and "run broken is not a whole run entry" in out


def test_a_status_before_its_first_step_is_not_unreadable(tmp_path: Path) -> None:
    """An attempt writes `running` (then maybe `failed`, while loading data) before it knows
    its step: a missing `step` is not a broken file."""
    run = tmp_path / "r"
    run.mkdir()
    for state in ("running", "failed"):
        status = {"state": state, "attempt": 1, "host": "h", "pid": 1, "reason": None,
                  "exception_type": None, "timing": None, "heartbeat_unix": 1e18}  # fmt: skip
        fileio.atomic_write_json(run / contract.STATUS_FILE, status)
        view = contract.view_run(run, now=1e18)
        assert view.state == state and view.unreadable is None and view.steps_done == 0


def test_a_fifo_or_an_endless_device_reads_as_unreadable_at_once(tmp_path: Path):
    """A named pipe where status.json belongs would block every reader forever; a link to
    /dev/zero would read without end. Both are refused before a byte is read."""
    import os
    import threading

    pipe, zero, plain = tmp_path / "status.json", tmp_path / "step.csv", tmp_path / "ok.json"
    os.mkfifo(pipe)
    zero.symlink_to("/dev/zero")
    plain.write_text('{"state": "completed"}')
    got: dict[str, object] = {}

    def read_all() -> None:
        got["json"] = fileio.read_json(pipe)
        got["jsonl"] = fileio.read_jsonl_checked(pipe)
        got["lines"] = fileio.complete_lines(zero)
        got["tail"] = fileio.partial_tail(zero)
        got["plain"] = fileio.read_json(plain)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "a reader blocked on a FIFO or /dev/zero"
    assert got == {
        "json": None,
        "jsonl": ([], []),
        "lines": [],
        "tail": b"",
        "plain": {"state": "completed"},
    }
    with pytest.raises(fileio.NotRegularFileError, match="not a regular file"):
        fileio.read_regular(pipe)


def test_numbers_beyond_int64_and_infinite_times_are_not_a_traceback(root: Path) -> None:
    """A status.json step of 10^20 (beyond int64), attempt times of ±1e308 and 1e35: report
    and export answer (the count is not defined), monitor --json stays valid JSON, and the
    hours shown stay finite."""
    path = status_path(root, "done")
    status = json.loads(path.read_text())
    status["step"] = 10**20
    path.write_text(json.dumps(status))
    attempts = root / "runs" / "live" / contract.ATTEMPTS_FILE
    attempts.write_text(
        json.dumps({"attempt": 1, "start_unix": -1e308}) + "\n"
        + json.dumps({"attempt": 1, "event": "end", "state": "completed", "end_unix": 1e308})
        + "\n" + json.dumps({"attempt": 2, "start_unix": 1e35}) + "\n"
    )  # fmt: skip
    code, _ = invoke("report", "--root", root, "--out", root / "rep")
    assert code == 0
    code, _ = invoke("export", root / "r.csv", "--root", root, "--no-timeseries")
    assert code == 0
    from deconcnn_cli.export.files import read_results

    assert read_results(root / "r.csv").set_index("run_id").loc["done", "steps_done"] is pd_na()
    code, out = invoke("monitor", "--root", root, "--json")
    data = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert all(v is None or abs(v) < 1e12 for v in _numbers(data)), "an absurd number shown"
    code, out = invoke("monitor", "--root", root)
    assert "inf" not in out.split("hours", 1)[1].split("\n", 1)[0]


def pd_na() -> object:
    import pandas as pd

    return pd.NA


def _numbers(obj: object) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    is_number = isinstance(obj, int | float) and not isinstance(obj, bool)
    return [float(obj)] if is_number and abs(obj) != 10**20 else []


def test_control_characters_from_a_file_never_reach_the_terminal(root: Path) -> None:
    """An ESC sequence, a newline, NUL and a right-to-left override in a failed run's reason
    are shown escaped: they can neither drive the terminal nor fake a row."""
    path = status_path(root, "broken")
    status = json.loads(path.read_text())
    status["reason"] = "boom\x1b[31m red\x1b]0;title\x07\nFAKE completed 99\x00 \u202eevil"
    status["exception_type"] = "Value\x1bError"
    path.write_text(json.dumps(status))
    for args in (("monitor",), ("monitor", "--show-failed")):
        code, out = invoke(*args, "--root", root)
        assert not any(c in out for c in ("\x1b", "\x00", "\u202e", "\x07")), args
        assert "boom\\x1b[31m" in out  # shown, escaped (the row may wrap or cut the rest)
        if "--show-failed" in args:
            assert "\\u202eevil" in out
        assert not any(line.startswith("FAKE") for line in out.splitlines()), out


def test_seeds_beyond_int64_and_deep_toml_are_bad_input(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text('name = "g"\nx = ' + "[" * 5000 + "]" * 5000 + "\n")
    code, out = invoke("train", "-p", "smoke", "--seed", str(2**64), "--root", tmp_path / "t")
    assert code == 2 and "seed" in out and not (tmp_path / "t").exists()
    code, out = invoke("train", "-p", deep, "--root", tmp_path / "t")
    assert code == 2 and "nested too deeply" in out
    deep_set = "model.width_mult=" + "[" * 5000 + "]" * 5000
    code, out = invoke("train", "-p", "smoke", "--set", deep_set, "--root", tmp_path / "t")
    assert code == 2 and "nested too deeply" in out
    code, out = invoke("submit", "--dry-run", "--grid", deep, "--root", tmp_path / "x")
    assert code == 2 and "nested too deeply" in out


def test_a_json_file_grown_to_gigabytes_is_unreadable_without_reading_it(root: Path) -> None:
    """A status.json of 2 GiB of NULs (sparse: nothing is written to disk) used to cost
    monitor 4 GB of memory; past fileio.MAX_JSON_BYTES it is refused from its size."""
    import os

    path = status_path(root, "done")
    with open(path, "r+b") as f:
        f.truncate(2 * 2**30)
    assert os.path.getsize(path) > fileio.MAX_JSON_BYTES
    assert fileio.read_json(path) is None
    view = contract.view_run(root / "runs" / "done")
    assert view.state == contract.COMPLETED and view.unreadable is not None  # from summary.json
    code, out = invoke("monitor", "--root", root, "--json")
    assert code == 0 and {r["run_id"]: r["state"] for r in json.loads(out)["runs"]}["done"] == (
        "completed"
    )
