"""``decon submit`` without a scheduler: decisions, plans, bad input, golden sbatch, and the
local executor end to end (real detached runner, real training subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deconcnn_cli import contract, fileio
from deconcnn_cli.errors import ConfigError, SweepError
from deconcnn_cli.sweep import executors
from deconcnn_cli.sweep.grid import expand_grid_runs
from deconcnn_cli.sweep.profiles import load_grid, load_resources
from deconcnn_cli.sweep.store import SweepStore
from deconcnn_cli.sweep.submit import (
    GridChangedError,
    decide,
    plan_submit,
    submit_grid,
    submit_runs,
    wait_done,
    wait_targets,
)
from tests.conftest import REPO, run_cli
from tests.sweep.fakes import TINY_GRID, mark_state, seed_sweep

GOLDEN = Path(__file__).parent / "golden"


def _view(state: str | None, **status) -> contract.RunView:
    now = time.time()
    full = {"state": state, "heartbeat_unix": now, "step": 7, "reason": "boom", **status}
    return contract.view_run(_status_dir(full), now)


def _status_dir(status: dict) -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp()) / "r1"
    d.mkdir()
    if status.get("state"):
        fileio.atomic_write_json(d / contract.STATUS_FILE, status)
    return d


@pytest.mark.parametrize(
    ("state", "kwargs", "submit", "reason"),
    [
        (None, {}, True, "new"),
        ("completed", {}, False, "completed"),
        ("completed", {"forced": True}, False, "completed"),
        ("diverged", {"retry_failed": True}, False, "diverged"),
        ("running", {}, False, "live"),
        ("interrupted", {}, True, "interrupted at step 7"),
        ("interrupted", {"queued_in": "12_3"}, False, "queued in job 12_3"),
        ("failed", {}, False, "--retry-failed"),
        ("failed", {"retry_failed": True}, True, "retried"),
        ("failed", {"forced": True}, True, "forced"),
        ("failed", {"queued_in": "9"}, False, "queued in job 9"),
    ],
)
def test_decide_table(state, kwargs, submit, reason):
    ok, why = decide(_view(state), **kwargs)
    assert ok is submit and reason in why


def test_decide_resubmits_a_stalled_run():
    ok, why = decide(_view("running", heartbeat_unix=time.time() - 10 * contract.STALLED_AFTER_S))
    assert ok and why.startswith("stalled")


def _fake_bin(tmp_path: Path, **scripts: str) -> str:
    """A PATH folder with fake executables (only for testing the parsing of their output)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in scripts.items():
        path = folder / name
        path.write_text("#!/bin/sh\n" + text)
        path.chmod(0o755)
    return str(folder)


SCONTROL_100 = 'echo "MaxArraySize            = 100"\necho "MaxJobCount             = 10000"\n'


def test_parse_max_array_size_and_chunks():
    assert executors.parse_max_array_size("A = 1\nMaxArraySize            = 100\n") == 100
    assert executors.parse_max_array_size("nothing here") == 1001
    assert executors.array_chunks(108, 100) == [(0, 100), (100, 108)]
    assert executors.array_chunks(100, 100) == [(0, 100)]
    assert executors.array_chunks(0, 100) == []


def test_dry_run_of_the_full_grid_plans_216_runs_in_108_gpu_jobs(tmp_path):
    root = tmp_path / "sweep"
    env = {**os.environ, "PATH": _fake_bin(tmp_path, scontrol=SCONTROL_100)}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconcnn_cli",
            "submit",
            "--grid",
            "loss_lin_slope",
            "--resources",
            "rtx8000",
            "--dry-run",
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = [" ".join(line.strip("│ ").split()) for line in out.stdout.splitlines()]
    for variant in ("base", "bn_off", "narrow", "adamw"):
        assert f"{variant} │ 54 │ 54 │ 0 │ 27" in lines
    assert "total │ 216 │ 216 │ 0 │ 108" in lines
    text = " ".join(out.stdout.split())
    assert "2 job array(s): 100 + 8 tasks (MaxArraySize 100 from scontrol show config)" in text
    assert "dry run: nothing written" in text
    assert not root.exists()


