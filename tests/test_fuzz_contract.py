"""The run-directory and sweep-root contract, fuzzed: every reader command on broken files.

A generator breaks each file of a small sweep root (docs/run-directory.md, docs/sweep-root.md)
in the ways a cluster and an adversary do: truncated, emptied, a stray byte, NULs appended,
JSON values of the wrong type, a garbage cell, a link to nowhere or a directory where the file
belongs, no permissions. Each reader command then runs on the broken copy, in process
(``CliRunner``: a subprocess per case would not fit the time budget on a 2-core machine), and
three things are asserted: no traceback, an exit code the command documents, and every file
outside the command's own outputs unchanged (SHA-256, mode and link target).

``CASES`` is the case list; docs/run-directory.md says how many cases it tries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from deconcnn_cli import contract, fileio
from deconcnn_cli.cli import app
from deconcnn_cli.sweep.grid import expand_grid_runs
from deconcnn_cli.sweep.profiles import load_grid
from deconcnn_cli.sweep.store import SweepStore
from tests.export.synthetic import write_run
from tests.factories import tiny_grid

GRID_TOML = tiny_grid("fuzz", seed=(0, 1, 2, 3))
RESOURCES_TOML = 'executor = "local"\nparallel_runs = 1\ncpus_per_run = 1\n'
STATES = ("completed", "diverged", "failed", "interrupted")  # one run each, in seed order

# every reader command, its arguments (ROOT, OUT, GRID, RES are filled in) and the exit codes
# it documents (docs/cluster.md, docs/run-directory.md): 2 is bad input for every command
COMMANDS: dict[str, tuple[list[str], set[int]]] = {
    "monitor": (["monitor", "--root", "ROOT"], {0, 2}),
    "monitor --json": (["monitor", "--root", "ROOT", "--json", "--show-failed"], {0, 2}),
    "verify": (["verify", "--root", "ROOT"], {0, 1, 2}),
    "recover --dry-run": (["recover", "--root", "ROOT", "--dry-run"], {0, 1, 2}),
    "export": (["export", "OUT/results.csv", "--root", "ROOT"], {0, 2}),
    "report": (["report", "--root", "ROOT", "--out", "OUT/report"], {0, 2}),
    "submit --dry-run": (
        ["submit", "--grid", "GRID", "--resources", "RES", "--root", "ROOT", "--dry-run"],
        {0, 2},
    ),
}


# ---- the pristine sweep root


def _build(base: Path) -> None:
    """``base/root`` (a sweep of four synthetic runs per the contract) and the grid and
    resource profile it was made from (``base/fuzz.toml``, ``base/res.toml``)."""
    (base / "fuzz.toml").write_text(GRID_TOML)
    (base / "outside.bin").write_bytes(b"\0\xff junk {not json\n")
    (base / "res.toml").write_text(RESOURCES_TOML)
    root = base / "root"
    store = SweepStore(root)
    runs = expand_grid_runs(load_grid(str(base / "fuzz.toml")))
    manifest = store.new_manifest("fuzz", "0" * 16, {r.run_id: r.manifest_entry() for r in runs})
    manifest["submissions"] = [
        {
            "time_unix": 1764355300.0,
            "executor": "local",
            "resources": str(base / "res.toml"),
            "code_version": "0.1.0+gtest",
            "jobs": [{"job_id": f"local-{i}", "run_ids": [r.run_id]} for i, r in enumerate(runs)],
        }
    ]
    store.write_manifest(manifest)
    for run, state in zip(runs, STATES, strict=True):
        summary = {"state": state} if state in contract.TERMINAL_STATES else None
        run_dir = write_run(root, run.run_id, state=state, steps=40, steps_per_epoch=10,
                            summary=summary, curvature_every=10)  # fmt: skip
        fileio.append_jsonl(
            run_dir / contract.ATTEMPTS_FILE,
            {"attempt": 1, "event": "end", "end_unix": 2.0, "state": state, "steps_done": 40},
        )
        fileio.append_jsonl(
            run_dir / contract.EVENTS_FILE, {"level": "warning", "step": 3, "message": "nan"}
        )
    (root / "jobs").mkdir()
    (root / "jobs" / "local-0.log").write_text("log line\n")
    fileio.append_jsonl(root / "recover.jsonl", {"run_id": runs[3].run_id, "action": "resume"})


# ---- ways to break a file


def _rewrite(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    _rewrite(path, data[: len(data) // 2])


def empty(path: Path) -> None:
    _rewrite(path, b"")


def bad_byte(path: Path) -> None:
    data = path.read_bytes()
    _rewrite(path, data[: len(data) // 2] + b"\xff\xfe" + data[len(data) // 2 :])


def nuls(path: Path) -> None:
    _rewrite(path, path.read_bytes() + b"\0" * 300)


def dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("nowhere"))


def foreign_link(path: Path) -> None:
    """A link to a file outside the sweep (binary junk): read, never written through."""
    outside = next(d / "outside.bin" for d in path.parents if (d / "outside.bin").exists())
    path.unlink()
    path.symlink_to(outside)


def directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def fifo(path: Path) -> None:
    """A named pipe where the file belongs: an ordinary read would wait for a writer forever."""
    path.unlink()
    os.mkfifo(path)


def endless_link(path: Path) -> None:
    """A link to /dev/zero: an ordinary read would never end (and fill the memory)."""
    path.unlink()
    path.symlink_to("/dev/zero")


def no_permission(path: Path) -> None:
    """Mode 000 (a user without root cannot read it; root still can)."""
    path.chmod(0)


def _wrong(value: Any) -> Any:
    """A value of another JSON type than ``value``."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, int | float):
        return "abc"
    if isinstance(value, str):
        return [1]
    if value is None:
        return {"x": 1}
    return "x"


