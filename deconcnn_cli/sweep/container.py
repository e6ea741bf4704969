"""Jobs inside a Singularity/Apptainer image: the command, the host-side requeue, the check.

With a ``[container]`` section every SLURM job runs as

    srun ... RUNTIME exec --nv [--overlay O]... [-B B]... [FLAGS] IMAGE \\
        /bin/bash -c 'SETUP; exec PYTHON "$@"' -- -u -m submitit.core._submit FOLDER

so submitit's job process, and the runs it starts (children of it), run inside the image; the
shell ``exec``s python, so SLURM's USR2 before the time limit and SIGTERM on preemption reach
the job process as they do without a container.

Requeue. submitit requeues a timed-out job by running ``scontrol requeue`` from the job
process; an image usually has no SLURM client. So inside a container the job process writes a
marker file instead (``$DECON_REQUEUE_FILE``, under the sweep's jobs folder, which the
container sees), exits as submitit does after a checkpoint, and the batch script, on the host,
runs ``scontrol requeue`` when it finds the marker after ``srun`` returned. This works whether
or not the image has ``scontrol``. The MPS daemon of a job starts inside the container, as
without one (``--nv`` binds the host's ``nvidia-cuda-mps-*`` programs), with its pipe
directory in the job's /tmp, which the runs (in the same container) see.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from deconcnn_cli.cluster_options import ContainerConfig
from deconcnn_cli.runenv import REQUEUE_FILE_ENV
from deconcnn_cli.sweep.profiles import ResourceProfile

CHECK_TIMEOUT_S = 300.0  # the first exec of an image on a login node can take a while
IMPORT_CHECK = (
    "import importlib.metadata as m, deconcnn_cli, submitit, torch; "
    "print(m.version('deconcnn_cli'), submitit.__version__, torch.__version__, "
    "torch.version.cuda)"
)


def binds_for(container: ContainerConfig, paths: list[Path]) -> list[str]:
    """The profile's binds plus ``paths`` (the sweep root, the data folder) at the same place
    inside, each unless a bind of the profile already shows it there."""
    out = list(container.binds)
    same_place = [p for p in map(_same_place, out) if p is not None]
    for path in paths:
        if not any(path == p or path.is_relative_to(p) for p in same_place):
            out.append(str(path))
            same_place.append(path)
    return out


def _same_place(bind: str) -> Path | None:
    """The folder a bind shows at its own path inside (``SRC`` or ``SRC:SRC[:OPTS]``)."""
    parts = bind.split(":")
    return Path(parts[0]) if len(parts) == 1 or parts[1] == parts[0] else None


def exec_argv(container: ContainerConfig, binds: list[str]) -> list[str]:
    """``RUNTIME exec --nv ... IMAGE``: everything before the command run inside."""
    argv = [container.runtime, "exec", "--nv"]
    for overlay in container.overlays:
        argv += ["--overlay", overlay]
    for bind in binds:
        argv += ["-B", bind]
    return argv + list(container.flags) + [container.image]


def inner_script(container: ContainerConfig) -> str:
    """What bash runs inside: the setup lines, then ``exec PYTHON "$@"`` (submitit's
    arguments follow the ``--``; ``exec``: the signals reach python itself)."""
    return "\n".join([*container.setup, f'exec {container.python} "$@"'])


def python_command(container: ContainerConfig, binds: list[str]) -> str:
    """submitit's ``python``: a shell command to which it appends ``-u -m ... FOLDER``."""
    argv = [*exec_argv(container, binds), "/bin/bash", "-c", inner_script(container), "--"]
    return " ".join(shlex.quote(a) for a in argv)


def requeue_setup(jobs_dir: Path) -> list[str]:
    """Batch-script lines before ``srun`` (on the host): where the job asks for a requeue."""
    marker = f'{shlex.quote(str(jobs_dir))}/requeue-"$SLURM_JOB_ID"'
    return [
        "# decon: the job process asks for its requeue here (the image may have no scontrol)",
        f"export {REQUEUE_FILE_ENV}={marker}",
        f'rm -f "${REQUEUE_FILE_ENV}"',
    ]


def requeue_teardown() -> list[str]:
    """Batch-script lines after ``srun`` (on the host): the requeue the job asked for; the
    script then exits with srun's status (a failed job stays FAILED in SLURM's records)."""
    return [
        "decon_status=$?",
        f'if [ -e "${REQUEUE_FILE_ENV}" ]; then',
        f'    rm -f "${REQUEUE_FILE_ENV}"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$decon_status"',
    ]


