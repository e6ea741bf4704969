"""Executors: SLURM through submitit (one job per GPU), or a detached local runner. No torch.

Both take groups of run ids whose run directories already hold ``config.json`` and return one
job record per group for the manifest (``{"job_id", "run_ids", ...}``). Each job runs
:class:`deconcnn_cli.sweep.job.RunGroup` (SLURM) or :func:`deconcnn_cli.sweep.job.run_local`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deconcnn_cli.cluster_options import sbatch_parameters
from deconcnn_cli.errors import SchedulerError, SweepError
from deconcnn_cli.sweep.profiles import ResourceProfile
from deconcnn_cli.sweep.store import SweepStore

DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize (highest index 1000)
SCHEDULER_TIMEOUT_S = 60
LIVE_SLURM_STATES = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
}


def _run(cmd: Sequence[str], timeout: float = SCHEDULER_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# SLURM


def slurm_unavailable() -> str | None:
    """Why no SLURM controller can be reached from here (``None``: it can)."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        return "sbatch/srun not found on PATH"
    try:
        out = _run(["scontrol", "ping"], timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"scontrol ping failed: {exc}"
    if out.returncode != 0 or "UP" not in out.stdout:
        lines = (out.stderr or out.stdout).strip().splitlines() or ["no answer"]
        return f"no SLURM controller answers ({lines[-1].strip()[:160]})"
    return None


def parse_max_array_size(config_text: str) -> int:
    """``MaxArraySize = N`` from ``scontrol show config`` (SLURM's default when absent)."""
    match = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", config_text, re.MULTILINE)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def max_array_size(resources: ResourceProfile) -> tuple[int, str]:
    """The cluster's MaxArraySize and where the number came from."""
    if resources.max_array_size is not None:
        return resources.max_array_size, "resource profile"
    try:
        out = _run(["scontrol", "show", "config"])
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE, "SLURM default (scontrol unavailable)"
    if out.returncode != 0:
        return DEFAULT_MAX_ARRAY_SIZE, "SLURM default (scontrol failed)"
    return parse_max_array_size(out.stdout), "scontrol show config"


def array_chunks(n_jobs: int, max_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` slices of at most ``max_size`` jobs: each chunk's indices are 0..k-1,
    k <= MaxArraySize, so every index stays below the cluster's cap."""
    return [(start, min(start + max_size, n_jobs)) for start in range(0, n_jobs, max_size)]


def group_for_gpus(
    runs: Sequence[tuple[str, str]], runs_per_gpu: int, *, alone: bool = False
) -> list[list[str]]:
    """Pack ``(run_id, variant)`` pairs into jobs of ``runs_per_gpu`` runs of one variant.

    One variant per job keeps each job's memory the sum of known per-variant figures.
    ``alone``: one run per job (after an out-of-memory).
    """
    size = 1 if alone else runs_per_gpu
    by_variant: dict[str, list[str]] = {}
    for rid, variant in runs:
        by_variant.setdefault(variant, []).append(rid)
    groups: list[list[str]] = []
    for ids in by_variant.values():
        groups += [ids[i : i + size] for i in range(0, len(ids), size)]
    return groups


def slurm_parameters(resources: ResourceProfile, job_name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters: every job asks for one whole GPU slot."""
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": resources.time_limit_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": resources.cpus_per_run * resources.runs_per_gpu,
        "mem": f"{int(resources.mem_gb_per_run * resources.runs_per_gpu * 1024)}M",
        "signal_delay_s": resources.signal_delay_s,
        "array_parallelism": resources.array_parallelism,
        "stderr_to_stdout": True,
        # no wckey unless the profile's [sbatch] sets one: submitit's default ("submitit")
        # is refused by clusters that check wckeys ("Invalid wckey specification")
        "wckey": None,
        # the profile's [sbatch] options, then requeue after a node failure too (the runs
        # resume from their checkpoints)
        "additional_parameters": {**sbatch_parameters(resources.sbatch), "requeue": True},
    }
    if resources.gres:
        params["gres"] = resources.gres
    for key in ("partition", "account", "qos"):
        value = getattr(resources, key)
        if value:
            params[key] = value
    return params


def grace_s(resources: ResourceProfile) -> float:
    """How long a job waits for its runs to checkpoint after the signal: most of the delay
    (SLURM may send it up to a minute early, never late)."""
    return max(5.0, resources.signal_delay_s - 10.0)


def slurm_live_jobs(job_ids: Sequence[str]) -> dict[str, str]:
    """One batched ``squeue`` for the given job ids: ``{job_id: STATE}`` of the live ones.

    Array tasks are listed one per line (``-r``); a job that is no longer in the queue is
    simply absent (squeue exits 1 when none of the ids is known).
    """
    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(bases)]
    try:
        out = _run(cmd)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SchedulerError(f"squeue failed: {exc}", "check that SLURM answers: sinfo") from exc
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        raise SchedulerError(
            f"squeue failed: {out.stderr.strip()[:300]}", "check that SLURM answers: sinfo"
        )
    return parse_squeue(out.stdout)


def parse_squeue(text: str) -> dict[str, str]:
    """``JOBID|STATE`` lines -> ``{job_id: STATE}`` of live jobs (first word of the state)."""
    live = {}
    for line in text.splitlines():
        job_id, _, state = line.strip().partition("|")
        state = state.split()[0] if state.split() else ""
        if job_id and state in LIVE_SLURM_STATES:
            live[job_id] = state
    return live


def submit_slurm(
    store: SweepStore,
    groups: list[list[str]],
    resources: ResourceProfile,
    job_name: str,
) -> tuple[list[dict[str, Any]], SchedulerError | None]:
    """Submit one job per group, in arrays below MaxArraySize. Returns the job records of
    what was accepted and the error that stopped the rest (if any)."""
    import submitit

    from deconcnn_cli.sweep.job import RunGroup

    max_size, _ = max_array_size(resources)
    store.jobs_dir.mkdir(parents=True, exist_ok=True)
    params = slurm_parameters(resources, job_name)
    python = None
    if resources.container is not None:  # every job inside the image (sweep.container)
        from deconcnn_cli.sweep.container import slurm_container_parameters

        inside = slurm_container_parameters(store.root, store.jobs_dir, resources)
        python = inside.pop("python")
        params.update(inside)
    ex = submitit.SlurmExecutor(
        folder=str(store.jobs_dir / "%j"), max_num_timeout=resources.max_attempts, python=python
    )
    ex.update_parameters(**params)
    records: list[dict[str, Any]] = []
    for start, stop in array_chunks(len(groups), max_size):
        chunk = groups[start:stop]
        try:
            with ex.batch():
                jobs = [
                    ex.submit(
                        RunGroup(
                            [str(store.run_dir(r)) for r in g],
                            resources.max_attempts,
                            grace_s(resources),
                            require_gpu=resources.require_gpu,
                            mps=resources.mps,
                            mps_thread_percentage=resources.mps_active_thread_percentage,
                        )
                    )
                    for g in chunk
                ]
        except Exception as exc:  # sbatch refused: keep what was accepted
            msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            return records, SchedulerError(
                f"sbatch refused jobs {start}..{stop - 1}: {msg}",
                "fix the resource profile (partition/account/qos/limits) and submit again: "
                "runs already submitted are not submitted twice",
            )
        records += [{"job_id": j.job_id, "run_ids": g} for j, g in zip(jobs, chunk, strict=True)]
    return records, None


# ---------------------------------------------------------------------------------------------
# Local

_LAUNCHER = (
    "import subprocess, sys\n"
    "log = open(sys.argv[1], 'ab')\n"
    "p = subprocess.Popen(sys.argv[2:], start_new_session=True, stdin=subprocess.DEVNULL,"
    " stdout=log, stderr=subprocess.STDOUT)\n"
    "print(p.pid)\n"
)


def submit_local(
    store: SweepStore, run_ids: list[str], resources: ResourceProfile
) -> dict[str, Any]:
    """Start a detached runner for ``run_ids`` (``parallel_runs`` at a time); its job record."""
    store.jobs_dir.mkdir(parents=True, exist_ok=True)
    job_id = f"local-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(2).hex()}"
    spec_path = store.jobs_dir / f"{job_id}.json"
    spec = {
        "job_id": job_id,
        "run_dirs": [str(store.run_dir(r)) for r in run_ids],
        "parallel_runs": resources.parallel_runs,
        "threads": resources.cpus_per_run,
        "max_attempts": resources.max_attempts,
    }
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    cmd = [sys.executable, "-m", "deconcnn_cli.sweep.job", str(spec_path)]
    log = store.jobs_dir / f"{job_id}.log"
    # a launcher that exits at once: the runner is nobody's child here, so it outlives submit
    out = _run([sys.executable, "-c", _LAUNCHER, str(log), *cmd], timeout=60)
    if out.returncode != 0 or not out.stdout.strip().isdigit():
        raise SchedulerError(f"could not start the local runner: {out.stderr.strip()[-300:]}")
    return {
        "job_id": job_id,
        "run_ids": list(run_ids),
        "pid": int(out.stdout.strip()),
        "host": socket.gethostname(),
        "log": str(log.relative_to(store.root)),
    }


def local_job_alive(job: dict[str, Any]) -> bool:
    """Whether a local runner still runs. On another host it cannot be told: assumed alive."""
    if job.get("host") != socket.gethostname():
        return True
    pid = job.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X") and str(job.get("job_id")) in cmdline


def stop_local_job(job: dict[str, Any], sig: int = 15) -> None:
    """Signal a local runner (it passes the signal to its runs, which checkpoint)."""
    if local_job_alive(job) and job.get("host") == socket.gethostname():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(job["pid"]), sig)


# ---------------------------------------------------------------------------------------------


def check_executor(
    executor: str, resources: ResourceProfile | None = None, *, chosen_by: str | None = None
) -> None:
    """Raise a clear error when ``executor`` cannot run here; nothing is written before.
    ``chosen_by``: what chose the executor, named in the error (a flag, or the profile)."""
    if executor == "slurm":
        why = slurm_unavailable()
        if why:
            chosen_by = chosen_by or "--executor slurm"
            raise SweepError(
                f"{chosen_by}, but no SLURM is reachable: {why}",
                "run on a login node of the cluster (SLURM_CONF set), or run here: "
                "--executor local (with --resources local or none)",
            )
        if resources is not None and resources.partition:
            out = _run(["sinfo", "-h", "-o", "%R", "-p", resources.partition])
            if out.returncode == 0 and not out.stdout.strip():
                known = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
                raise SweepError(
                    f"resource profile {resources.name!r}: partition {resources.partition!r} "
                    "does not exist on this cluster",
                    f"partitions here: {', '.join(sorted(set(known))) or '(none)'}",
                )
    elif executor != "local":
        raise SweepError(f"unknown executor {executor!r}", "use slurm or local")


def live_jobs(executor_jobs: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """``{job_id: state}`` of the still-live jobs among ``(executor, job record)`` pairs.

    SLURM jobs: one batched squeue call. Local runners: their pid on this host.
    """
    slurm_ids = [j["job_id"] for ex, j in executor_jobs if ex == "slurm"]
    live: dict[str, str] = {}
    if slurm_ids:
        if slurm_unavailable():  # cannot tell: never resubmit on a guess
            live = dict.fromkeys(slurm_ids, "UNKNOWN")
        else:
            live = slurm_live_jobs(slurm_ids)
    for ex, job in executor_jobs:
        if ex == "local" and local_job_alive(job):
            live[job["job_id"]] = "RUNNING"
    return live