def wrong_types(path: Path) -> None:
    """Every top-level value of a JSON object (every line of a JSON-lines file) changed to
    another type, nested objects one level down too."""

    def mangle(obj: Any) -> Any:
        if not isinstance(obj, dict):
            return _wrong(obj)
        return {k: ({kk: _wrong(vv) for kk, vv in v.items()} if isinstance(v, dict)
                    else _wrong(v)) for k, v in obj.items()}  # fmt: skip

    text = path.read_text()
    if path.suffix == ".jsonl":
        lines = [json.dumps(mangle(json.loads(line))) for line in text.splitlines()]
        _rewrite(path, ("\n".join(lines) + "\n").encode())
    else:
        _rewrite(path, json.dumps(mangle(json.loads(text))).encode())


def garbage_cell(path: Path) -> None:
    """A cell of every data row of a CSV stream replaced by text."""
    lines = path.read_text().split("\n")
    for i in range(1, len(lines) - 1):
        cells = lines[i].split(",")
        cells[min(2, len(cells) - 1)] = "abc"
        lines[i] = ",".join(cells)
    _rewrite(path, "\n".join(lines).encode())


def _manifest_edit(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        manifest = json.loads(path.read_text())
        edit(manifest)
        _rewrite(path, json.dumps(manifest).encode())

    apply.__name__ = edit.__name__
    return apply


def submissions_text(m: dict[str, Any]) -> None:
    m["submissions"] = "abc"


def jobs_text(m: dict[str, Any]) -> None:
    m["submissions"][0]["jobs"] = "abc"


def runs_list(m: dict[str, Any]) -> None:
    m["runs"] = list(m["runs"])


def run_id_escapes(m: dict[str, Any]) -> None:
    first = next(iter(m["runs"]))
    m["runs"]["../../victim_src"] = m["runs"].pop(first)


def run_entry_text(m: dict[str, Any]) -> None:
    first = next(iter(m["runs"]))
    m["runs"][first] = "abc"


def grid_name_path(m: dict[str, Any]) -> None:
    m["grid"] = "../../etc"


def resources_text(m: dict[str, Any]) -> None:
    m["submissions"][0]["resources"] = "a\nb"


BYTES = (
    truncate, empty, bad_byte, nuls, dangling_link, foreign_link, directory, no_permission,
    fifo, endless_link,
)  # fmt: skip
JSON = (*BYTES, wrong_types)
CSV = (*BYTES, garbage_cell)
MANIFEST = tuple(
    _manifest_edit(e)
    for e in (
        submissions_text, jobs_text, runs_list, run_id_escapes, run_entry_text, grid_name_path,
        resources_text,
    )
)  # fmt: skip

RUN = "runs/{run}/"
TARGETS: dict[str, tuple[Callable[[Path], None], ...]] = {
    "root/sweep.json": (*JSON, *MANIFEST),
    "root/recover.jsonl": JSON,
    **{
        f"root/{RUN}{name}": JSON
        for name in ("status.json", "config.json", "summary.json", "attempts.jsonl", "events.jsonl")
    },
    **{f"root/{RUN}metrics/{s}.csv": CSV for s in contract.STREAMS},
    f"root/{RUN}checkpoints/ckpt_000000040.pt": BYTES,
    f"root/{RUN}checkpoints/ckpt_000000040.sha256": BYTES,
    "fuzz.toml": BYTES,
    "res.toml": BYTES,
}
# the run-directory files are broken in the completed run (index 0) and, for status.json, in
# every state: a truncated status.json must never turn a run with a result into a rerun
CASES: list[tuple[str, int, Callable[[Path], None]]] = [
    (target, run, brk)
    for target, breaks in TARGETS.items()
    for run in ((0, 1, 2, 3) if target.endswith("status.json") else (0,))
    for brk in breaks
]


REPORT_EVERY = 4  # report runs on every 4th case (see test_fuzz_readers)

# ---- checks


def snapshot(base: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``base`` but ``skip``: (kind, mode, sha256 or link target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            continue
        for name in dirnames + filenames:
            p = here / name
            if p == skip:
                continue
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[str(p)] = ("dir", st.st_mode)
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
            else:  # a FIFO the case planted: never opened here
                out[str(p)] = ("special", st.st_mode)
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    base = tmp_path_factory.mktemp("fuzz") / "pristine"
    base.mkdir()
    _build(base)
    run_ids = sorted(json.loads((base / "root" / "sweep.json").read_text())["runs"])
    return base, run_ids


def _args(template: list[str], base: Path) -> list[str]:
    repl = {"ROOT": base / "root", "GRID": base / "fuzz.toml", "RES": base / "res.toml"}
    out = []
    for a in template:
        a = str(repl.get(a, a))
        out.append(a.replace("OUT/", f"{base / 'out'}/"))
    return out


CASE_LIMIT_S = 120  # one command on one case: seconds normally; a guard against a hang


@contextlib.contextmanager
def _deadline(seconds: int, name: str) -> Iterator[None]:
    """Raise in the main thread after ``seconds`` (SIGALRM): a blocked read fails the case."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"{name} still running after {seconds} s (a blocked read?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_case(base: Path, runner: CliRunner, *, report: bool = True) -> list[str]:
    """Every reader command on the case at ``base`` (``report`` too when asked); the
    failures, as text."""
    failures = []
    out = base / "out"
    out.mkdir(exist_ok=True)
    before = snapshot(base, out)  # no command may change anything outside out/
    for name, (template, codes) in COMMANDS.items():
        if name == "report" and not report:
            continue
        with _deadline(CASE_LIMIT_S, name):  # a reader stuck on a FIFO fails, not hangs
            result = runner.invoke(app, _args(template, base))
        text = result.output
        exc = result.exception
        if exc is not None and not isinstance(exc, SystemExit):
            failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
        elif "Traceback" in text:
            failures.append(f"{name}: traceback in output")
        elif result.exit_code not in codes:
            codes_text = sorted(codes)
            failures.append(f"{name}: exit {result.exit_code} not in {codes_text}: {text[-300:]}")
        elif result.exit_code == 2 and "error:" not in text:
            failures.append(f"{name}: exit 2 without an `error:` line: {text[-300:]}")
        if snapshot(base, out) != before:
            failures.append(f"{name}: changed files outside its outputs")
        if any(out.iterdir()):  # export's and report's outputs: gone before the next command
            shutil.rmtree(out)
            out.mkdir()
    return failures


def _no_raster(fig: Any, path: Path) -> Path:
    """figures._save without the PNG rasterisation (90% of a report's time): the figures are
    still built from the data, which is where broken input could fail."""
    from deconcnn_cli.export import figures

    figures.plt.close(fig)
    path.write_bytes(b"")
    return path


@pytest.mark.slow
def test_fuzz_readers(
    pristine: tuple[Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each case of CASES: no traceback, a documented exit code, nothing else changed.

    ``report`` (0.5 s a case even without rasterising, 2 s with) runs on every REPORT_EVERY-th
    case; what it reads is what ``export`` reads (``collect``), which runs on every case."""
    import typer.main
    import typer.testing

    from deconcnn_cli.export import figures

    monkeypatch.setattr(figures, "_save", _no_raster)
    # typer rebuilds the click command from the signatures on every invoke (40% of the time)
    command = typer.main.get_command(app)
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: command)
    base0, run_ids = pristine
    runner = CliRunner()
    failures: list[str] = []
    for index, (target, run, brk) in enumerate(CASES):
        base = tmp_path / "case"
        if base.exists():
            for p in base.rglob("*"):  # undo mode 000 so the copy can be removed
                if not p.is_symlink():
                    p.chmod(0o755 if p.is_dir() else 0o644)
            shutil.rmtree(base)
        shutil.copytree(base0, base, symlinks=True)
        path = base / target.replace("{run}", run_ids[run])
        brk(path)
        case = f"{target.replace('{run}', f'<{STATES[run]}>')} {brk.__name__}"
        for failure in run_case(base, runner, report=index % REPORT_EVERY == 0):
            failures.append(f"{case}: {failure}")
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:40])


def test_fuzz_pristine_is_clean_enough(pristine: tuple[Path, list[str]], tmp_path: Path) -> None:
    """The unbroken root answers every command with its normal codes (the baseline the fuzz
    cases break): a failure here is a fixture problem, not a fuzz finding."""
    base = tmp_path / "case"
    shutil.copytree(pristine[0], base, symlinks=True)
    assert run_case(base, CliRunner()) == []
