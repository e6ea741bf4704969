"""Kill -9 and resume: bit-identical streams and weights; corrupt checkpoints; divergence."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deconcnn_cli import runenv
from deconcnn_cli.contract import read_attempts, read_events, read_stream
from deconcnn_cli.fileio import read_json
from deconcnn_cli.training.checkpoint import list_checkpoints, load_latest_checkpoint
from tests.conftest import REPO, TINY, only_run, run_cli, subprocess_env

ARGS = ["train", "--variant", "base", *TINY, "--seed", "3"]
STREAMS = ("step", "val", "curvature", "noise", "shape")


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    state, _ = load_latest_checkpoint(run)
    assert state is not None
    return state["model"]


def _start(root: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deconcnn_cli", *ARGS, "--root", str(root)],
        cwd=REPO,
        env=subprocess_env() | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ref")
    proc = run_cli(*ARGS, "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    return only_run(root)


def test_sigkill_then_resume_is_bit_identical(reference: Path, tmp_path: Path):
    proc = _start(tmp_path)

    # kill once a checkpoint exists and the run has logged steps past it (mid-epoch 2)
    def past_checkpoint() -> bool:
        runs = [p for p in tmp_path.iterdir() if p.is_dir()]
        if not runs or not list_checkpoints(runs[0]):
            return False
        status = json.loads((runs[0] / "status.json").read_text())
        return status.get("step", 0) > list_checkpoints(runs[0])[0][0]

    _wait_for(past_checkpoint, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(tmp_path)
    assert json.loads((run / "status.json").read_text())["state"] == "running"  # died mid-run

    resumed = run_cli("train", "--run-dir", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name in STREAMS:
        got = (run / "metrics" / f"{name}.csv").read_text()
        assert got == (reference / "metrics" / f"{name}.csv").read_text(), name
    ref_w, got_w = _final_weights(reference), _final_weights(run)
    assert ref_w.keys() == got_w.keys()
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "completed" and status["attempt"] == 2
    attempts = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert attempts[1]["resumed_from_step"] > 0


def test_sigterm_checkpoints_and_exits_resumably(reference: Path, tmp_path: Path):
    proc = _start(tmp_path)
    _wait_for(
        lambda: any(
            p.is_dir() and (p / "metrics" / "step.csv").exists() for p in tmp_path.iterdir()
        ),
        proc,
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    run = only_run(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and "SIGTERM" in status["reason"]
    assert list_checkpoints(run)[0][0] == status["step"]  # checkpoint at the stop step
    assert run_cli("train", "--run-dir", str(run), "--quiet").returncode == 0
    for name in STREAMS:
        assert (run / "metrics" / f"{name}.csv").read_text() == (
            reference / "metrics" / f"{name}.csv"
        ).read_text(), name


def test_a_held_run_waits_until_a_signal_or_its_release_file(reference: Path, tmp_path: Path):
    """$DECON_HOLD (the SLURM tests' hook): the run stops advancing at the named step until a
    stop signal (it then checkpoints there) or the release file; the streams stay exact."""
    release = tmp_path / "release"
    env = {runenv.HOLD_ENV: f"20,30:{release}"}
    root = tmp_path / "runs"
    proc = _start(root, env)
    _wait_for(lambda: _step(root) == 20, proc)
    run = only_run(root)
    time.sleep(1.5)  # a run that did not wait would move on (and stop past 20 below)
    assert _step(root) == 20 and proc.poll() is None
    held = [e for e in read_events(run) if runenv.HOLD_ENV in e.get("message", "")]
    assert [e["step"] for e in held] == [19]  # tied to the last step done
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    status = read_json(run / "status.json")
    assert (status["state"], status["step"], status["last_checkpoint_step"]) == (
        "interrupted", 20, 20
    )  # fmt: skip

    proc = _start_resume(run, env)  # resumes after 20: held again at 30 only
    _wait_for(lambda: _step(root) == 30, proc)
    time.sleep(1.5)
    assert _step(root) == 30 and proc.poll() is None
    release.touch()
    assert proc.wait(timeout=300) == 0
    held = [e for e in read_events(run) if runenv.HOLD_ENV in e.get("message", "")]
    assert [e["step"] for e in held] == [19, 29]  # the first kept by the resume after it
    _assert_streams_equal(run, reference)


def test_a_malformed_hold_is_refused(tmp_path: Path):
    for bad in ("20", "x:/tmp/r", "0:/tmp/r", "20:", "20,,30:/tmp/r"):
        with pytest.raises(ValueError, match="DECON_HOLD"):
            runenv.hold_from_env({runenv.HOLD_ENV: bad})
    assert runenv.hold_from_env({}) is None
    hold = runenv.hold_from_env({runenv.HOLD_ENV: "5,30:/tmp/a:b"})
    assert hold == runenv.Hold(frozenset({5, 30}), Path("/tmp/a:b"))


def _step(root: Path) -> int:
    """The step status.json shows (0 before the run directory exists)."""
    runs = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    status = (read_json(runs[0] / "status.json") or {}) if runs else {}
    return int(status.get("step") or 0)


def test_corrupt_newest_checkpoint_falls_back(reference: Path, tmp_path: Path):
    proc = run_cli(*ARGS, "--root", str(tmp_path), "--max-steps", "30")
    assert proc.returncode == 3, proc.stderr  # stopped on request, resumable
    run = only_run(tmp_path)
    (newest_step, newest), (older_step, _) = list_checkpoints(run)[:2]
    assert newest_step == 30 and older_step == 26
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum no longer matches
    newest.write_bytes(bytes(data))
    state, skipped = load_latest_checkpoint(run)
    assert state["next_step"] == older_step and "checksum" in skipped[0]
    assert run_cli("train", "--run-dir", str(run), "--quiet").returncode == 0
    for name in STREAMS:
        assert (run / "metrics" / f"{name}.csv").read_text() == (
            reference / "metrics" / f"{name}.csv"
        ).read_text(), name
    events = (run / "events.jsonl").read_text()
    assert "skipped checkpoint" in events


def test_huge_lr_is_recorded_as_diverged(tmp_path: Path):
    proc = run_cli(*ARGS, "--root", str(tmp_path), "--lr", "1e6")
    assert proc.returncode == 0, proc.stderr  # a result, not an error
    assert "diverged" in proc.stdout
    run = only_run(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "diverged" and "non-finite" in status["reason"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["state"] == "diverged"
    rows = (run / "metrics" / "step.csv").read_text().splitlines()
    assert rows[-1].split(",")[2] in ("nan", "inf", "-inf")  # the diverging step is kept
    assert int(rows[-1].split(",")[0]) == status["step"] - 1
    for name in ("val", "curvature", "noise", "shape"):  # no metric row past the divergence
        rows_of = read_stream(run / "metrics" / f"{name}.csv")
        assert all(int(r["step"]) < status["step"] for r in rows_of), name
    again = run_cli("train", "--run-dir", str(run), "--quiet")  # never retried
    assert again.returncode == 0 and "already diverged" in again.stdout


# ---- stops at any step, in-process for speed; compared with the
# subprocess reference above (both on one torch thread)


def _cfg(*overrides: str):
    from deconcnn_cli.config import load_run_config

    return load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=["data.image_size=8", *overrides],
        flags={"seed": 3},
    )


def _segment(cfg, run: Path, stop_after: int | None):
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    prepare_run_dir(cfg, run)
    return train_run(cfg, run, stop_after_steps=stop_after)


def _assert_streams_equal(run: Path, reference: Path) -> None:
    for name in STREAMS:
        got = (run / "metrics" / f"{name}.csv").read_text()
        assert got == (reference / "metrics" / f"{name}.csv").read_text(), name


def test_stop_at_any_step_then_resume_gives_identical_streams(reference: Path, tmp_path: Path):
    """Stops at steps that are neither flush (8) nor validation (3, 6, 9, 12) boundaries."""
    cfg, run = _cfg(), tmp_path / "run"
    for stop in (5, 17, 31):
        result = _segment(cfg, run, stop)
        assert (result.state, result.steps_done, result.exit_code) == ("interrupted", stop, 3)
        rows = read_stream(run / "metrics" / "step.csv")
        assert [int(r["step"]) for r in rows] == list(range(stop))  # the stop step's row too
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "interrupted" and status["step"] == stop
        assert status["last_checkpoint_step"] == stop == list_checkpoints(run)[0][0]
    orphan = run / "checkpoints" / ".ckpt_000000099.pt.tmp4242"  # a save killed by SIGKILL
    orphan.write_bytes(b"x" * 1000)
    assert _segment(cfg, run, None).state == "completed"
    assert not orphan.exists()
    _assert_streams_equal(run, reference)
    events = [e for e in read_events(run) if "step" in e]
    keys = [(e["message"], e["step"]) for e in events]
    assert len(keys) == len(set(keys))  # no warning repeated by a resume
    attempts = read_attempts(run)
    starts = [a for a in attempts if a.get("event") != "end"]
    ends = [a for a in attempts if a.get("event") == "end"]
    assert [a["resumed_from_step"] for a in starts] == [0, 5, 17, 31]
    assert [(a["state"], a["exit_code"]) for a in ends] == [("interrupted", 3)] * 3 + [
        ("completed", 0)
    ]


def test_stop_at_non_checkpoint_epoch_end_and_on_the_final_step(reference: Path, tmp_path: Path):
    cfg, run = _cfg("cadence.checkpoint_every_epochs=2"), tmp_path / "run"
    result = _segment(cfg, run, 13)  # the end of epoch 1, which is no checkpoint epoch
    assert (result.state, result.steps_done) == ("interrupted", 13)
    assert [s for s, _ in list_checkpoints(run)] == [13]
    assert json.loads((run / "status.json").read_text())["last_checkpoint_step"] == 13
    result = _segment(cfg, run, 39)  # a stop asked for on the final step completes the run
    assert (result.state, result.steps_done, result.exit_code) == ("completed", 39, 0)
    assert json.loads((run / "summary.json").read_text())["state"] == "completed"
    _assert_streams_equal(run, reference)


def test_failure_during_setup_is_recorded(tmp_path: Path, mocker):
    """Data loading fails before the first step: status, attempt lines and the traceback."""
    cfg, run = _cfg(), tmp_path / "run"
    mocker.patch(
        "deconcnn_cli.training.attempt.load_splits", side_effect=OSError("data volume gone")
    )
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    prepare_run_dir(cfg, run)
    threads_before = torch.get_num_threads()
    with pytest.raises(OSError, match="data volume gone"):
        train_run(cfg, run, threads=threads_before + 1)
    assert torch.get_num_threads() == threads_before  # the caller's process is left as it was
    status = json.loads((run / "status.json").read_text())
    assert status["threads"] == threads_before + 1
    assert status["state"] == "failed" and status["reason"] == "OSError: data volume gone"
    assert status["exception_type"] == "OSError" and status["attempt"] == 1
    start, end = read_attempts(run)
    assert start["attempt"] == end["attempt"] == 1 and start["pid"] == os.getpid()
    assert end["event"] == "end" and end["exit_code"] == 1
    assert end["exception_type"] == "OSError" and end["state"] == "failed"
    (error,) = [e for e in read_events(run) if e["level"] == "error"]
    assert "data volume gone" in error["traceback"] and "load_splits" in error["traceback"]


def test_a_failing_curvature_evaluation_is_a_nan_row(tmp_path: Path, mocker):
    """A CUDA OOM inside curvature (two runs on one card) no longer kills the run."""
    cfg, run = _cfg("schedule.epochs=1", "schedule.warmup_epochs=0.5"), tmp_path / "run"
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    mocker.patch("deconcnn_cli.training.measure.curvature_row", side_effect=oom)
    freed = mocker.patch("torch.cuda.empty_cache")
    assert _segment(cfg, run, None).state == "completed"
    rows = read_stream(run / "metrics" / "curvature.csv")
    assert [int(r["step"]) for r in rows] == [0, 10]
    assert all(r["lambda_max"] == "nan" and r["hutch_trace"] == "nan" for r in rows)
    warnings = [e for e in read_events(run) if e.get("exception_type") == "OutOfMemoryError"]
    assert [e["step"] for e in warnings] == [0, 10] and freed.call_count == 2


def _start_resume(run: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deconcnn_cli", "train", "--run-dir", str(run), "--quiet"],
        cwd=REPO,
        env=subprocess_env() | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _running_as(root: Path, proc: subprocess.Popen) -> bool:
    runs = [p for p in root.iterdir() if p.is_dir()]
    status = (read_json(runs[0] / "status.json") or {}) if runs else {}
    return status.get("state") == "running" and status.get("pid") == proc.pid


@pytest.mark.slow
def test_sigterm_at_random_moments_then_resume_is_identical(reference: Path, tmp_path: Path):
    """Real subprocesses stopped by SIGTERM at seeded random moments (set-up included), each
    resumed; a second process on a live run is refused with exit code 4."""
    rng = random.Random(6)
    proc = _start(tmp_path)
    _wait_for(lambda: _running_as(tmp_path, proc), proc)
    run = only_run(tmp_path)
    second = run_cli("train", "--run-dir", str(run), "--quiet")
    assert second.returncode == 4, second.stderr
    assert f"pid {proc.pid}" in second.stderr and "Traceback" not in second.stderr
    codes = []
    for attempt in range(4):
        if attempt:
            proc = _start_resume(run)
            _wait_for(lambda p=proc: _running_as(tmp_path, p), proc)
        time.sleep(rng.uniform(0.0, 4.0))
        proc.send_signal(signal.SIGTERM)
        codes.append(proc.wait(timeout=300))
        status = read_json(run / "status.json")
        if codes[-1] == 0:  # it finished before the signal
            break
        assert codes[-1] == 128 + signal.SIGTERM, (status, proc.stderr.read().decode())
        assert status["state"] == "interrupted" and "SIGTERM" in status["reason"]
        assert status["last_checkpoint_step"] in (None, status["step"])
        if status["step"]:
            assert list_checkpoints(run)[0][0] == status["step"]
    assert run_cli("train", "--run-dir", str(run), "--quiet").returncode == 0
    _assert_streams_equal(run, reference)
    ends = [a for a in read_attempts(run) if a.get("event") == "end"]
    assert [a["exit_code"] for a in ends][: len(codes)] == codes


def test_last_checkpoint_step_never_names_a_skipped_checkpoint(tmp_path: Path):
    from deconcnn_cli.training.loop import train_run

    cfg, run = _cfg(), tmp_path / "run"
    _segment(cfg, run, 30)
    (newest_step, newest), (older_step, _) = list_checkpoints(run)[:2]
    assert (newest_step, older_step) == (30, 26)
    newest.write_bytes(b"truncated by a full disk")
    seen = []
    status_path = run / "status.json"
    train_run(
        cfg,
        run,
        stop_after_steps=31,
        on_progress=lambda p: seen.append(
            (p.steps_done, read_json(status_path)["last_checkpoint_step"])
        ),
    )
    assert seen[0] == (26, 26)  # the resume itself is reported first
    assert seen[1] == (30, 26)  # resumed from 26: the corrupt 30 is not named
    assert read_json(status_path)["last_checkpoint_step"] == 31


def test_a_run_dir_holding_only_config_json_starts_with_threads(tmp_path: Path):
    """What `decon sweep submit` leaves (config.json only, written without torch) starts."""
    from deconcnn_cli.training.rundir import prepare_run_dir

    run = tmp_path / "run"
    prepare_run_dir(_cfg(), run)
    assert [p.name for p in run.iterdir()] == ["config.json"]
    proc = run_cli("train", "--run-dir", str(run), "--threads", "1", "--max-steps", "2", "-q")
    assert proc.returncode == 3, proc.stderr
    status = read_json(run / "status.json")
    assert status["threads"] == 1 and status["step"] == 2 and status["state"] == "interrupted"
    assert read_attempts(run)[0]["threads"] == 1
    again = run_cli("train", "--run-dir", str(run), "--threads", "2", "--max-steps", "3", "-q")
    assert again.returncode == 3, again.stderr
    assert [a["threads"] for a in read_attempts(run) if a.get("event") != "end"] == [1, 2]
    (warning,) = [e for e in read_events(run) if "previous attempt had 1" in e["message"]]
    assert warning["attempt"] == 2


def test_contract_and_run_dir_creation_do_not_import_torch():
    code = (
        "import sys\n"
        "import deconcnn_cli.contract, deconcnn_cli.config, deconcnn_cli.training.rundir\n"
        "from deconcnn_cli.training.rundir import prepare_run_dir, config_record\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_a_lost_status_json_resumes_in_the_checkpoints_precision(tmp_path: Path, mocker):
    """status.json normally carries the precision ``auto`` chose at the first start; without
    it the checkpoint's precision wins over a fresh choice. The first attempt's device is
    faked at the precision choice: ``auto`` picks bf16 as on an A100 (fp32 on this CPU)."""
    from deconcnn_cli.training import attempt
    from deconcnn_cli.training.device import Precision

    run, cfg = tmp_path / "run", _cfg()
    on_a100 = mocker.patch.object(
        attempt, "resolve_precision", side_effect=lambda spec, device, stored=None: Precision(
            stored or "bf16", device.type
        )
    )  # fmt: skip
    first = _segment(cfg, run, 13)
    assert (first.state, first.steps_done) == ("interrupted", 13)
    assert json.loads((run / "status.json").read_text())["precision"] == "bf16"
    mocker.stop(on_a100)
    (run / "status.json").unlink()
    assert _segment(cfg, run, None).state == "completed"
    assert json.loads((run / "status.json").read_text())["precision"] == "bf16"
    assert [e["precision"] for e in read_events(run) if "precision" in e] == ["bf16"]
    assert load_latest_checkpoint(run)[0]["precision"] == "bf16"


def test_each_attempt_records_where_its_time_went(tmp_path: Path):
    """status.json's ``timing`` and each attempt's end line: wall time, the seconds of every
    timed action, and the analysis overhead (curvature + noise + shape over the rest)."""
    cfg, run = _cfg(), tmp_path / "run"
    assert _segment(cfg, run, 17).state == "interrupted"
    assert _segment(cfg, run, None).state == "completed"
    ends = [a for a in read_attempts(run) if a.get("event") == "end"]
    assert len(ends) == 2
    for end in ends:
        t = end["timing"]
        parts = [t[f"{k}_s"] for k in ("curvature", "noise", "shape", "validation", "checkpoint")]
        assert all(p >= 0 for p in parts) and sum(parts) < t["wall_s"]
        analysis = t["curvature_s"] + t["noise_s"] + t["shape_s"]
        expected = analysis / (t["wall_s"] - analysis)  # from the same (rounded) seconds
        assert t["analysis_overhead"] == pytest.approx(expected, rel=1e-6, abs=1e-5)
        assert t["curvature_s"] > 0 and t["validation_s"] > 0 and t["checkpoint_s"] > 0
    curvature_rows = read_stream(run / "metrics" / "curvature.csv")
    noise_rows = read_stream(run / "metrics" / "noise.csv")
    assert curvature_rows and noise_rows  # the smoke profile measures both
    assert ends[1]["timing"]["noise_s"] > 0
    status = json.loads((run / "status.json").read_text())
    assert status["timing"] == ends[-1]["timing"]


def test_time_cadence_skips_epoch_checkpoints_but_not_stop_or_end(tmp_path: Path):
    """The default cadence (10 minutes) on a run far shorter: no epoch-end checkpoint, one at
    the stop, the resume exact from it, one at the end."""
    cfg = _cfg(
        "cadence.checkpoint_every_minutes=10",
        "cadence.curvature_every_steps=0",
        "cadence.noise_every_epochs=0",
    )
    run = tmp_path / "run"
    assert _segment(cfg, run, 20).state == "interrupted"  # past the epoch end at step 13
    assert [step for step, _ in list_checkpoints(run)] == [20]
    events = read_events(run)
    assert _segment(cfg, run, None).state == "completed"
    assert [step for step, _ in list_checkpoints(run)] == [39, 20]  # the newest two kept
    assert read_json(run / "status.json")["last_checkpoint_step"] == 39
    assert not [e for e in events if e.get("level") == "error"]
