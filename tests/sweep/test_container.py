"""Jobs inside a Singularity/Apptainer image, without a scheduler: the profile's
``[container]`` and ``[sbatch]`` refusals, the golden sbatch script, the host-side requeue of
that script, ``submit --dry-run`` and ``validate``'s container rows (through the stand-in
runtime of :mod:`tests.sweep.container_fakes`). The same on the real local SLURM:
test_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deconcnn_cli.errors import ConfigError
from deconcnn_cli.sweep import container, executors
from deconcnn_cli.sweep.profiles import load_resources
from deconcnn_cli.sweep.store import SweepStore
from tests.conftest import run_cli
from tests.sweep.container_fakes import calls, write_stand_in

GOLDEN = Path(__file__).parent / "golden"
HOSTILE_DIR = "a b'c$(touch pwned)"  # a space, a quote and a command substitution

BASE = """
executor = "slurm"
partition = ""
array_parallelism = 2
[container]
image = "/images/decon.sif"
overlays = ["/scratch/env.ext3:ro"]
"""


def _profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "prof.toml"
    path.write_text(text)
    return path


def _refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_resources(str(_profile(tmp_path, text)))
    return info.value.message


def test_a_container_profile_loads_with_an_empty_partition(tmp_path):
    prof = load_resources(str(_profile(tmp_path, BASE + 'setup = "a\\nb"\n')))
    assert prof.partition == "" and prof.container is not None
    assert prof.container.setup == ["a", "b"] and prof.container.runtime == "singularity"
    assert "partition" not in executors.slurm_parameters(prof, "j")


@pytest.mark.parametrize("flag", ["--cleanenv", "-e", "--containall", "-C", "--contain", "-c"])
def test_flags_that_drop_the_environment_are_refused(tmp_path, flag):
    message = _refused(tmp_path, BASE + f'flags = ["--writable-tmpfs", "{flag}"]\n')
    assert "container.flags" in message and f"flags[1] '{flag}'" in message


@pytest.mark.parametrize(
    ("line", "field", "why"),
    [
        ('image = "images/decon.sif"', "container.image", "not an absolute path"),
        ('image = "/images/de\\ncon.sif"', "container.image", "control character"),
        ('binds = ["/a", "data"]', "container.binds", "binds[1] 'data' is not an absolute"),
        ('binds = ["/a\\tb"]', "container.binds", "control character"),
        ('overlays = ["/x.ext3:ro", "y.ext3:ro"]', "container.overlays", "overlays[1]"),
        ('setup = ["source /ext3/env.sh", "x\\u001b[2J"]', "container.setup", "setup line 2"),
        ('python = "python -X"', "container.python", "without spaces"),
        ('runtime = "docker"', "container.runtime", "'singularity' or 'apptainer'"),
    ],
)
def test_bad_container_fields_are_refused_naming_the_field(tmp_path, line, field, why):
    text = BASE.replace('image = "/images/decon.sif"\n', "") if line.startswith("image") else BASE
    text = text.replace('overlays = ["/scratch/env.ext3:ro"]\n', "") if "overlays" in line else text
    message = _refused(tmp_path, text + line + "\n")
    assert field in message and why in message, message


@pytest.mark.parametrize(
    ("layout", "refused"),
    [("runs_per_gpu = 2\narray_parallelism = 1", True),
     ("runs_per_gpu = 1\narray_parallelism = 4", True),
     ("runs_per_gpu = 1\narray_parallelism = 1", False)],
)  # fmt: skip
def test_a_writable_overlay_is_refused_when_two_mount_it(tmp_path, layout, refused):
    text = BASE.replace("array_parallelism = 2\n", layout + "\n").replace(":ro", "")
    if not refused:
        assert load_resources(str(_profile(tmp_path, text))).container.overlays
        return
    message = _refused(tmp_path, text)
    assert "container.overlays: '/scratch/env.ext3' is writable" in message
    assert "append :ro" in message


@pytest.mark.parametrize(
    "key", ["output", "error", "signal", "array", "requeue", "time", "gres", "job-name", "export"]
)
def test_sbatch_options_decon_owns_are_refused(tmp_path, key):
    message = _refused(tmp_path, BASE + f'[sbatch]\n{json.dumps(key)} = "x"\n')
    assert f"sbatch.{key}: decon sets this option itself" in message


@pytest.mark.parametrize("value", ['"a b"', '"x\\ny"', '"it\'s"', '"$(id)"', '"a;b"', "[1]"])
def test_hostile_sbatch_values_are_refused(tmp_path, value):
    message = _refused(tmp_path, BASE + f"[sbatch]\nconstraint = {value}\n")
    assert "sbatch.constraint" in message


@pytest.mark.parametrize("gres", ["gpu:2", "gpu:rtx8000:2", "gpu:0"])
def test_a_gres_of_other_than_one_gpu_is_refused(tmp_path, gres):
    message = _refused(tmp_path, f'executor = "slurm"\ngres = "{gres}"\n')
    assert "gres" in message and "a decon job is one GPU" in message


def test_six_runs_per_gpu_load_with_memory_checked(tmp_path):
    text = 'executor = "slurm"\nruns_per_gpu = 6\ngpu_memory_gb = 48\n'
    prof = load_resources(str(_profile(tmp_path, text + "[gpu_memory_gb_per_run]\nbase = 8\n")))
    params = executors.slurm_parameters(prof, "j")
    assert params["cpus_per_task"] == 6 and params["mem"] == "49152M"
    message = _refused(tmp_path, text + "[gpu_memory_gb_per_run]\nbase = 8.5\n")
    assert "base = 8.5 x runs_per_gpu 6 exceeds gpu_memory_gb 48" in message


def test_a_bad_profile_is_an_error_line_from_submit(tmp_path):
    path = _profile(tmp_path, BASE + '[sbatch]\noutput = "/x"\n')
    out = run_cli("submit", "--grid", "smoke", "--resources", str(path), "--dry-run",
                  "--root", str(tmp_path / "sweep"))  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: invalid resource profile")
    assert "sbatch.output" in out.stderr and "Traceback" not in out.stderr


def _capture_sbatch(tmp_path: Path, monkeypatch) -> tuple[Path, Path, Path]:
    """Fake ``sbatch`` (copies the script), ``srun`` (records its argv, then does what
    ``$FAKE_SRUN`` says) and ``scontrol`` (records its argv) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    capture, argv, scontrol = (tmp_path / n for n in ("captured.sbatch", "srun_argv", "scontrol"))
    for name, body in (
        ("sbatch", f'for a; do last="$a"; done\ncp "$last" "{capture}"\n'
                   'echo "Submitted batch job 4242"\n'),
        ("srun", f'for a; do printf "%s\\0" "$a"; done > "{argv}"\neval "$FAKE_SRUN"\n'),
        ("scontrol", f'echo "$@" >> "{scontrol}"\n'),
    ):  # fmt: skip
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return capture, argv, scontrol


