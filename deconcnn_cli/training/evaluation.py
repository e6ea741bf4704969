"""Where a long evaluation of a run is, and whether it should stop: the progress callable the
loop hands to the analysis core (:mod:`deconcnn_cli.analysis.progress`).

A :class:`Watch` counts the stages it is told (``Lanczos 12/40``, ``probes 0/8``), renders
the progress line ``curvature at step 0: Lanczos 12/40, probes 0/8, 2m10s`` at most every
:data:`PROGRESS_EVERY_S`, and answers "stop" once the run's stop signal came; the analysis
function then abandons the evaluation (``EvaluationStopped``) and the loop checkpoints the
state from before it, so a resume repeats it at the same step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from deconcnn_cli.analysis.progress import STILL_WORKING

PROGRESS_EVERY_S = 1.0  # the progress line is refreshed at most this often
STAGE_NAMES = {"lanczos": "Lanczos"}  # how a stage is named on the line (else as told)


class Watch:
    """The ``progress`` of one evaluation (:data:`~deconcnn_cli.analysis.progress.ProgressFn`).

    ``show`` gets the progress line: first after ``first_after_s`` (0: at the first call; an
    evaluation that usually ends at once says nothing), then at most every ``every_s``.
    ``should_stop`` is asked at every call.
    """

    def __init__(
        self,
        title: str,
        should_stop: Callable[[], bool],
        show: Callable[[str], None] | None = None,
        *,
        first_after_s: float = 0.0,
        every_s: float = PROGRESS_EVERY_S,
    ) -> None:
        self.title, self.should_stop, self.show = title, should_stop, show
        self.first_after_s, self.every_s = first_after_s, every_s
        self.counts: dict[str, tuple[int, int]] = {}
        self.started = time.monotonic()
        self.shown_at = -math.inf
        self.shown = False  # whether a line was shown (the caller then clears it)

    def __call__(self, stage: str, done: int, total: int) -> bool:
        if stage != STILL_WORKING:
            self.counts[stage] = (done, total)
        now = time.monotonic()
        due = now - self.shown_at >= self.every_s and now - self.started >= self.first_after_s
        if self.show is not None and due:
            self.shown_at, self.shown = now, True
            self.show(self.line(now))
        return self.should_stop()

    def line(self, now: float | None = None) -> str:
        """``<title>: <stage> <done>/<total>, ..., <elapsed>``."""
        now = time.monotonic() if now is None else now
        parts = [
            f"{STAGE_NAMES.get(stage, stage)} {done}/{total}" if total else f"{stage} {done}"
            for stage, (done, total) in self.counts.items()
        ]
        return f"{self.title}: {', '.join([*parts, elapsed(now - self.started)])}"


def elapsed(seconds: float) -> str:
    """``9s``, ``2m10s``, ``1h03m``: a duration on a progress line."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
