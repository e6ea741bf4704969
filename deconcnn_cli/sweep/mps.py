"""CUDA MPS for one job: a control daemon owned by the job, shared by its runs. No torch here.

With MPS the two runs of a job submit their kernels to one MPS server, which runs them
concurrently on the card, instead of the driver time-slicing two contexts. The daemon is the
job's own: its pipe and log directories are private to the job and attempt (unique per job
id, requeue count and process), are passed to the runs in their environment, and are removed
when the job stops it.

The daemon is started with the job's ``CUDA_VISIBLE_DEVICES`` (SLURM's, e.g. ``2``), and the
MPS server renumbers the devices it was started with from 0 (NVIDIA's MPS guide, "CUDA
Visible Devices"): a client that kept ``2`` would see no device. So the runs get the remapped
view, ``0..n-1``. The daemon's own output goes to a file, never a pipe: the daemon keeps the
stdout it inherits open, and a caller reading a pipe would wait for it to end.

If MPS cannot start (no binary, no permission, a daemon already
answering on the node, the card in a mode that refuses it), the runs go on without it and
the reason is given back so that each run can record it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from deconcnn_cli.runenv import MPS_REASON_ENV as REASON_ENV
from deconcnn_cli.runenv import MPS_STATE_ENV as STATE_ENV

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV, LOG_ENV = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
THREADS_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"  # a client's share of the card's SMs
DAEMON_OUTPUT = "control-d.out"  # in the job's folder: what `nvidia-cuda-mps-control -d` says
CALL_TIMEOUT_S = 10.0  # one call of the control program; MPS never makes a job wait longer


@dataclass
class MpsDaemon:
    """The job's daemon: ``active`` when it started and answers; else ``reason`` says why not."""

    active: bool = False
    reason: str = ""
    root: Path | None = None  # the job's private folder: pipe/ and log/ inside
    calls: list[str] = field(default_factory=list)
    visible: str | None = None  # the job's CUDA_VISIBLE_DEVICES the daemon was started with
    thread_percentage: int | None = None  # each run's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE

    def env(self) -> dict[str, str]:
        """What the runs' environment gets: when active, the pipe/log directories, the
        devices as the server numbers them and the thread percentage (if set); when not,
        ``DECON_MPS=0`` with the reason (and the job's devices left as they are)."""
        if self.active and self.root:
            env = {**self._dirs(), STATE_ENV: "1"}
            if self.visible is not None:
                env[VISIBLE_ENV] = remapped_devices(self.visible)
            if self.thread_percentage is not None:
                env[THREADS_ENV] = str(self.thread_percentage)
            return env
        return {STATE_ENV: "0", REASON_ENV: self.reason}

    def stop(self) -> None:
        """``quit`` the daemon (if this job started it) and remove its directories."""
        if self.active:
            self._control("quit")
            self.active = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _dirs(self) -> dict[str, str]:
        if self.root is None:
            return {}
        return {PIPE_ENV: str(self.root / "pipe"), LOG_ENV: str(self.root / "log")}

    def _control(self, command: str) -> subprocess.CompletedProcess | None:
        """Send one command to this job's daemon; None if the program could not be run."""
        self.calls.append(command)
        try:
            return subprocess.run(
                [CONTROL],
                input=command + "\n",
                capture_output=True,
                text=True,
                timeout=CALL_TIMEOUT_S,
                env=self._env(),
            )
        except (OSError, subprocess.SubprocessError):
            return None

    def _env(self) -> dict[str, str]:
        return {**os.environ, **self._dirs()}


def remapped_devices(visible: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a client of a server started with ``visible``: the
    server's devices numbered from 0 (``"2"`` -> ``"0"``, ``"1,3"`` -> ``"0,1"``, UUIDs alike).
    An empty value (no device) stays empty."""
    devices = [d for d in visible.split(",") if d.strip()]
    return ",".join(str(i) for i in range(len(devices)))


def start_mps(
    tag: str, base: str | None = None, *, thread_percentage: int | None = None
) -> MpsDaemon:
    """Start a control daemon private to this job (``tag``: job id and attempt). Never raises:
    on any problem the daemon is inactive and ``reason`` says why. ``thread_percentage``:
    each run's ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (the resource profile's, optional)."""
    binary = shutil.which(CONTROL)
    if binary is None:
        return MpsDaemon(reason=f"{CONTROL} not found on PATH")
    if os.environ.get(PIPE_ENV):  # someone else's daemon (the node's, or an outer job's)
        return MpsDaemon(reason=f"{PIPE_ENV} is already set ({os.environ[PIPE_ENV]}): not ours")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    root = Path(tempfile.mkdtemp(prefix=f"decon-mps-{safe}-", dir=base or _node_tmp()))
    daemon = MpsDaemon(
        root=root, visible=os.environ.get(VISIBLE_ENV), thread_percentage=thread_percentage
    )
    (root / "pipe").mkdir(mode=0o700)
    (root / "log").mkdir(mode=0o700)
    output = root / DAEMON_OUTPUT
    try:
        with open(output, "wb") as out_file:  # a file: the daemon keeps it open
            out = subprocess.run(
                [binary, "-d"],
                stdin=subprocess.DEVNULL,
                stdout=out_file,
                stderr=subprocess.STDOUT,
                timeout=CALL_TIMEOUT_S,
                env=daemon._env(),
            )
    except (OSError, subprocess.SubprocessError) as exc:
        daemon.stop()
        return MpsDaemon(reason=f"{CONTROL} -d failed: {exc}")
    daemon.calls.append("-d")
    if out.returncode != 0:
        text = output.read_text(errors="replace").strip()[-200:]
        daemon.stop()
        return MpsDaemon(reason=f"{CONTROL} -d exited {out.returncode}: {text}")
    daemon.active = True
    # the daemon answers once its pipe exists; a daemon that never answers is not used
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while time.monotonic() < deadline:
        reply = daemon._control("get_server_list")
        if reply is not None and reply.returncode == 0:
            return daemon
        time.sleep(0.2)
    daemon.stop()
    return MpsDaemon(reason=f"the MPS control daemon did not answer within {CALL_TIMEOUT_S:.0f} s")


def _node_tmp() -> str:
    """The node's temporary directory (SLURM's per-job TMPDIR where set)."""
    return os.environ.get("TMPDIR") or tempfile.gettempdir()