def test_golden_sbatch_with_a_container_extra_options_and_no_partition(tmp_path, monkeypatch):
    """The script submitit really writes for the shipped container profile, with extra
    options (true: a bare flag; false and "": not sent) and no partition. Run with a fake
    ``srun``: it gets the container command with submitit's arguments after ``--``; when the
    job asked for a requeue (the marker) the script, on the host, runs ``scontrol requeue``."""
    capture, argv, scontrol = _capture_sbatch(tmp_path, monkeypatch)
    root = tmp_path / HOSTILE_DIR / "root"
    shipped = load_resources("rtx8000_singularity")
    assert shipped.partition == "" and shipped.container is not None
    extra = {**shipped.sbatch, "exclusive": True, "comment": "", "hold": False, "nice": 10}
    resources = shipped.model_copy(update={"max_array_size": 100, "sbatch": extra})
    groups = [[f"r{2 * i}", f"r{2 * i + 1}"] for i in range(3)]
    store = SweepStore(root)
    jobs, error = executors.submit_slurm(store, groups, resources, "decon-loss_lin_slope")
    assert error is None and [j["job_id"] for j in jobs] == ["4242_0", "4242_1", "4242_2"]
    script = capture.read_text()
    text = script.replace(str(tmp_path), "<TMP>")
    golden = GOLDEN / "rtx8000_singularity.sbatch"
    if os.environ.get("DECON_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    lines = script.splitlines()
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert "#SBATCH --exclusive" in directives and "#SBATCH --constraint=rtx8000" in directives
    assert not any(d.split("=")[0] in {"#SBATCH --partition", "#SBATCH --wckey",
                   "#SBATCH --comment", "#SBATCH --hold"} for d in directives)  # fmt: skip
    env = {**os.environ, "SLURM_JOB_ID": "4243", "FAKE_SRUN": ""}
    subprocess.run(["bash", str(capture)], cwd=tmp_path, check=True, env=env)
    args = argv.read_text().split("\0")[:-1]
    image = args.index(shipped.container.image)
    assert args[: image + 1] == [
        "srun", "--unbuffered", "--output", f"{root}/jobs/%A_%a/%A_%a_%t_log.out",
        "singularity", "exec", "--nv", "--overlay", shipped.container.overlays[0],
        "-B", "/scratch", "-B", str(root), shipped.container.image,
    ][1:]  # fmt: skip
    assert args[image + 1 : image + 3] == ["/bin/bash", "-c"]
    assert args[image + 4 :] == ["--", "-u", "-m", "submitit.core._submit", f"{root}/jobs/%j"]
    assert args[image + 3] == 'source /ext3/env.sh\nexec python "$@"'
    assert not scontrol.exists()  # no marker, no requeue
    env["FAKE_SRUN"] = "exit 3"  # the job failed: so does the script (SLURM records FAILED)
    assert subprocess.run(["bash", str(capture)], cwd=tmp_path, env=env).returncode == 3
    assert not scontrol.exists()
    env["FAKE_SRUN"] = 'touch "$DECON_REQUEUE_FILE"'  # the job asked for its requeue
    subprocess.run(["bash", str(capture)], cwd=tmp_path, check=True, env=env)
    assert scontrol.read_text() == "requeue 4243\n"
    assert not (store.jobs_dir / "requeue-4243").exists()
    assert not list(tmp_path.rglob("pwned"))


def test_the_job_side_requeue_writes_the_marker_instead_of_calling_scontrol(tmp_path, monkeypatch):
    from submitit.slurm.slurm import SlurmJobEnvironment

    monkeypatch.setattr(SlurmJobEnvironment, "_requeue", SlurmJobEnvironment._requeue)
    monkeypatch.delenv(container.REQUEUE_FILE_ENV, raising=False)
    assert not container.use_host_requeue()
    marker = tmp_path / "requeue-77"
    monkeypatch.setenv(container.REQUEUE_FILE_ENV, str(marker))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol anywhere
    assert container.use_host_requeue()
    SlurmJobEnvironment()._requeue(3)
    assert marker.read_text() == "77 3\n"


def test_dry_run_prints_the_container_command(tmp_path):
    root = tmp_path / "sweep"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\necho "MaxArraySize = 100"\n')
    (fake / "scontrol").chmod(0o755)
    out = run_cli("submit", "--grid", "loss_lin_slope", "--resources", "rtx8000_singularity",
                  "--dry-run", "--root", str(root), env={"PATH": str(fake)})  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "each job runs, inside singularity:" in text
    command = "singularity exec --nv --overlay /scratch/USER/decon/overlay-15GB-500K.ext3:ro"
    assert command in text and f"-m submitit.core._submit {root}/jobs/%j" in text
    assert not root.exists()


def _validate_profile(tmp_path: Path, python: str, image: bool = True) -> str:
    img = tmp_path / "decon.sif"
    if image:
        img.write_bytes(b"")
    overlay = tmp_path / "env.ext3"
    overlay.write_bytes(b"")
    return str(_profile(tmp_path, f"""
executor = "slurm"
[container]
image = "{img}"
overlays = ["{overlay}:ro"]
python = "{python}"
"""))  # fmt: skip


def _rows(profile: str) -> dict[str, tuple[str, str]]:
    return {n: (s, d) for n, s, d in container.check_container(load_resources(profile))}


def test_validate_runs_the_import_inside_the_image(tmp_path, monkeypatch):
    log = write_stand_in(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    rows = _rows(_validate_profile(tmp_path, sys.executable))
    assert rows["container runtime"] == ("pass", str(tmp_path / "bin" / "singularity"))
    assert rows["container image"][0] == rows["container overlay 0"][0] == "pass"
    status, detail = rows["container python"]
    import submitit
    import torch

    assert status == "pass", detail
    assert f"submitit {submitit.__version__}, torch {torch.__version__}" in detail
    (call,) = calls(log)
    assert call["image"] == str(tmp_path / "decon.sif") and call["command"][:2] == [
        "/bin/bash",
        "-c",
    ]


def test_validate_warns_of_another_decon_inside(tmp_path, monkeypatch):
    write_stand_in(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    other = tmp_path / "old-python"
    other.write_text('#!/bin/sh\necho "0.0.1 1.5.4 2.0.0 11.8"\n')
    other.chmod(0o755)
    status, detail = _rows(_validate_profile(tmp_path, str(other)))["container python"]
    assert status == "warn" and "decon 0.0.1" in detail and "outside the image" in detail


def test_validate_without_the_runtime_never_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    rows = _rows(_validate_profile(tmp_path, "python", image=False))
    assert (
        rows["container runtime"][0] == "warn"
        and "not found on PATH" in rows["container runtime"][1]
    )
    assert rows["container image"][0] == "fail" and "no such file" in rows["container image"][1]
    assert rows["container python"][0] == "warn"
    assert all(s != "pass" for n, (s, _) in rows.items() if n != "container overlay 0")


def test_no_wckey_unless_the_profile_sets_one(tmp_path):
    prof = load_resources(str(_profile(tmp_path, 'executor = "slurm"\n')))
    params = executors.slurm_parameters(prof, "j")
    assert params["wckey"] is None and "wckey" not in params["additional_parameters"]
    prof = load_resources(str(_profile(tmp_path, 'executor = "slurm"\n[sbatch]\nwckey = "lab"\n')))
    assert executors.slurm_parameters(prof, "j")["additional_parameters"]["wckey"] == "lab"
