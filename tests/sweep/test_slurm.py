"""The SLURM suite: real submissions to a real (local, single-node) SLURM.

``make test-slurm`` starts one (scripts/slurm-local/start.sh) and runs these; elsewhere they
are deselected with a one-line note (conftest.py). Runs are tiny CPU runs on digits; the two
fake GPUs of the local SLURM stand in for the cards, so each job holds two runs, as on the
RTX 8000 cluster. No assertion races a run's own progress: a signal meant for a training run
finds it held at a named step (``$DECON_HOLD``), and a state read while the runs go on
accepts every state they can have reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deconcnn_cli import contract, runenv
from deconcnn_cli.sweep.grid import expand_grid_runs
from deconcnn_cli.sweep.profiles import load_grid
from deconcnn_cli.sweep.store import SweepStore
from deconcnn_cli.sweep.submit import wait_done
from tests.conftest import REPO, run_cli
from tests.factories import tiny_grid
from tests.sweep.container_fakes import calls, no_slurm_path, write_stand_in
from tests.sweep.test_mps import write_fake_mps

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _submit_cmd(root: Path, grid: str, resources: str) -> list[str]:
    return [
        sys.executable, "-m", "deconcnn_cli", "submit", "--grid", grid,
        "--resources", resources, "--root", str(root),
    ]  # fmt: skip


def _wait(store: SweepStore, submission: dict, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not wait_done(store, submission):
        assert time.monotonic() < deadline, f"jobs still running after {timeout_s} s"
        time.sleep(3)


def _tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"    ({path}: {exc.strerror})"
    return "\n".join(f"    {line}" for line in lines[-n:]) or "    (empty)"


def diagnosis(store: SweepStore) -> str:
    """What a failed SLURM test prints: every job of the sweep (its id, its sacct states and
    the last lines of its log) and every run (its id, state, step and the last lines of its
    log), so that a rare failure can be understood from CI's output alone."""
    out = ["", "---- diagnosis ----"]
    try:
        subs = store.read_manifest()["submissions"]
    except Exception as exc:  # noqa: BLE001 - a diagnosis never hides the failure
        return f"\n(no manifest: {exc})"
    for sub in subs:
        for job in sub["jobs"]:
            jid = job["job_id"]
            acct = subprocess.run(
                ["sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", jid],
                capture_output=True, text=True,
            )  # fmt: skip
            states = " ".join(acct.stdout.split()) or acct.stderr.strip()
            log = store.jobs_dir / jid / f"{jid}_0_log.out"
            out += [f"job {jid} (runs {', '.join(job['run_ids'])}): {states}", f"  {log}:"]
            out.append(_tail(log))
            for rid in job["run_ids"]:
                view = contract.view_run(store.run_dir(rid))
                out.append(f"run {rid}: {view.state}, step {view.steps_done}/{view.total_steps}")
                out += [f"  {store.run_dir(rid) / contract.LOG_FILE}:"]
                out.append(_tail(store.run_dir(rid) / contract.LOG_FILE))
    return "\n".join(out)