def test_missing_data_says_where_its_data_dir_was_set(tmp_path):
    profile = (REPO / "profiles" / "resources" / "rtx8000.toml").read_text()
    path = tmp_path / "mine.toml"
    path.write_text(profile.replace('data_dir = "~/data/cifar"', f'data_dir = "{tmp_path}/no"'))
    store = SweepStore(tmp_path / "sweep")
    spec = load_grid("loss_lin_slope")
    plan = plan_submit(store, spec, "slurm", load_resources(str(path)))
    (warning,) = plan.warnings
    assert f"no {tmp_path}/no/cifar-10-batches-py" in warning
    assert "data_dir of resource profile 'mine'" in warning
    grid = spec.model_copy(update={"overrides": {"data": {"data_dir": str(tmp_path / "g")}}})
    (warning,) = plan_submit(store, grid, "slurm", load_resources(str(path))).warnings
    assert "[overrides.data] data_dir of the grid" in warning


def test_plan_chunks_every_array_below_max_array_size(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _fake_bin(tmp_path, scontrol=SCONTROL_100))
    spec = load_grid("loss_lin_slope")
    plan = plan_submit(SweepStore(tmp_path / "s"), spec, "slurm", load_resources("rtx8000"))
    assert len(plan.to_submit) == 216 and len(plan.groups) == 108
    assert plan.chunks == [(0, 100), (100, 108)]
    assert max(b - a for a, b in plan.chunks) <= 100  # indices 0..99 in every chunk
    for group in plan.groups:  # two runs of one variant share a GPU
        assert len(group) == 2
        assert len({plan.runs[r].variant for r in group}) == 1
    assert sorted(r for g in plan.groups for r in g) == sorted(plan.runs)
    assert not (tmp_path / "s").exists()


HOSTILE_DIR = "a b'c$(touch pwned)"  # a space, a quote and a command substitution


