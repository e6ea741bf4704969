"""Stop signals and the test hold: how a run learns that it must stop, or wait.

SIGTERM (preemption), SIGUSR2 (SLURM's warning before the time limit) and SIGINT (Ctrl-C)
are recorded; the loop checks :attr:`StopSignals.requested` between steps, a long evaluation
asks it often (and is abandoned), and the run checkpoints. Two exceptions act in the handler:
a second SIGINT raises ``KeyboardInterrupt`` (as Python does), and a signal while the data
loads raises :class:`StopDuringSetup` (nothing to save yet). ``$DECON_HOLD`` (a test hook,
:mod:`deconcnn_cli.runenv`) parks a run after a given step until a release file appears or a
stop signal comes.
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


class StopDuringSetup(BaseException):  # noqa: N818 (not an error: a stop, as KeyboardInterrupt)
    """A stop signal during :meth:`StopSignals.raising` (loading data): nothing to save yet.
    A BaseException, so that no ``except Exception`` on the way (a download's) swallows it."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


class StopSignals:
    """Records SIGTERM / SIGUSR2 / SIGINT from the first line of a run (SLURM sends USR2, whose
    default action kills). The loop stops at the next step boundary, and a long evaluation
    asks :attr:`requested` often enough to be abandoned within seconds. A second SIGINT (a
    second Ctrl-C) raises ``KeyboardInterrupt`` at once, as Python does; repeated SIGTERM and
    SIGUSR2 (a job resends them while it waits) are only recorded."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}
        self._raising = False

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        again = signum == signal.SIGINT and signal.SIGINT in self.received
        self.received.append(signum)
        if again:
            raise KeyboardInterrupt
        if self._raising:
            raise StopDuringSetup(signum)

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Inside the block a stop signal (or one that came before it) raises
        :class:`StopDuringSetup` at once: for work with nothing to save (loading data)."""
        if self.received:
            raise StopDuringSetup(self.received[0])
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    @contextlib.contextmanager
    def installed(self, *, keep: bool = False) -> Iterator[StopSignals]:
        """Record stop signals inside the block; afterwards restore the previous handlers, or
        with ``keep`` ignore these signals (``SIG_IGN``, which also holds while the interpreter
        shuts down): for a process that exits once the run has ended, where a signal that
        comes after the run was recorded must not turn its exit code into a kill."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, signal.SIG_IGN if keep else handler)


def wait_for_release(hold: Hold, stops: StopSignals) -> None:
    """Wait until ``hold.release_file`` exists or a stop signal came."""
    while not stops.requested and not hold.release_file.exists():
        time.sleep(HOLD_POLL_S)