@contextlib.contextmanager
def _explained(store: SweepStore):  # noqa: ANN202
    """An assertion that fails inside names the jobs and runs, with the end of their logs."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}{diagnosis(store)}") from exc


@contextlib.contextmanager
def _released_and_cancelled(release: Path, job_ids: list[str]):  # noqa: ANN202
    """On the way out let runs held by ``$DECON_HOLD`` go; on a failure also cancel the jobs
    (a failed test must not leave the node busy for the next one)."""
    try:
        yield
    except BaseException:
        subprocess.run(["scancel", *job_ids], capture_output=True)
        raise
    finally:
        release.touch()


def _skip_reason(submit_output: str, run_id: str) -> str:
    """Why ``decon submit`` skipped ``run_id`` (its line under "skipped (N):")."""
    (line,) = [x for x in submit_output.splitlines() if x.strip().startswith(f"{run_id}: ")]
    return line.split(": ", 1)[1].strip()


def _sacct_states(job_ids: list[str], duplicates: bool = False) -> list[tuple[str, str]]:
    """(job id, state) rows once the jobs have left the queue (runs end a moment before)."""
    cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)]
    deadline = time.monotonic() + 120
    while True:
        out = subprocess.run(cmd + (["-D"] if duplicates else []), capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        lines = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
        rows = [(job, state.split()[0]) for job, state, *_ in lines]  # "CANCELLED by 0"
        if not {"RUNNING", "COMPLETING", "PENDING"} & {s for _, s in rows}:
            return rows  # type: ignore[return-value]
        assert time.monotonic() < deadline, rows
        time.sleep(2)


def test_concurrent_submits_make_no_duplicates_and_the_smoke_grid_completes(tmp_path):
    root = tmp_path / "sweep"
    cmd = _submit_cmd(root, "smoke", "slurm_local")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=ENV, cwd=REPO)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    manifest = json.loads((root / "sweep.json").read_text())
    (sub,) = manifest["submissions"]  # the second submit found everything queued
    ids = [rid for job in sub["jobs"] for rid in job["run_ids"]]
    assert sorted(ids) == sorted(manifest["runs"]) and len(ids) == 4
    assert len(sub["jobs"]) == 2 and all(len(j["run_ids"]) == 2 for j in sub["jobs"])
    # the second submit skipped every run as the first one's, in whatever state the first
    # job had reached by then (queued, started, even finished: a matter of speed)
    second = next(out for out, _ in outs if "nothing to submit" in out)
    reasons = {rid: _skip_reason(second, rid) for rid in ids}
    assert all(r.startswith(("queued in job", "live", "completed")) for r in reasons.values()), (
        reasons
    )
    store = SweepStore(root)
    with _explained(store):
        _wait(store, sub)
        for rid in ids:
            view = contract.view_run(store.run_dir(rid))
            assert view.state == "completed" and view.steps_done == view.total_steps == 26
            assert contract.read_summary(store.run_dir(rid))["state"] == "completed"
        job_ids = [j["job_id"] for j in sub["jobs"]]
        assert sorted(_sacct_states(job_ids)) == sorted((j, "COMPLETED") for j in job_ids)


def _container_section(tmp_path: Path) -> str:
    """A [container] for the stand-in runtime: an image and an overlay that exist, the test's
    own python inside, a setup line."""
    (tmp_path / "decon.sif").write_bytes(b"")
    (tmp_path / "env.ext3").write_bytes(b"")
    return f"""
