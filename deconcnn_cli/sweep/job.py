"""The job side: run a group of runs as child ``decon train`` processes. No torch here.

One SLURM job holds the runs that share a GPU (design B of the research notes): one task whose
function starts each run as a child process ``python -m deconcnn_cli train --run-dir DIR
--quiet --threads N``, watches them with ``poll()``, and forwards stop signals. Each run
checkpoints on the signal itself and, after a requeue, resumes from its own directory, so a
job rebuilt by the scheduler (timeout, preemption, node failure, ``scontrol requeue``) needs no
state but the list of run directories.

The local executor starts a detached :func:`run_local` runner with the same child command,
``parallel_runs`` children at a time (``python -m deconcnn_cli.sweep.job SPEC.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deconcnn_cli import contract, runenv

POLL_S = 0.5  # how often the job looks at its children
RESEND_EVERY_S = 2.0  # how often a stop signal is repeated to a child that has not exited


def train_command(run_dir: Path, threads: int) -> list[str]:
    """The command one run executes inside a job (both executors)."""
    return [
        sys.executable,
        "-m",
        "deconcnn_cli",
        "train",
        "--run-dir",
        str(run_dir),
        "--quiet",
        "--threads",
        str(threads),
    ]


def needs_start(run_dir: Path) -> str | None:
    """Why a run of this job should not be started now (``None``: start it)."""
    view = contract.view_run(run_dir)
    if view.terminal:
        return view.state
    if not (run_dir / contract.CONFIG_FILE).is_file():
        return f"no {contract.CONFIG_FILE}"
    return None


def _log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"[decon job {stamp}] {message}", flush=True)


@dataclass
class _Child:
    run_dir: Path
    proc: subprocess.Popen
    log: Any


def _start(run_dir: Path, threads: int, gpu_share: int = 1, **env: Any) -> _Child:
    """Start one run; ``env``: ``child_env``'s keywords (require_gpu, mps)."""
    log = open(run_dir / contract.LOG_FILE, "ab")  # noqa: SIM115 - closed in _reap
    proc = subprocess.Popen(
        train_command(run_dir, threads),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=runenv.child_env(threads, gpu_share, **env),
        preexec_fn=_ignore_usr2,
    )
    _log(f"started {run_dir.name} (pid {proc.pid}, {threads} threads)")
    return _Child(run_dir, proc, log)


