"""Stop signals and the test hold: how a run learns that it must stop, or wait.

SIGTERM (preemption), SIGUSR2 (SLURM's warning before the time limit) and SIGINT (Ctrl-C)
are recorded, never acted on inside a handler; the loop checks :attr:`StopSignals.requested`
and checkpoints. ``$DECON_HOLD`` (a test hook, :mod:`deconcnn_cli.runenv`) parks a run after
a given step until a release file appears or a stop signal comes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from deconcnn_cli.runenv import STOP_SIGNALS, Hold

HOLD_POLL_S = 0.1  # how often a held run looks for its release file (or a stop signal)


class StopSignals:
    """Records SIGTERM / SIGUSR2 / SIGINT from the first line of a run (SLURM sends USR2, whose
    default action kills); the loop stops at the next step boundary."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return bool(self.received)

    @contextlib.contextmanager
    def installed(self, *, keep: bool = False) -> Iterator[StopSignals]:
        """Record stop signals inside the block; afterwards restore the previous handlers, or
        with ``keep`` ignore these signals (``SIG_IGN``, which also holds while the interpreter
        shuts down): for a process that exits once the run has ended, where a signal that
        comes after the run was recorded must not turn its exit code into a kill."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {
                s: signal.signal(s, lambda n, _f: self.received.append(n)) for s in STOP_SIGNALS
            }
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, signal.SIG_IGN if keep else handler)


def wait_for_release(hold: Hold, stops: StopSignals) -> None:
    """Wait until ``hold.release_file`` exists or a stop signal came."""
    while not stops.requested and not hold.release_file.exists():
        time.sleep(HOLD_POLL_S)
