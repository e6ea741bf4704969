"""TensorBoard event files of a run (<run>/tb/): read back with TensorBoard's own reader,
equal to the streams after a SIGKILL and a resume; bad input never stops the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_crc

from deconcnn_cli import tbevents
from deconcnn_cli.config import config_hash
from deconcnn_cli.contract import TENSORBOARD_DIR, read_events, read_stream
from deconcnn_cli.training.checkpoint import list_checkpoints
from deconcnn_cli.training.tensorboard import RunEvents
from tests.conftest import REPO, TINY, only_run, run_cli, subprocess_env
from tests.tensorboard_check import assert_events_match_streams, read_scalars

ARGS = ["train", "--variant", "base", *TINY, "--seed", "3"]
# the list: per step, per validation, per curvature / noise / shape evaluation
REQUIRED_TAGS = {
    "train/loss_train_nats", "train/acc_train", "train/lr", "val/loss_val_nats", "val/acc_val",
    "curvature/lambda_max", "curvature/hutch_trace", "curvature/hutch_trace_sem",
    "curvature/sharpness_norm", "noise/grad_noise_scale", "noise/residual_power",
    "shape/alpha_full", "shape/alpha_early",
}  # fmt: skip


def _steps_in_file(path: Path) -> list[int]:
    return [e.step for e in EventFileLoader(str(path)).Load() if e.HasField("summary")]


def test_sigkill_then_resume_events_equal_the_streams(tmp_path: Path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "deconcnn_cli", *ARGS, "--root", str(tmp_path)],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip

    def past_checkpoint() -> bool:  # killed with steps logged past its checkpoint
        runs = [p for p in tmp_path.iterdir() if p.is_dir()]
        if not runs or not list_checkpoints(runs[0]):
            return False
        status = json.loads((runs[0] / "status.json").read_text())
        return status.get("step", 0) > list_checkpoints(runs[0])[0][0]

    try:
        deadline = time.monotonic() + 600
        while not past_checkpoint():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = only_run(tmp_path)
    (first,) = sorted((run / TENSORBOARD_DIR).iterdir())
    killed_at = max(_steps_in_file(first))
    resumed = run_cli("train", "--run-dir", str(run), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    resumed_from = [a for a in map(json.loads, (run / "attempts.jsonl").read_text().splitlines())
                    if a.get("event") != "end"][1]["resumed_from_step"]  # fmt: skip
    assert 0 < resumed_from <= killed_at  # the first file holds rows the resume replays
    files = sorted((run / TENSORBOARD_DIR).iterdir())
    assert len(files) == 2 and "tfevents" in files[1].name
    assert_events_match_streams(run, run / TENSORBOARD_DIR)
    assert set(read_scalars(run / TENSORBOARD_DIR)) >= REQUIRED_TAGS
    assert not [e for e in read_events(run) if "TensorBoard" in e["message"]]


def _cfg(*overrides: str):
    from deconcnn_cli.config import load_run_config

    return load_run_config(
        variant="base",
        profiles=["smoke"],
        overrides=["data.image_size=8", "schedule.epochs=1", "schedule.warmup_epochs=0.5",
                   *overrides],
        flags={"seed": 3},
    )  # fmt: skip


def _train(cfg, run: Path):
    from deconcnn_cli.training.loop import train_run
    from deconcnn_cli.training.rundir import prepare_run_dir

    prepare_run_dir(cfg, run)
    return train_run(cfg, run)


def _tb_warnings(run: Path) -> list[dict]:
    return [e for e in read_events(run) if "TensorBoard" in e["message"]]


def test_an_unwritable_tb_folder_leaves_the_run_going(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / TENSORBOARD_DIR).write_text("not a folder")  # root writes anywhere: a file blocks it
    assert _train(_cfg(), run).state == "completed"
    assert len(read_stream(run / "metrics" / "step.csv")) == 13
    (warning,) = _tb_warnings(run)
    assert warning["level"] == "warning" and "cannot open" in warning["message"]
    assert (run / TENSORBOARD_DIR).read_text() == "not a folder"  # nothing of it was lost


def test_a_linked_tb_folder_is_not_written_through(tmp_path: Path):
    run, elsewhere = tmp_path / "run", tmp_path / "someone_elses"
    run.mkdir()
    elsewhere.mkdir()
    (run / TENSORBOARD_DIR).symlink_to(elsewhere)
    assert _train(_cfg(), run).state == "completed"
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    (warning,) = _tb_warnings(run)
    assert warning["level"] == "warning" and "is a link" in warning["message"]


def test_a_full_disk_leaves_the_run_going(tmp_path: Path, mocker):
    """Every event write meets ENOSPC (/dev/full): one warning, the streams all there."""
    real_open = open
    mocker.patch.object(tbevents, "open", create=True,
                        side_effect=lambda _path, mode: real_open("/dev/full", mode))  # fmt: skip
    run = tmp_path / "run"
    assert _train(_cfg(), run).state == "completed"
    assert len(read_stream(run / "metrics" / "step.csv")) == 13
    (warning,) = _tb_warnings(run)
    assert warning["exception_type"] == "OSError" and "No space left" in warning["message"]


def test_a_write_error_mid_run_turns_the_events_off_once(tmp_path: Path):
    logged: list[tuple] = []
    events = RunEvents(tmp_path, "on", lambda *a, **k: logged.append((a, k)))
    events.open(purge_step=0)
    events.rows("step", [{"step": 0, "loss_train_nats": 2.0}])
    assert events.active and not logged
    events._file._file = open("/dev/full", "wb", buffering=0)  # noqa: SIM115 (the disk is full now)
    events.rows("step", [{"step": 1, "loss_train_nats": 1.5}])
    events.rows("step", [{"step": 2, "loss_train_nats": 1.0}])  # off: no second warning
    events.close()
    assert not events.active
    ((level, message), fields), = logged  # fmt: skip
    assert level == "warning" and "cannot write" in message
    assert fields["exception_type"] == "OSError"


@pytest.mark.parametrize("mode, level", [("on", "warning"), ("auto", "info")])
def test_the_library_missing_is_an_event_not_a_failure(tmp_path: Path, mocker, mode, level):
    mocker.patch.dict(sys.modules, {"tensorboard.compat.proto.event_pb2": None})
    run = tmp_path / "run"
    assert _train(_cfg(f"logging.tensorboard={mode}"), run).state == "completed"
    assert not (run / TENSORBOARD_DIR).exists()
    (note,) = [e for e in read_events(run) if "no TensorBoard" in e["message"]]
    assert note["level"] == level and "deconcnn_cli[tensorboard]" in note["message"]


def test_off_writes_nothing_and_is_not_part_of_the_run_identity(tmp_path: Path):
    cfg = _cfg("logging.tensorboard=off")
    assert config_hash(cfg) == config_hash(_cfg()) == config_hash(_cfg("logging.tensorboard=on"))
    run = tmp_path / "run"
    assert _train(cfg, run).state == "completed"
    assert not (run / TENSORBOARD_DIR).exists() and not _tb_warnings(run)


def test_records_carry_tensorboards_checksum():
    data = os.urandom(300)
    assert tbevents.masked_crc32c(data) == tb_crc(data)
    assert tbevents.masked_crc32c(b"") == tb_crc(b"")


def test_a_bad_run_config_value_names_the_field(tmp_path: Path):
    proc = run_cli(*ARGS, "--root", str(tmp_path), "--set", "logging.tensorboard=yes")
    assert proc.returncode == 2 and "logging.tensorboard" in proc.stderr
    assert "Traceback" not in proc.stderr