def container_paths(root: Path, resources: ResourceProfile) -> list[Path]:
    """What the jobs must see at the same path inside: the sweep root (runs, jobs folder) and
    the profile's data folder (when it exists here)."""
    paths = [root.absolute()]
    if resources.data_dir:
        data = Path(resources.data_dir).expanduser()
        if data.is_dir():
            paths.append(data.resolve())
    return paths


def slurm_container_parameters(root: Path, jobs_dir: Path, resources: ResourceProfile) -> dict:
    """The executor's ``python`` and the ``setup``/``teardown`` lines of the batch script."""
    assert resources.container is not None
    binds = binds_for(resources.container, container_paths(root, resources))
    return {
        "python": python_command(resources.container, binds),
        "setup": requeue_setup(jobs_dir),
        "teardown": requeue_teardown(),
    }


def check_root(root: Path) -> str | None:
    """Why a sweep root cannot be bound into a container (``None``: it can)."""
    if any(c in str(root) for c in ",:"):
        return f"sweep root {str(root)!r} holds ',' or ':', which a -B bind cannot carry"
    return None


# ---------------------------------------------------------------------------------------------
# Job side


def use_host_requeue() -> bool:
    """In a job inside a container (``$DECON_REQUEUE_FILE`` set by the batch script): make
    submitit's requeue write the marker instead of calling ``scontrol``. True if installed."""
    marker = os.environ.get(REQUEUE_FILE_ENV)
    if not marker:
        return False
    from submitit.slurm.slurm import SlurmJobEnvironment

    def _requeue(self: Any, countdown: int) -> None:
        Path(marker).write_text(f"{self.job_id} {countdown}\n")
        print(
            f"[decon job] requeue asked of the batch script ({countdown} timeouts left)",
            flush=True,
        )

    SlurmJobEnvironment._requeue = _requeue  # type: ignore[method-assign]
    return True


# ---------------------------------------------------------------------------------------------
# Login-node check (decon validate --resources)


def check_container(resources: ResourceProfile) -> list[tuple[str, str, str]]:
    """``(name, status, detail)`` rows: the runtime on PATH, the image and overlays present,
    and the image's python importing decon, submitit and torch (their versions)."""
    c = resources.container
    if c is None:
        return []
    rows: list[tuple[str, str, str]] = []
    runtime = shutil.which(c.runtime)
    if runtime is None:
        rows.append(
            ("container runtime", "warn", f"{c.runtime} not found on PATH: not checked here")
        )
    else:
        rows.append(("container runtime", "pass", runtime))
    files = [("container image", c.image)] + [
        (f"container overlay {i}", o.removesuffix(":ro").removesuffix(":rw"))
        for i, o in enumerate(c.overlays)
    ]
    missing = False
    for name, path in files:
        if Path(path).is_file():
            rows.append((name, "pass", path))
        else:
            missing = True
            rows.append((name, "fail", f"{path}: no such file"))
    if runtime is None:
        rows.append(("container python", "warn", f"not run: {c.runtime} not found on PATH"))
        return rows
    if missing:
        rows.append(("container python", "skip", "not run: image or overlay missing"))
        return rows
    argv = [
        *exec_argv(c, binds_for(c, [])),
        "/bin/bash",
        "-c",
        inner_script(c),
        "--",
        "-c",
        IMPORT_CHECK,
    ]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        rows.append(("container python", "fail", f"{c.runtime} exec failed: {exc}"))
        return rows
    words = out.stdout.split()
    if out.returncode != 0 or len(words) < 4:
        tail = (out.stderr or out.stdout).strip()[-300:]
        rows.append(("container python", "fail", f"exit {out.returncode}: {tail}"))
        return rows
    decon, submitit, torch, cuda = words[-4:]
    found = f"decon {decon}, submitit {submitit}, torch {torch} (CUDA {cuda})"
    from importlib.metadata import version

    outside = version("deconcnn_cli")
    if decon != outside:
        rows.append(("container python", "warn", f"{found}; decon {outside} outside the image"))
    else:
        rows.append(("container python", "pass", found))
    return rows


def describe(root: Path, jobs_dir: Path, resources: ResourceProfile) -> str:
    """The command each job runs (``decon submit --dry-run``)."""
    assert resources.container is not None
    binds = binds_for(resources.container, container_paths(root, resources))
    folder = shlex.quote(str(jobs_dir / "%j"))
    return f"{python_command(resources.container, binds)} -u -m submitit.core._submit {folder}"