[container]
runtime = "singularity"
image = "{tmp_path / "decon.sif"}"
overlays = ["{tmp_path / "env.ext3"}:ro"]
binds = ["{tmp_path}"]
setup = "export DECON_TEST_SETUP=1"
python = "{sys.executable}"
"""


def _with_stand_in(tmp_path: Path, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """``env`` with the stand-in runtimes first on PATH (sbatch exports it to the jobs); inside,
    the same PATH without the SLURM clients."""
    log = write_stand_in(tmp_path / "bin", no_slurm_path(tmp_path / "image-path", env["PATH"]))
    return {**env, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"}, log


def _assert_inside(log: Path, job_ids: list[str], store: SweepStore) -> list[dict]:
    """Every job entered the stand-in container (its command: bash, then the image's
    python), and the job process knew to leave a requeue to the batch script."""
    entered = calls(log)
    assert {c["job"] for c in entered} == set(job_ids), entered
    for c in entered:
        assert c["command"][:2] == ["/bin/bash", "-c"] and c["command"][3] == "--"
        assert c["command"][2].endswith(f'exec {sys.executable} "$@"')
        assert c["command"][4:7] == ["-u", "-m", "submitit.core._submit"]
    for jid in job_ids:
        text = (store.jobs_dir / jid / f"{jid}_0_log.out").read_text()
        assert "in a container: a requeue is left to the batch script" in text
    return entered


def test_the_smoke_grid_completes_inside_a_container_without_slurm(tmp_path):
    """Every job runs inside the stand-in container (no SLURM client there); every run
    completes and the sweep verifies."""
    resources = tmp_path / "inside.toml"
    text = (REPO / "profiles" / "resources" / "slurm_local.toml").read_text()
    resources.write_text(text + _container_section(tmp_path))
    env, log = _with_stand_in(tmp_path, ENV)
    root = tmp_path / "sweep"
    out = subprocess.run(_submit_cmd(root, "smoke", str(resources)), capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    store = SweepStore(root)
    (sub,) = store.read_manifest()["submissions"]
    job_ids = [j["job_id"] for j in sub["jobs"]]
    with _released_and_cancelled(tmp_path / "release", job_ids), _explained(store):
        _wait(store, sub)
        for job in sub["jobs"]:
            for rid in job["run_ids"]:
                view = contract.view_run(store.run_dir(rid))
                assert view.state == "completed" and view.steps_done == view.total_steps == 26, rid
        assert sorted(_sacct_states(job_ids)) == sorted((j, "COMPLETED") for j in job_ids)
        _assert_inside(log, job_ids, store)
        verify = run_cli("verify", "--root", str(root))
        assert verify.returncode == 0, verify.stdout + verify.stderr


# Each run is held after HOLD_AT_STEPS steps ($DECON_HOLD, contract.py) until a stop signal:
# whatever the machine's speed, SLURM's timeout signal finds both runs mid-training. The job is
# submitted with a long limit; once both runs wait there, the test cuts the limit so that the
# signal comes within a minute or two, and lifts it again after the requeue. The hold is mid
# epoch 2 (13 steps an epoch), on neither a flush nor a validation boundary.
HOLD_AT_STEPS = 18
REQUEUE_GRID = tiny_grid("requeue", epochs=4, image_size=None, curvature_every_steps=0)

TEN_MINUTES = """
executor = "slurm"
partition = "debug"
gres = "gpu:1"
runs_per_gpu = 2
cpus_per_run = 1
mem_gb_per_run = 1.0
time_limit_min = 10
signal_delay_s = 20
max_attempts = 12
"""


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def _time_out_once(store: SweepStore, job_id: str, run_ids: list[str]) -> None:
    """Once every run is held at HOLD_AT_STEPS, cut the job's limit to 35-95 s from now (SLURM
    sends the signal within ~30 s of the limit minus signal_delay_s); after the requeue, lift
    it. The runs cannot finish meanwhile: they wait for the signal."""
    deadline = time.monotonic() + 600
    while not all(contract.view_run(store.run_dir(r)).steps_done >= HOLD_AT_STEPS for r in run_ids):
        assert time.monotonic() < deadline, "the runs never reached their hold"
        time.sleep(1)
    elapsed_s = int(_sacct(job_id, "ElapsedRaw")[-1])
    _set_limit(job_id, -(-(elapsed_s + 35) // 60))  # ceil, in minutes
    while "REQUEUED" not in (states := _sacct(job_id, "State", requeues=True)):
        assert time.monotonic() < deadline, "the job was never requeued"
        assert not ENDED & set(states), f"the job ended without a requeue: {states}"
        time.sleep(2)
    _set_limit(job_id, 30)


def _set_limit(job_id: str, minutes: int) -> None:
    cmd = ["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _sacct(job_id: str, field: str, requeues: bool = False) -> list[str]:
    cmd = ["sacct", "-X", "-n", "-P", "-o", field, "-j", job_id] + (["-D"] if requeues else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("inside", [False, True], ids=["host", "container"])
def test_a_job_at_its_time_limit_requeues_and_both_runs_resume_exactly(tmp_path, inside):
    """The job reaches its time limit while both runs train: it is signalled, both runs
    checkpoint, the job is requeued and both resume from their own directories. The final
    numbers equal those of the same run trained without interruption. ``inside``: the job
    runs in the stand-in container, where there is no ``scontrol``: the batch script
    requeues it from the host."""
    grid = tmp_path / "requeue.toml"
    grid.write_text(REQUEUE_GRID)
    resources = tmp_path / "ten_minutes.toml"
    text = TEN_MINUTES + "mps = true\n"  # each attempt starts its own daemon
    resources.write_text(text + (_container_section(tmp_path) if inside else ""))
    mps_log = write_fake_mps(tmp_path / "bin")  # a fake control program, on the jobs' PATH
    first = expand_grid_runs(load_grid(str(grid)))[0]
    reference = SweepStore(tmp_path / "reference").write_run_config(first.config)
    ref = subprocess.Popen(
        [sys.executable, "-m", "deconcnn_cli", "train", "--run-dir", str(reference),
         "--quiet", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO,
    )  # fmt: skip
    root = tmp_path / "sweep"
    release = tmp_path / "release"  # created only on the way out
    held = {**ENV, runenv.HOLD_ENV: f"{HOLD_AT_STEPS}:{release}"}
    held["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{held['PATH']}"  # sbatch exports it
    if inside:
        held, container_log = _with_stand_in(tmp_path, held)
    out = subprocess.run(_submit_cmd(root, str(grid), str(resources)), capture_output=True,
                         text=True, env=held, cwd=REPO, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    store = SweepStore(root)
    (sub,) = store.read_manifest()["submissions"]
    (job,) = sub["jobs"]
    with _released_and_cancelled(release, [job["job_id"]]), _explained(store):
        _time_out_once(store, job["job_id"], job["run_ids"])
        assert ref.wait(timeout=1500) == 0, ref.stdout.read() if ref.stdout else ""
        _wait(store, sub, timeout_s=1500)
    with _explained(store):
        _check_resumed_exactly(store, job, first.run_id, reference, mps_log)
        if inside:  # every attempt entered the container; the host requeued it
            entered = _assert_inside(container_log, [job["job_id"]], store)
            assert len(entered) >= 2 and entered[0]["restart"] in (None, "0"), entered
            log = (store.jobs_dir / job["job_id"] / f"{job['job_id']}_0_log.out").read_text()
            assert "requeue asked of the batch script" in log
            assert not (store.jobs_dir / f"requeue-{job['job_id']}").exists()


def _check_resumed_exactly(
    store: SweepStore, job: dict, first: str, reference: Path, mps_log: Path
) -> None:
    for rid in job["run_ids"]:
        run_dir = store.run_dir(rid)
        assert contract.view_run(run_dir).state == "completed"
        attempts = contract.read_attempt_starts(run_dir)
        assert len(attempts) >= 2, f"{rid} was never interrupted"
        assert attempts[1]["resumed_from_step"] == HOLD_AT_STEPS  # stopped where it was held
        assert all(a["resumed_from_step"] > 0 for a in attempts[1:])
    states = [s for j, s in _sacct_states([job["job_id"]], duplicates=True)]
    assert "REQUEUED" in states and states[-1] == "COMPLETED"
    resumed = store.run_dir(first)
    streams = sorted(p.name for p in (reference / contract.METRICS_DIR).iterdir())
    assert streams == sorted(p.name for p in (resumed / contract.METRICS_DIR).iterdir())
    assert {"step.csv", "val.csv", "noise.csv", "shape.csv"} <= set(streams)
    for name in streams:  # byte for byte: every row, every float
        a = resumed / contract.METRICS_DIR / name
        assert a.read_text() == (reference / contract.METRICS_DIR / name).read_text(), name
    sa, sb = contract.read_summary(resumed), contract.read_summary(reference)
    assert sa is not None and sb is not None
    assert sa.pop("attempts") >= 2 and sb.pop("attempts") == 1
    assert sa == sb
    # MPS: every attempt of the job started a daemon of its own, quit it on the timeout's
    # requeue and at the end; both runs of every attempt ran under it
    mps_calls = [line.split() for line in mps_log.read_text().splitlines()]
    starts = [c[1] for c in mps_calls if c[0] == "-d"]
    quits = [c[1] for c in mps_calls if c[0] == "quit"]
    assert len(starts) >= 2 and sorted(starts) == sorted(quits), mps_calls
    assert len(set(starts)) == len(starts)  # a private pipe directory per attempt
    for rid in job["run_ids"]:
        assert all(a.get("mps") is True for a in contract.read_attempt_starts(store.run_dir(rid)))


def test_an_unknown_partition_is_refused_before_anything_is_written(tmp_path):
    resources = tmp_path / "bad.toml"
    resources.write_text(TEN_MINUTES.replace('partition = "debug"', 'partition = "nope"'))
    root = tmp_path / "sweep"
    out = subprocess.run(_submit_cmd(root, "smoke", str(resources)), capture_output=True,
                         text=True, env=ENV, cwd=REPO, timeout=300)  # fmt: skip
    assert out.returncode == 2
    assert "error: resource profile 'bad': partition 'nope' does not exist" in out.stderr
    assert "hint: partitions here: debug" in out.stderr
    assert not root.exists()
