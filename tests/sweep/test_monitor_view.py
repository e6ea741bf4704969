"""decon monitor as a person reads it: rendered at 80, 100 and 160 columns on sweeps of 4, 216
and 10,000 runs in every state, in a real terminal (tmux), and its ETA on known durations."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from deconcnn_cli.commands.monitor import render_report
from deconcnn_cli.commands.monitor_view import MAX_ROWS, ROW_ORDER, run_labels
from deconcnn_cli.sweep.eta import Work, estimate_eta, typical_s_per_step
from deconcnn_cli.sweep.monitor import SweepReport, observe_sweep
from tests.conftest import REPO, run_cli, subprocess_env
from tests.sweep.fakes import install_fake_scheduler, write_manifest, write_run
from tests.sweep.synthetic import write_sweep

WIDTHS = (80, 100, 160)
# size -> executor: the 216-run local sweep; 10,000 runs as SLURM arrays
SWEEPS = {4: "local", 216: "local", 10_000: "slurm"}


@pytest.fixture(
    scope="module",
    params=[
        4,
        216,
        pytest.param(10_000, marks=pytest.mark.slow),
    ],
)
def observed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SweepReport:
    """A sweep of n runs in every state (4: the first four states), as monitor observes it."""
    n = request.param
    tmp = tmp_path_factory.mktemp(f"sweep{n}")
    syn = write_sweep(tmp / "sweep", n, SWEEPS[n])
    with pytest.MonkeyPatch.context() as mp:
        install_fake_scheduler(mp, tmp / "bin", squeue=syn.squeue, sacct=syn.sacct)
        report = observe_sweep(syn.root, refresh=True)
    assert {r.run_id: r.state for r in report.rows} == syn.states
    return report


def screen(report: SweepReport, width: int) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(render_report(report, show_failed=False))
    return console.export_text()


def check_screen(text: str, report: SweepReport, width: int, *, all_rows: bool = True) -> int:
    """What a person must be able to read, whole; returns how many run rows are shown."""
    lines = [line.rstrip() for line in text.splitlines()]
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    # the counts, then the ETA, first; every count whole on its line
    body = "\n".join(lines)
    assert lines[0].startswith(f"loss_lin_slope: {len(report.rows)} run")
    for state, n in report.counts.items():
        if n:
            assert re.search(rf"(^|  ){state} {n}(  |$)", body, re.M), state
    eta = next(line for line in lines if line.startswith("ETA "))
    assert "unknown" not in eta and re.search(r"(CPU|GPU|device)-hours", eta)
    # one row per run that needs eyes, each state word, epoch, step and attempt whole
    labels = run_labels(r.run_id for r in report.rows)
    eligible = [r for r in report.rows if r.state in ROW_ORDER]
    states = "|".join(ROW_ORDER)
    by_label = {
        m["label"]: line
        for line in lines
        if (m := re.match(rf"(?P<label>\S.*?)\s+({states})\s", line))
    }
    shown = 0
    for r in eligible:
        row = [by_label[labels[r.run_id]]] if labels[r.run_id] in by_label else []
        if not row:
            continue
        shown += 1
        rate = rf"{r.steps_per_s:.1f}\s+" if r.state == "running" else ""
        pattern = (
            rf"^{re.escape(labels[r.run_id])}\s+{r.state}\s+{r.epoch:.2f}\s+"
            rf"{r.step}/{r.total_steps}\s+{rate}{r.attempts}(\s|$)"
        )
        assert re.search(pattern, row[0]), (pattern, row[0])
    assert shown >= min(len(eligible), 3)
    if all_rows:
        assert shown == min(len(eligible), MAX_ROWS)
    more = [line for line in lines if line.startswith("... ")]
    if shown < len(eligible):
        (line,) = more
        assert sum(int(n) for n in re.findall(r"(\d+) [a-z]+", line)) == len(eligible) - shown
    else:
        assert not more
    # pending runs folded: no row says pending; the folded lines count every one
    assert not re.search(r"\spending\s+\d+\.\d\d\s", body)
    folded = re.findall(r"^pending: (?:array \S+: \d+ tasks? \()?(\d+) runs?", body, re.M)
    assert sum(int(n) for n in folded) == report.counts["pending"]
    assert len(folded) <= len({r.job_id for r in report.rows if r.state == "pending"})
    return shown


@pytest.mark.parametrize("width", WIDTHS)
def test_every_column_whole_at_every_width(observed: SweepReport, width: int) -> None:
    text = screen(observed, width)
    check_screen(text, observed, width)
    header = next(line for line in text.splitlines() if line.startswith("run "))
    # a detail column where there is room; narrower, the detail moves under the row
    assert header.rstrip().endswith("detail") == (width == 160)
    if observed.counts["failed"]:
        assert "exception: ValueError: bad batch" in text


def test_labels_are_compact_and_unique() -> None:
    ids = [
        "adamw_lr0.001_wd0.0001_s0_63ab12cd90",
        "adamw_lr0.001_wd0.0001_s0_63ff000000",
        "bn_off_lr0.05_wd0.01_s12_0123456789",
        "a_done",
    ]
    assert run_labels(ids) == {
        ids[0]: "adamw lr1e-3 wd1e-4 s0 #63a",
        ids[1]: "adamw lr1e-3 wd1e-4 s0 #63f",
        ids[2]: "bn_off lr0.05 wd0.01 s12",
        "a_done": "a_done",
    }


def test_cli_prints_the_glance_at_80_columns(tmp_path: Path) -> None:
    syn = write_sweep(tmp_path / "sweep", 216, "local")
    proc = run_cli("monitor", "--root", str(syn.root), env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    report = observe_sweep(syn.root)
    check_screen(proc.stdout, report, 80)
    n_pending = sum(1 for s in syn.states.values() if s == "pending")
    assert f"pending: {n_pending} runs in job …5b2c, 2 at a time" in proc.stdout
    # --show-failed: the same glance, then each run that needs action in full
    proc = run_cli("monitor", "--show-failed", "--root", str(syn.root), env={"COLUMNS": "80"})
    check_screen(proc.stdout.split("\n\n")[0], report, 80)
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())
    assert re.search(r"^bn_off_lr\S+: failed, cause exception$", proc.stdout, re.M)


def test_json_is_unchanged(tmp_path: Path) -> None:
    syn = write_sweep(tmp_path / "sweep", 4, "local")
    out = json.loads(run_cli("monitor", "--json", "--root", str(syn.root)).stdout)
    assert set(out) == {
        "root", "grid", "time_unix", "counts", "n_runs", "eta_s", "gpu_hours",
        "gpu_hours_wasted", "hours_unit", "scheduler", "runs",
    }  # fmt: skip
    # the synthetic runs trained on the CPU: the hours say so, on screen and in --json
    assert out["hours_unit"] == "CPU"
    screen = run_cli("monitor", "--root", str(syn.root)).stdout
    assert "CPU-hours" in screen and "GPU-hours" not in screen
    helptext = " ".join(run_cli("monitor", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert "GPU- or CPU-hours" in helptext and "hours_unit" in helptext
    assert set(out["runs"][0]) == {
        "run_id", "state", "cause", "detail", "step", "total_steps", "epoch", "steps_per_s",
        "attempts", "gpu_hours", "gpu_hours_wasted", "job_id", "job_state", "executor",
        "written_state", "heartbeat_age_s", "action",
    }  # fmt: skip


def test_a_running_run_shows_the_evaluation_it_runs_beside_its_step(tmp_path: Path) -> None:
    """status.json's `action` (issue 24): monitor shows `curvature` in the step/s column of a
    running run, whose steps wait meanwhile; a run that is not running shows none."""
    syn = write_sweep(tmp_path / "sweep", 4, "local")  # running, failed, pending, stalled
    running = next(r for r, s in syn.states.items() if s == "running")
    other = next(r for r, s in syn.states.items() if s == "failed")
    for rid in (running, other):
        path = syn.root / "runs" / rid / "status.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "action": "curvature"}))
    report = observe_sweep(syn.root)
    actions = {r.run_id: r.action for r in report.rows}
    assert actions[running] == "curvature" and actions[other] is None
    text = screen(report, 80)
    rows = [ln for ln in text.splitlines() if "curvature" in ln]
    assert len(rows) == 1 and "running" in rows[0]
    assert re.search(r"\d+/\d+ +curvature ", rows[0])  # beside the step


# ---- the ETA


@pytest.mark.parametrize(
    ("work", "slots", "s_per_step", "expected"),
    [
        ([], {}, None, 0.0),
        # nothing measured: unknown
        ([Work("a", "p", "a", 100, None, False)], {"p": 2}, None, None),
        # a running run (500 s left) holds one of 2 slots; 3 runs of 1000 s queue for both
        (
            [Work("r", "p", "r", 50, 0.1, True)]
            + [Work(x, "p", x, 100, None, False) for x in "abc"],
            {"p": 2},
            10.0,
            2000.0,
        ),
        # one slot: one after another
        ([Work(x, "p", x, 100, None, False) for x in "ab"], {"p": 1}, 10.0, 2000.0),
        # a SLURM job's two runs share its slot and end with the slower; 2 jobs at once
        (
            [Work(x, "arr", j, n, None, False) for x, j, n in [("a", "1", 100), ("b", "1", 50)]]
            + [Work("c", "arr", "2", 100, None, False)],
            {"arr": 2},
            10.0,
            1000.0,
        ),
        # pools run side by side: the slowest one ends the sweep
        (
            [Work("a", "p", "a", 100, None, False), Work("b", "q", "b", 300, None, False)],
            {},
            10.0,
            3000.0,
        ),
    ],
)
def test_estimate_eta(
    work: list[Work], slots: dict[str, int], s_per_step: float | None, expected: float | None
) -> None:
    assert estimate_eta(work, slots, s_per_step).eta_s == expected


def test_typical_seconds_per_step() -> None:
    assert typical_s_per_step([(1000.0, 100), (3000.0, 100), (2000.0, 100)], [5.0]) == (20.0, 3)
    assert typical_s_per_step([], [0.5, 0.25]) == (3.0, 0)  # median of 2 s and 4 s
    assert typical_s_per_step([(0.0, 0)], []) == (None, 0)


def _local_sweep(root: Path, states: dict[str, str], parallel_runs: int = 2) -> None:
    """A local sweep: one live runner (this process) with ``parallel_runs`` slots."""
    import socket

    write_manifest(root, list(states), executor="local")
    manifest = json.loads((root / "sweep.json").read_text())
    job = {"job_id": "local-a", "run_ids": list(states), "pid": os.getpid()}
    manifest["submissions"] = [
        {
            "time_unix": time.time() - 7200,
            "executor": "local",
            "resources": "local",
            "jobs": [job | {"host": socket.gethostname()}],
        }
    ]
    (root / "sweep.json").write_text(json.dumps(manifest))
    (root / "jobs").mkdir()
    (root / "jobs" / "local-a.json").write_text(json.dumps({"parallel_runs": parallel_runs}))


def test_eta_from_completed_wall_times_and_free_slots(tmp_path: Path) -> None:
    now = time.time()
    root = tmp_path / "sweep"
    states = {f"r{i}": s for i, s in enumerate(["completed"] * 4 + ["running"] + ["pending"] * 3)}
    _local_sweep(root, states)
    out = json.loads(run_cli("monitor", "--json", "--root", str(root)).stdout)
    assert out["eta_s"] is None  # nothing measured yet: no run has completed or has a rate
    text = run_cli("monitor", "--root", str(root), env={"COLUMNS": "80"}).stdout
    assert "ETA unknown" in text and "nothing measured yet" in text
    for i in range(4):  # each completed run: 100 steps in 1000 s of wall time
        write_run(
            root,
            f"r{i}",
            "completed",
            step=100,
            device="cpu",
            attempts=[
                {"attempt": 1, "start_unix": now - 5000},
                {"attempt": 1, "event": "end", "state": "completed", "end_unix": now - 4000},
            ],
        )
    # nothing runs: the 4 left (1,000 s each) share the runner's 2 slots
    out = json.loads(run_cli("monitor", "--json", "--root", str(root)).stdout)
    assert out["eta_s"] == pytest.approx(2000.0)
    # r4 runs at 0.1 step/s, halfway: 500 s left in one slot; 3 x 1,000 s queue for both
    write_run(root, "r4", "running", step=50, steps_per_s=0.1, device="cpu")
    out = json.loads(run_cli("monitor", "--json", "--root", str(root)).stdout)
    assert out["eta_s"] == pytest.approx(2000.0)
    text = run_cli("monitor", "--root", str(root), env={"COLUMNS": "80"}).stdout
    assert "ETA 33m20s   CPU-hours" in text
    assert "ETA from 4 completed runs, 16m40s a run; 4 runs left, 1 of 2 slots busy" in text


def test_eta_of_a_slurm_array_uses_its_parallelism(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    root = tmp_path / "sweep"
    jobs = [(f"9_{k}", [f"r{2 * k}", f"r{2 * k + 1}"]) for k in range(5)]
    write_manifest(root, [r for _, rs in jobs for r in rs], jobs)
    manifest = json.loads((root / "sweep.json").read_text())
    manifest["submissions"][0]["resources"] = "slurm_local"  # array_parallelism = 2
    (root / "sweep.json").write_text(json.dumps(manifest))
    done = [
        {"attempt": 1, "start_unix": now - 5000},
        {"attempt": 1, "event": "end", "state": "completed", "end_unix": now - 4000},
    ]
    for r in ("r0", "r1"):
        write_run(root, r, "completed", step=100, attempts=done, device="cuda:0")
    write_run(root, "r2", "running", step=50, steps_per_s=0.1, device="cuda:0")  # 500 s left
    write_run(root, "r3", "running", step=80, steps_per_s=0.1, device="cuda:0")  # 200 s left
    sacct = "9_0|COMPLETED|0:0|None|n1||00:10:00\n9_1|RUNNING|0:0|None|n1||00:10:00\n"
    squeue = "9_1|RUNNING|None|n1|\n9_[2-4%2]|PENDING|JobArrayTaskLimit|(null)|\n"
    install_fake_scheduler(monkeypatch, tmp_path / "bin", squeue=squeue, sacct=sacct)
    report = observe_sweep(root, refresh=True)
    # job 9_1 ends at 500 s; 3 jobs of 1,000 s: one from 0 s, one from 500 s, one from 1000 s
    assert report.eta_s == pytest.approx(2000.0)
    assert report.hours_unit == "GPU" and report.pools["9"].slots == 2
    text = screen(report, 80)
    assert "pending: array 9: 3 tasks (6 runs), 2 at a time" in text


# ---- in a real terminal


def _tmux(sock: Path, *args: str) -> str:
    """A command to this test's own tmux server (a CI shell may have no TERM: give one)."""
    cmd = ["tmux", "-S", str(sock), *args]
    env = {**os.environ, "TERM": "xterm-256color"}
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (make test installs it)")
def test_watch_in_tmux_at_80_columns(tmp_path: Path) -> None:
    syn = write_sweep(tmp_path / "sweep", 216, "local")
    sock = tmp_path / "tmux.sock"
    env = subprocess_env() | {"PYTHONPATH": str(REPO)}
    cmd = " ".join(  # the pane's own size, not a COLUMNS/LINES this shell may carry
        [
            "env -u COLUMNS -u LINES",
            *(f"{k}={shlex.quote(env[k])}" for k in ("PATH", "PYTHONPATH", "OMP_NUM_THREADS")),
            shlex.quote(sys.executable),
            "-m deconcnn_cli monitor --watch --interval 1 --root",
            shlex.quote(str(syn.root)),
        ]
    )
    _tmux(sock, "-f", "/dev/null", "new-session", "-d", "-x", "80", "-y", "24", "-s", "m", cmd)
    try:
        text, deadline = "", time.monotonic() + 60
        while "ETA " not in text and time.monotonic() < deadline:
            time.sleep(0.5)
            text = _tmux(sock, "capture-pane", "-p", "-t", "m")
        assert "ETA " in text, f"monitor --watch drew nothing in 60 s: {text!r}"
        time.sleep(3.0)  # three redraws at --interval 1
        text = _tmux(sock, "capture-pane", "-p", "-t", "m")
        report = observe_sweep(syn.root)
        assert text.splitlines()[0].startswith("loss_lin_slope: 216 runs")
        assert check_screen(text, report, 80, all_rows=False) >= 5
        # redrawn in place: nothing went into the scrollback
        history = _tmux(sock, "display-message", "-p", "-t", "m", "#{history_size}").strip()
        assert history == "0", text
        _tmux(sock, "send-keys", "-t", "m", "C-c")
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True)


