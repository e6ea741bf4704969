"""decon export replaces only what it wrote; concurrent or killed exports leave a whole dataset."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deconcnn_cli.export.files import ExportError
from deconcnn_cli.export.outputs import export
from deconcnn_cli.export.publish import MARK_FILE, output_lock
from deconcnn_cli.fileio import read_json
from tests.conftest import REPO, run_cli, subprocess_env
from tests.export.synthetic import write_manifest, write_run

SPEC = {"variant": "base", "lr": 0.1, "weight_decay": 1e-3}


def _sweep(root: Path, n_runs: int = 3, steps: int = 60) -> Path:
    runs = {f"r{i:03d}": {**SPEC, "seed": i} for i in range(n_runs)}
    write_manifest(root, runs)
    for i, run_id in enumerate(runs):
        write_run(root, run_id, steps=steps, steps_per_epoch=20, seed=i, summary={})
    return root


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (links named as such)."""
    found = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(d, name)
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = f"link -> {os.readlink(path)}"
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _data(folder: Path) -> dict[str, str]:
    """An export folder's files without its mark (which holds the export's time)."""
    return {k: v for k, v in _tree(folder).items() if k != MARK_FILE}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".staging-" in p.name or ".old-" in p.name)


def _refused(proc: subprocess.CompletedProcess, text: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and "\nhint: " in proc.stderr, proc.stderr
    assert text in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# 2. Replace only what export wrote


def test_a_sweep_named_like_the_time_series_folder_is_never_deleted(tmp_path: Path):
    """The issue's reproduction: a sweep copied to exx/lls_timeseries, exported with --force."""
    sweep = _sweep(tmp_path / "exx" / "lls_timeseries")
    before = _tree(sweep)
    proc = run_cli("export", str(tmp_path / "exx/lls.csv"), "--root", str(sweep), "--force")
    _refused(proc, "is or holds the sweep root being exported")
    other = _sweep(tmp_path / "other")  # another sweep's export aimed at that name
    proc = run_cli("export", str(tmp_path / "exx/lls.csv"), "--root", str(other), "--force")
    _refused(proc, "is a sweep root: export never replaces one")
    assert _tree(sweep) == before
    assert sorted(p.name for p in (tmp_path / "exx").iterdir()) == [
        ".lls.export.lock",
        "lls_timeseries",
    ]


def test_a_user_folder_without_the_mark_or_with_foreign_files_is_refused(tmp_path: Path):
    sweep = _sweep(tmp_path / "sweep")
    ex = tmp_path / "ex"
    (ex / "myproj_timeseries").mkdir(parents=True)
    (ex / "myproj_timeseries" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="was not written by `decon export`"):
        export(sweep, ex / "myproj.csv", force=True)
    assert (ex / "myproj_timeseries" / "notes.txt").read_text() == "mine"
    assert not (ex / "myproj.csv").exists() and not _leftovers(ex)

    out = tmp_path / "out" / "r.csv"
    out.parent.mkdir()
    export(sweep, out)
    ts = out.parent / "r_timeseries"
    mark = read_json(ts / MARK_FILE)
    assert mark["writer"] == "decon export" and sorted(mark["files"]) == sorted(_data(ts))
    export(sweep, out, force=True)  # its own, untouched folder: replaced
    for foreign in ("notes.txt", "r000/extra.csv", "mine/"):
        path = ts / foreign.rstrip("/")
        path.mkdir() if foreign.endswith("/") else path.write_text("mine")
        before = _tree(ts)
        with pytest.raises(ExportError, match=rf"export did not write: .*{foreign}"):
            export(sweep, out, force=True)
        assert _tree(ts) == before and not _leftovers(out.parent)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (ts / "inner").mkdir()
    shutil.copytree(sweep, ts / "inner" / "sweep")
    with pytest.raises(ExportError, match="contains a sweep root"):
        export(sweep, out, force=True)
    assert (ts / "inner" / "sweep" / "sweep.json").is_file()


def test_out_that_is_a_folder_is_refused_before_anything_is_written(tmp_path: Path):
    sweep = _sweep(tmp_path / "sweep")
    out = tmp_path / "out" / "r.csv"
    out.mkdir(parents=True)
    proc = run_cli("export", str(out), "--root", str(sweep), "--force")
    _refused(proc, f"{out} is a folder")
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.csv"]  # no time series, nothing


def test_a_symlinked_time_series_folder_is_refused_and_leaves_no_staging(tmp_path: Path):
    sweep = _sweep(tmp_path / "sweep")
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("keep")
    out = tmp_path / "out" / "r.csv"
    out.parent.mkdir()
    (out.parent / "r_timeseries").symlink_to(target)
    for force in ([], ["--force"]):
        proc = run_cli("export", str(out), "--root", str(sweep), *force)
        _refused(proc, "is a symbolic link")
    assert _tree(target) == {"data.txt": hashlib.sha256(b"keep").hexdigest()}
    assert sorted(p.name for p in out.parent.iterdir()) == ["r_timeseries"]


def test_a_stream_linked_outside_its_run_is_never_copied(tmp_path: Path):
    """A planted link from a run's stream to another user's file: the export leaves the
    stream out, names it in a warning, and copies nothing of the file; a link that stays
    inside the run directory is an ordinary stream."""
    sweep = _sweep(tmp_path / "sweep")
    secret = tmp_path / "home" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("step,loss\nPRIVATE KEY,1\n")
    metrics = sweep / "runs" / "r000" / "metrics"
    (metrics / "step.csv").unlink()
    (metrics / "step.csv").symlink_to(secret)
    kept = sweep / "runs" / "r001" / "metrics"
    (kept / "val.csv").rename(kept / "val_store.csv")
    (kept / "val.csv").symlink_to("val_store.csv")
    out = tmp_path / "out" / "r.csv"
    out.parent.mkdir()
    proc = run_cli("export", str(out), "--root", str(sweep), "--no-verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ts = out.parent / "r_timeseries"
    assert not (ts / "r000" / "step.csv").exists()
    assert all("PRIVATE" not in p.read_text() for p in ts.rglob("*.csv"))
    assert "r000: step stream" in proc.stderr and "links outside its run directory" in proc.stderr
    meta = read_json(out.parent / "r_metadata.json")
    assert any("r000: step stream" in w for w in meta["warnings"])
    assert (ts / "r001" / "val.csv").read_bytes() == (kept / "val_store.csv").read_bytes()
    assert (ts / "r000" / "val.csv").exists()  # the run's own streams are still there
    # verify names the link (without reading it) and takes the in-run link as the stream
    checked = run_cli("verify", "--root", str(sweep), "--json")
    problems = json.loads(checked.stdout)["problems"]
    links = [(p["run_id"], p["file"]) for p in problems if p["kind"] == "foreign_link"]
    assert links == [("r000", "runs/r000/metrics/step.csv")], problems
    assert not [p for p in problems if p["run_id"] == "r001" and "val" in (p["file"] or "")]


def test_outputs_inside_a_sweep_root_only_at_its_top(tmp_path: Path):
    """`make demo` writes its export into the sweep root itself, beside runs/: allowed, and
    replaced again with --force. Deeper (among the runs) is refused."""
    sweep = _sweep(tmp_path / "sweep")
    export(sweep, sweep / "results.csv")
    export(sweep, sweep / "results.csv", force=True)
    assert (sweep / "results_timeseries" / "r000" / "step.csv").is_file()
    before = _tree(sweep / "runs")
    with pytest.raises(ExportError, match="lies inside the sweep root"):
        export(sweep, sweep / "runs" / "r000.csv", force=True)
    assert _tree(sweep / "runs") == before


# ---------------------------------------------------------------------------------------------
# 3. Concurrent and killed exports


def _export_cmd(out: Path, root: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "deconcnn_cli", "export", str(out), "--root", str(root), *flags]


def _together(*cmds: list[str]) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(
            c, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for c in cmds
    ]
    done = []
    for p, c in zip(procs, cmds, strict=True):
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(c, p.returncode, out.decode(), err.decode()))
    return done


@pytest.fixture(scope="module")
def big_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _sweep(tmp_path_factory.mktemp("big") / "sweep", n_runs=120, steps=400)


def test_two_exports_at_once_run_one_after_the_other(big_sweep: Path, tmp_path: Path):
    """Two --force exports into one output: both end cleanly and the published folder is
    whole. Without --force into a fresh folder: one writes, the other is refused."""
    reference = tmp_path / "ref" / "r.csv"
    reference.parent.mkdir()
    export(big_sweep, reference, verify=None)
    want = _data(reference.parent / "r_timeseries")
    out = tmp_path / "out" / "r.csv"
    out.parent.mkdir()
    for _trial in range(2):
        results = _together(*[_export_cmd(out, big_sweep, "--force", "--no-verify")] * 2)
        for proc in results:
            assert proc.returncode == 0, proc.stderr
            assert "Traceback" not in proc.stderr
        assert _data(out.parent / "r_timeseries") == want
        assert not _leftovers(out.parent)
    fresh = tmp_path / "fresh" / "r.csv"
    fresh.parent.mkdir()
    results = _together(*[_export_cmd(fresh, big_sweep, "--no-verify")] * 2)
    assert sorted(p.returncode for p in results) == [0, 2], [p.stderr for p in results]
    _refused(next(p for p in results if p.returncode), "would overwrite")
    assert _data(fresh.parent / "r_timeseries") == want


def test_an_export_waits_for_the_lock_of_its_output(tmp_path: Path):
    sweep = _sweep(tmp_path / "sweep")
    out = tmp_path / "out" / "r.csv"
    out.parent.mkdir()
    with output_lock(out):
        proc = subprocess.Popen(
            _export_cmd(out, sweep, "--no-verify"),
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(3.0)
        assert proc.poll() is None  # still waiting
        assert not (out.parent / "r_timeseries").exists() and not out.exists()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert (out.parent / "r_timeseries" / MARK_FILE).is_file() and out.is_file()


# A real SIGKILL at a named point of the export (no hook in the product: the test wraps the
# functions the swap calls, in a child process).
_KILLER = """
import os, shutil, signal, sys
from pathlib import Path
from deconcnn_cli.export import outputs
from deconcnn_cli.export import outputs

point, root, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
renames = []
real_rename, real_rmtree = os.rename, shutil.rmtree
real_mark = getattr(outputs, "write_mark", None)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def write_mark(*args, **kwargs):
    if point == "staging":  # every stream copied, the mark not yet written
        die()
    real_mark(*args, **kwargs)

def rename(src, dst):
    renames.append(src)
    if (point, len(renames)) in (("aside", 1), ("in", 2)):
        die()
    real_rename(src, dst)

def rmtree(path, *args, **kwargs):
    if ".old-" in str(path):
        if point == "remove":
            die()
        if point == "removing":  # half of the old folder deleted
            real_rmtree(sorted(p for p in Path(path).iterdir() if p.is_dir())[0])
            die()
    real_rmtree(path, *args, **kwargs)

os.rename, shutil.rmtree = rename, rmtree
if real_mark is not None:
    outputs.write_mark = write_mark
outputs.export(root, out, force=True, verify=None)
"""


@pytest.mark.parametrize("point", ["staging", "aside", "in", "remove", "removing"])
def test_a_kill_at_each_step_of_the_swap_leaves_a_whole_dataset(tmp_path: Path, point: str):
    """Old export of 3 runs, new one of 4 (and r000 changed). Killed at ``point``, the folder
    holds the whole old or the whole new export; where the kill fell between "old aside" and
    "new in", the old one is whole aside and the next export puts it back first."""
    sweep = _sweep(tmp_path / "sweep")
    out = tmp_path / "out" / "r.csv"
    out.parent.mkdir()
    ts = out.parent / "r_timeseries"
    export(sweep, out, verify=None)
    old = _data(ts)
    write_manifest(sweep, {f"r{i:03d}": {**SPEC, "seed": i} for i in range(4)})
    write_run(sweep, "r003", steps=60, steps_per_epoch=20, seed=3, summary={})
    write_run(sweep, "r000", steps=80, steps_per_epoch=20, seed=9, summary={})
    reference = tmp_path / "ref" / "r.csv"
    reference.parent.mkdir()
    export(sweep, reference, verify=None)
    new = _data(reference.parent / "r_timeseries")
    assert old != new

    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, point, str(sweep), str(out)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr  # killed where asked
    if point == "in":
        assert not ts.exists()
        (aside,) = [p for p in out.parent.iterdir() if ".old-" in p.name]
        assert _data(aside) == old  # the whole old export, set aside
        refused = run_cli("export", str(out), "--root", str(sweep))  # no --force: put back
        _refused(refused, "would overwrite")
        assert _data(ts) == old
    elif point in ("staging", "aside"):
        assert _data(ts) == old
    else:
        assert _data(ts) == new
    if point != "in":
        assert run_cli("export", str(out), "--root", str(sweep)).returncode == 2
    assert _data(ts) in (old, new) and not _leftovers(out.parent)
    proc = run_cli("export", str(out), "--root", str(sweep), "--force", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert _data(ts) == new and not _leftovers(out.parent)