def test_golden_sbatch(tmp_path, monkeypatch):
    """The script submitit really writes (captured by a fake ``sbatch`` on PATH) for a sweep
    root holding a space, a quote and ``$(...)``: every directive comes before the first
    command (sbatch stops reading them there), and running its command line hands ``srun``
    the folder as one argument without running anything in it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    capture, argv = tmp_path / "captured.sbatch", tmp_path / "srun_argv"
    for name, body in (
        ("sbatch", f'for a; do last="$a"; done\ncp "$last" "{capture}"\n'
                   'echo "Submitted batch job 4242"\n'),
        ("srun", f'for a; do printf "%s\\n" "$a"; done > "{argv}"\n'),
    ):  # fmt: skip
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    root = tmp_path / HOSTILE_DIR / "root"
    resources = load_resources("rtx8000").model_copy(update={"max_array_size": 100})
    groups = [[f"r{2 * i}", f"r{2 * i + 1}"] for i in range(100)]
    jobs, error = executors.submit_slurm(
        SweepStore(root), groups, resources, "decon-loss_lin_slope"
    )
    assert error is None and jobs[0]["job_id"] == "4242_0" and len(jobs) == 100
    script = capture.read_text()
    text = script.replace(str(tmp_path), "<TMP>").replace(sys.executable, "<python>")
    golden = GOLDEN / "rtx8000.sbatch"
    if os.environ.get("DECON_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    lines = script.splitlines()
    first_command = next(i for i, ln in enumerate(lines[1:], 1) if ln and not ln.startswith("#"))
    directives = {ln.split("=")[0] for ln in lines[:first_command] if ln.startswith("#SBATCH")}
    assert {"#SBATCH --partition", "#SBATCH --requeue", "#SBATCH --signal", "#SBATCH --time"} <= (
        directives
    )
    assert not any(ln.startswith("#SBATCH") for ln in lines[first_command:])
    subprocess.run(["bash", str(capture)], cwd=tmp_path, check=True, env={**os.environ})
    assert argv.read_text().splitlines()[-1] == f"{root}/jobs/%j"
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("field", ["partition", "account", "qos", "gres"])
@pytest.mark.parametrize("value", ["gpu\ntouch /tmp/x", "a b", "gpu'", "$(id)", 'g"'])
def test_hostile_profile_strings_are_refused(tmp_path, field, value):
    path = tmp_path / "hostile.toml"
    path.write_text(f'executor = "slurm"\n{field} = {json.dumps(value)}\n')
    with pytest.raises(ConfigError, match=rf"{path}: {field}: String should match pattern"):
        load_resources(str(path))


def test_a_root_with_a_newline_is_refused(tmp_path):
    root = tmp_path / "sweep\ntouch pwned"
    proc = run_cli("submit", "--grid", "demo", "--executor", "local", "--root", str(root))
    assert proc.returncode == 2 and "error: sweep root" in proc.stderr
    assert "control character" in proc.stderr and not root.exists()


def test_no_slurm_is_an_error_with_a_hint_and_writes_nothing(tmp_path):
    root = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env["PATH"] = str(tmp_path / "empty")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "deconcnn_cli",
            "submit",
            "--grid",
            "smoke",
            "--executor",
            "slurm",
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("error: --executor slurm, but no SLURM is reachable")
    assert "hint: " in out.stderr and "Traceback" not in out.stderr
    assert not root.exists()
    # the executor chosen by a profile, not a flag: the error names the profile
    cmd = out.args[:3] + [
        "submit",
        "--grid",
        "smoke",
        "--resources",
        "rtx8000",
        "--root",
        str(root),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(
        "error: resource profile 'rtx8000' says executor = 'slurm', but no SLURM is reachable"
    )
    assert "--executor local" in out.stderr and not root.exists()
    # its dry run shows the plan, and says where it can run
    out = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, env=env, cwd=REPO)
    assert (
        out.returncode == 0 and "note: submit it where it can run: resource profile" in out.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "nosuch"], "error: unknown grid 'nosuch'"),
        (["--grid", "smoke", "--resources", "nosuch"], "error: unknown resource profile"),
        (["--grid", "smoke", "--resources", "rtx8000", "--executor", "local"], "is for slurm"),
        (["--grid", "smoke", "--executor", "pbs"], "unknown executor 'pbs'"),
        (["--grid", "smoke", "--executor", "local", "--force", "x_1"], "not in grid smoke"),
    ],
)
def test_bad_input_is_refused_and_writes_nothing(tmp_path, args, message):
    root = tmp_path / "sweep"
    out = run_cli("submit", *args, "--root", str(root))
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and "hint: " in out.stderr
    assert not root.exists()


def test_a_sweep_being_created_by_another_submit_is_not_foreign(tmp_path):
    """Two first submits at once: the second may look while the first holds the lock and
    writes ``sweep.json`` (its temporary file is there, not yet renamed). That is no foreign
    folder: the second waits for the lock and finds the sweep (failed once in the SLURM
    suite's concurrent-submit test under load)."""
    from deconcnn_cli.sweep.submit import _check_not_foreign

    (tmp_path / ".sweep.lock").touch()
    (tmp_path / ".sweep.json.tmp4242").write_text("{")
    _check_not_foreign(SweepStore(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="not a sweep root"):
        _check_not_foreign(SweepStore(tmp_path))


def test_a_foreign_folder_is_not_a_sweep_root(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="not a sweep root"):
        submit_grid(SweepStore(tmp_path), "smoke", executor="local")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_changed_grid_is_shown_and_refused_without_force(tmp_path):
    store, path = seed_sweep(tmp_path)
    before = store.manifest_path.read_bytes()
    path.write_text(TINY_GRID.replace("seed = [0, 1]", "seed = [0, 2]"))
    with pytest.raises(GridChangedError) as info:
        submit_grid(store, str(path), executor="local")
    msg = info.value.message
    assert "axes.seed: [0, 1] -> [0, 2]" in msg
    assert "+ base_lr0.1_wd0.001_s2_" in msg and "- base_lr0.1_wd0.001_s1_" in msg
    assert "--force grid" in info.value.hint
    assert store.manifest_path.read_bytes() == before
    dry = ["submit", "--grid", str(path), "--executor", "local", "--dry-run"]
    out = run_cli(*dry, "--root", str(store.root))
    # the dry run shows the change and exits as the real submit would: refused
    assert out.returncode == 2 and "grid changed since the sweep was created" in out.stdout
    assert out.stderr.startswith("the real submit would refuse:\nerror: grid tiny changed")
    assert "--force grid" in out.stderr
    forced = run_cli(*dry, "--force", "grid", "--root", str(store.root))
    assert forced.returncode == 0, forced.stderr
    assert store.manifest_path.read_bytes() == before


def test_force_grid_adopts_the_new_grid_and_keeps_finished_runs(tmp_path):
    store, path = seed_sweep(tmp_path)
    old = store.read_manifest()
    path.write_text(TINY_GRID.replace("seed = [0, 1]", "seed = [0, 2]"))
    new_ids = [r.run_id for r in expand_grid_runs(load_grid(str(path)))]
    mark_state(
        store.write_run_config(expand_grid_runs(load_grid(str(path)))[1].config), "completed"
    )
    result = submit_grid(store, str(path), executor="local", force=["grid"])
    assert result.submission is None  # every run of the new grid is already completed
    manifest = store.read_manifest()
    assert sorted(manifest["runs"]) == sorted(new_ids)
    assert manifest["grid_hash"] != old["grid_hash"]
    (removed,) = set(old["runs"]) - set(new_ids)
    assert removed in manifest["retired_runs"]
    assert manifest["grid_changes"][0]["removed"] == [removed]


def test_failed_runs_wait_for_retry_failed(tmp_path):
    store, path = seed_sweep(tmp_path)
    failed = sorted(store.read_manifest()["runs"])[0]
    mark_state(store.run_dir(failed), "failed")
    spec = load_grid(str(path))
    res = load_resources("local")
    plan = plan_submit(store, spec, "local", res)
    assert plan.to_submit == []
    reasons = {d.run_id: d.reason for d in plan.decisions}
    assert "failed (RuntimeError: x): --retry-failed" in reasons[failed]
    assert plan_submit(store, spec, "local", res, retry_failed=True).to_submit == [failed]
    assert plan_submit(store, spec, "local", res, force=[failed]).to_submit == [failed]


def test_submit_runs_refuses_unknown_ids_and_skips_finished(tmp_path):
    store, _ = seed_sweep(tmp_path)
    with pytest.raises(SweepError, match="not runs of this sweep: nope"):
        submit_runs(store, ["nope"], load_resources("local"), reason="test")
    done = sorted(store.read_manifest()["runs"])[0]
    result = submit_runs(store, [done], load_resources("local"), reason="test")
    assert result.submission is None and result.plan.decisions[0].reason == "completed"


@pytest.mark.slow
def test_local_executor_end_to_end(tmp_path):
    """Detached runner: submit returns at once with the runs going on; a second `submit --wait`
    submits nothing and watches them to the end; a third finds everything completed."""
    root = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "deconcnn_cli", "submit", "--grid", "smoke",
           "--executor", "local", "--root", str(root)]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "submitted 4 runs in 1 local job(s)" in " ".join(first.stdout.split())
    manifest = json.loads((root / "sweep.json").read_text())
    (sub,) = manifest["submissions"]
    (job,) = sub["jobs"]
    assert job["job_id"].startswith("local-") and len(job["run_ids"]) == 4
    assert executors.local_job_alive(job)  # submit has exited; its runner goes on
    assert os.getsid(job["pid"]) == job["pid"]  # in a session of its own
    second = subprocess.run([*cmd, "--wait"], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=900)  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "nothing to submit" in second.stdout
    assert second.stdout.count("queued in job " + job["job_id"]) == 4
    assert "all 4 runs ended: 4 completed" in second.stdout
    store = SweepStore(root)
    assert wait_done(store, sub)
    for rid in job["run_ids"]:
        view = contract.view_run(store.run_dir(rid))
        assert view.state == "completed" and view.steps_done == view.total_steps == 26
        records = contract.read_attempts(store.run_dir(rid))  # one start + one end line
        assert {r["attempt"] for r in records} == {1}
        assert [r.get("event") for r in records] == [None, "end"]
        assert "completed" in (store.run_dir(rid) / contract.LOG_FILE).read_text()
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert third.returncode == 0 and third.stdout.count(": completed") == 4
    assert len(json.loads((root / "sweep.json").read_text())["submissions"]) == 1


def test_wait_targets_are_the_run_ids_of_the_submission_alone():
    sub = {"executor": "local", "jobs": [{"job_id": "a", "run_ids": ["r1", "r2"]},
                                         {"job_id": "b", "run_ids": ["r3"]}]}  # fmt: skip
    assert wait_targets(sub) == ["r1", "r2", "r3"]  # no store: the submission says it all