def test_docs_show_the_glance_as_it_prints_at_80_columns() -> None:
    """README and docs/cluster.md show `decon monitor` at 80 columns, in today's layout."""
    for doc in (REPO / "README.md", REPO / "docs" / "cluster.md"):
        (block,) = re.findall(r"```text\n\$ decon monitor[^\n]*\n(.*?)```", doc.read_text(), re.S)
        lines = block.splitlines()
        assert all(len(line) <= 80 for line in lines), doc
        assert re.match(r"loss_lin_slope: 216 runs  pending \d+  running \d+", lines[0])
        eta = next(line for line in lines[1:3] if line.startswith("ETA "))  # counts may wrap
        assert "unknown" not in eta
        (header,) = [line for line in lines if line.startswith("run ")]
        assert header.split() == ["run", "state", "epoch", "step", "step/s", "att", "job"]
        assert any(line.startswith("pending: ") for line in lines)
        assert not re.search(r"\spending\s+\d+\.\d\d\s", block)


def test_durations_stay_short_whatever_the_rate():
    from deconcnn_cli.commands.monitor_view import duration

    assert [duration(s) for s in (None, 59, 3700, 2 * 86400 + 3600)] == [
        "unknown", "0m59s", "1h01m", "2d01h",
    ]  # fmt: skip
    assert duration(1e300) == ">999d" and duration(float("inf")) == "unknown"
    assert duration(float("nan")) == "unknown"
