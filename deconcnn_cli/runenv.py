"""The environment protocol between a job and the runs it starts: the variables a launcher
sets (concurrency, GPU share, MPS state, a required GPU, deterministic cuBLAS, the test hold)
and how a run reads them. No torch: the job side (sweep.job) and the run side
(training) both import it. Names and meanings: docs/cluster.md."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ---- the signals that stop a run with a checkpoint (SLURM's time-limit USR2, preemption's TERM,
# Ctrl-C); a job forwards each to its runs (sweep.job), and each run exits with 128 + signal
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
# ---- threads: a launcher that starts several runs on one allocation sets this env var to
# their number; each run then takes its share of the CPUs it was given (see default_threads).
CONCURRENT_RUNS_ENV = "DECON_CONCURRENT_RUNS"
# ---- GPU memory: a launcher that starts N runs on one GPU sets this to N; each run then caps
# its CUDA caching allocator at its share of the card (training.device.cap_gpu_memory).
GPU_SHARE_ENV = "DECON_GPU_SHARE"
# ---- a job whose resource profile asks for a GPU sets this to 1: a run then fails (with the
# driver's and the wheel's CUDA versions) instead of training on the CPU (training.device)
REQUIRE_GPU_ENV = "DECON_REQUIRE_GPU"
# ---- exact replay on a GPU: cuBLAS's deterministic workspace, read when its first handle is
# made (so set in the run's environment); DECON_DETERMINISTIC=warn lets a torch build that
# lacks a deterministic kernel warn instead of fail (training.device.deterministic)
CUBLAS_ENV, CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"


DETERMINISTIC_ENV = "DECON_DETERMINISTIC"
# ---- CUDA MPS: a job that started its MPS daemon sets DECON_MPS=1 in its runs' environment,
# else 0 with the reason (sweep.mps); each run records it in status.json and its start line
MPS_STATE_ENV, MPS_REASON_ENV = "DECON_MPS", "DECON_MPS_REASON"
# ---- a job inside a container: the batch script (on the host) sets this to a file under the
# sweep's jobs/ folder; the job process writes it instead of calling `scontrol requeue`, and
# the batch script requeues the job when it finds it (sweep.container)
REQUEUE_FILE_ENV = "DECON_REQUEUE_FILE"


def gpu_share(environ: dict[str, str] | None = None) -> int:
    """How many runs share this process's GPU (``$DECON_GPU_SHARE``; 1 when unset or bad)."""
    env = os.environ if environ is None else environ
    return max(1, _env_int(env, GPU_SHARE_ENV) or 1)


def default_threads(environ: dict[str, str] | None = None) -> int:
    """Intra-op threads for one run: the CPUs this process is given (``SLURM_CPUS_PER_TASK``,
    else the affinity mask), divided by ``$DECON_CONCURRENT_RUNS`` when set; at least 1."""
    env = os.environ if environ is None else environ
    cpus = _env_int(env, "SLURM_CPUS_PER_TASK")
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cpus = cpus or os.cpu_count() or 1
    return max(1, cpus // max(1, _env_int(env, CONCURRENT_RUNS_ENV) or 1))


# ---- a test hook: ``$DECON_HOLD="N[,N...]:PATH"`` holds a run after N steps until PATH exists or
# a stop signal comes, so a test can signal a run that is certainly mid-training, whatever the
# machine's speed (tests/sweep/test_slurm*.py). Unset in normal use: the loop then never waits.
HOLD_ENV = "DECON_HOLD"


@dataclass(frozen=True)
class Hold:
    """Where a run waits (steps done) and the file that lets it go on."""

    at_steps: frozenset[int]
    release_file: Path


def hold_from_env(environ: dict[str, str] | None = None) -> Hold | None:
    """``$DECON_HOLD`` parsed (None when unset or empty); a malformed value raises ValueError."""
    env = os.environ if environ is None else environ
    text = env.get(HOLD_ENV, "").strip()
    if not text:
        return None
    steps, sep, path = text.partition(":")
    try:
        at_steps = frozenset(int(n) for n in steps.split(","))
    except ValueError:
        at_steps = frozenset()
    if not sep or not path or not at_steps or min(at_steps) < 1:
        raise ValueError(
            f"${HOLD_ENV}={text!r}: expected STEPS:PATH, steps done as positive integers "
            "separated by commas, e.g. '5,30:/tmp/release'"
        )
    return Hold(at_steps, Path(path))


def _env_int(env: dict[str, str] | os._Environ[str], name: str) -> int | None:
    """``int($name)``, or None when unset or not an integer."""
    try:
        return int(env.get(name, ""))
    except ValueError:
        return None


def mps_state() -> dict[str, Any]:
    """Whether this run runs under the job's CUDA MPS daemon (``sweep.mps`` sets
    ``DECON_MPS``), and why not; empty where no job said (a bare ``decon train``)."""
    state = os.environ.get(MPS_STATE_ENV)
    if state is None:
        return {}
    reason = os.environ.get(MPS_REASON_ENV, "")
    return {"mps": state == "1", **({"mps_reason": reason} if state != "1" else {})}


def child_env(
    threads: int,
    gpu_share: int = 1,
    *,
    require_gpu: bool = False,
    mps: dict[str, str] | None = None,
) -> dict[str, str]:
    """A run's environment: its threads; how many runs share its GPU (each caps its CUDA
    allocator at its share: ``training.device.cap_gpu_memory``); cuBLAS's deterministic
    workspace (it must be set before CUDA initialises); ``DECON_REQUIRE_GPU`` when the
    resource profile asks for a GPU (the run then fails rather than train on the CPU); and
    the job's MPS daemon (``sweep.mps``: its pipe directories, the devices as its server
    numbers them and the thread percentage, or why there is none)."""
    n = str(threads)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "PYTHONUNBUFFERED": "1",
        GPU_SHARE_ENV: str(max(1, gpu_share)),
        CUBLAS_ENV: os.environ.get(CUBLAS_ENV) or CUBLAS_WORKSPACE,
        REQUIRE_GPU_ENV: "1" if require_gpu else "0",
        **(mps or {}),
    }
    return env