def _ignore_usr2() -> None:
    """In the child before exec: SLURM signals every process of the step, and USR2's default
    action kills. A run still importing torch would die without a word; ignored, the signal
    is harmless until the run installs its own handler (the job then sends it again)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _reap(child: _Child, code: int) -> None:
    child.log.close()
    state = contract.view_run(child.run_dir).written_state
    _log(f"{child.run_dir.name} exited {code} ({state})")


def _wait_children(
    children: list[_Child], timeout_s: float, resend: int | None = None
) -> list[_Child]:
    """Poll until every child exited or ``timeout_s`` passed; the ones still alive.

    ``resend``: signal the children still alive every RESEND_EVERY_S (one that was starting
    up when the first signal came ignored it)."""
    deadline = time.monotonic() + timeout_s
    next_send = time.monotonic()
    alive = list(children)
    while alive and time.monotonic() < deadline:
        for child in list(alive):
            code = child.proc.poll()
            if code is not None:
                _reap(child, code)
                alive.remove(child)
        if alive and resend is not None and time.monotonic() >= next_send:
            for child in alive:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(resend)
            next_send = time.monotonic() + RESEND_EVERY_S
        if alive:
            time.sleep(POLL_S)
    return alive


@dataclass
class RunGroup:
    """What the scheduler pickles for one job: the run directories and the attempt cap.

    Picklable (no processes inside). ``checkpoint()`` is submitit's hook on the timeout or
    preemption signal: it passes the signal to the children, waits for them to save, and hands
    back a fresh ``RunGroup`` of the same runs for the requeued job.
    """

    run_dirs: list[str]
    max_attempts: int
    grace_s: float = 60.0  # how long checkpoint() waits for the children to save
    require_gpu: bool = False  # the profile asks for a GPU: a run never falls back to the CPU
    mps: bool = False  # start a CUDA MPS daemon for the job's runs (sweep.mps)
    mps_thread_percentage: int | None = None  # each run's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE
    _children: list[_Child] = field(default_factory=list, repr=False, compare=False)
    _mps: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_children"] = []
        state["_mps"] = None
        return state

    def __call__(self) -> dict[str, str]:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if restarts + 1 > self.max_attempts:
            raise RuntimeError(
                f"attempt cap reached: this job started {restarts + 1} times "
                f"(max_attempts {self.max_attempts}); its runs are left for `decon recover`"
            )
        from deconcnn_cli.sweep.container import use_host_requeue

        if use_host_requeue():  # inside a container: the batch script requeues
            _log("in a container: a requeue is left to the batch script on the host")
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1)
        todo = []
        for d in map(Path, self.run_dirs):
            why = needs_start(d)
            if why:
                _log(f"{d.name}: not started ({why})")
            else:
                todo.append(d)
        threads = max(1, cpus // max(1, len(todo)))
        terminated = self._on_sigterm()
        try:
            mps_env = self._start_mps(restarts) if todo else {}
            self._children = [
                _start(d, threads, len(todo), require_gpu=self.require_gpu, mps=mps_env)
                for d in todo
            ]
            _wait_children(self._children, float("inf"))
        finally:  # completion, a run's failure, SIGTERM (cancel, requeue), USR2's exit
            self._stop_mps()
        if terminated:  # cancelled, or requeued without the hook (preemption, scontrol)
            _log("SIGTERM: the runs saved; exiting without a result for the scheduler to act")
            sys.exit(128 + signal.SIGTERM)
        states = {Path(d).name: contract.view_run(Path(d)).state for d in self.run_dirs}
        bad = {k: v for k, v in states.items() if v not in contract.TERMINAL_STATES}
        if bad:  # an honest failure status: the scheduler records FAILED
            raise RuntimeError(f"runs not finished: {bad}")
        return states

    def _start_mps(self, restarts: int) -> dict[str, str]:
        """The job's MPS daemon, if the profile asks for one: the runs' environment for it
        (its pipe directories, or ``DECON_MPS=0`` and why it could not start)."""
        if not self.mps:
            return {}
        from deconcnn_cli.sweep.mps import start_mps

        job = os.environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"
        self._mps = start_mps(f"{job}-{restarts}", thread_percentage=self.mps_thread_percentage)
        if self._mps.active:
            _log(f"MPS control daemon started ({self._mps.root})")
        else:
            _log(f"MPS not started: {self._mps.reason}; the runs go on without it")
        return self._mps.env()

    def _stop_mps(self) -> None:
        if self._mps is not None:
            was_active = self._mps.active
            self._mps.stop()
            if was_active:
                _log("MPS control daemon stopped")
            self._mps = None

    def _on_sigterm(self) -> list[int]:
        """On SIGTERM pass it to the runs (they checkpoint and exit) and remember it: the job
        must then neither return nor raise, or submitit records a result for a job SLURM is
        requeueing (research notes, design B)."""
        seen: list[int] = []
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            seen.append(signum)
            for child in self._children:
                if child is not None and child.proc.poll() is None:  # None: not started
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.send_signal(signal.SIGTERM)
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, handler)
        return seen

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit  # job side only

        alive = [c for c in self._children if c.proc.poll() is None]
        _log(f"stop signal: asking {len(alive)} run(s) to checkpoint")
        left = _wait_children(alive, self.grace_s, resend=signal.SIGUSR2)
        for child in left:
            _log(f"{child.run_dir.name} did not exit within {self.grace_s:.0f} s")
        self._stop_mps()  # the requeued job starts its own
        fresh = RunGroup(
            list(self.run_dirs),
            self.max_attempts,
            self.grace_s,
            self.require_gpu,
            self.mps,
            self.mps_thread_percentage,
        )
        return submitit.helpers.DelayedSubmission(fresh)


# ---------------------------------------------------------------------------------------------
# Local runner: a detached process per submission


def run_local(spec: dict[str, Any]) -> int:
    """Run ``spec["run_dirs"]``, ``spec["parallel_runs"]`` at a time; 0 if all ended terminal.

    A stop signal is passed to the children (they checkpoint) and the runner exits 128+sig
    after they did; ``decon submit`` again resumes them.
    """
    run_dirs = [Path(d) for d in spec["run_dirs"]]
    parallel = int(spec["parallel_runs"])
    threads = int(spec["threads"])
    max_attempts = int(spec.get("max_attempts", 1))
    stop: list[int] = []
    for s in runenv.STOP_SIGNALS:
        signal.signal(s, lambda n, _f: stop.append(n))
    queue = [d for d in run_dirs]
    started: dict[Path, int] = {}
    children: list[_Child] = []
    _log(f"local runner {spec.get('job_id')}: {len(queue)} run(s), {parallel} at a time")
    while (queue or children) and not stop:
        for child in list(children):
            code = child.proc.poll()
            if code is None:
                continue
            _reap(child, code)
            children.remove(child)
            state = contract.view_run(child.run_dir).written_state
            retry = state == contract.INTERRUPTED and started[child.run_dir] < max_attempts
            if retry:  # stopped by someone else's signal: resume it
                queue.append(child.run_dir)
        while queue and len(children) < parallel and not stop:
            d = queue.pop(0)
            why = needs_start(d)
            if why:
                _log(f"{d.name}: not started ({why})")
                continue
            started[d] = started.get(d, 0) + 1
            children.append(_start(d, threads, parallel))
        time.sleep(POLL_S)
    if stop:
        for child in children:
            if child.proc.poll() is None:
                child.proc.send_signal(stop[0])
        _wait_children(children, 120.0)
        _log(f"stopped by signal {stop[0]}")
        return 128 + stop[0]
    states = {d.name: contract.view_run(d).state for d in run_dirs}
    _log(f"done: {states}")
    return 0 if all(s in contract.TERMINAL_STATES for s in states.values()) else 1


def main(argv: list[str]) -> int:
    """``python -m deconcnn_cli.sweep.job SPEC.json``: the local runner's entry point."""
    spec = json.loads(Path(argv[0]).read_text())
    return run_local(spec)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
