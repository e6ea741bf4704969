"""A run's live TensorBoard event files (``<run>/tb/``): written as its streams grow.

Best effort by design: the metric streams are the run's record, the event files a view of
them. A missing library, an unwritable ``tb/`` folder or a write that fails (a full disk)
turns the events off for the rest of the attempt with one event in events.jsonl saying why;
the run goes on. Opened once the resume point is known, with TensorBoard's purge marker at
it: what an earlier attempt logged at or after that step (rows the resume replays) is
dropped by the viewer, as the streams drop it (docs/run-directory.md, "TensorBoard").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deconcnn_cli import tbevents
from deconcnn_cli.contract import TENSORBOARD_DIR

LogEvent = Callable[..., None]  # RunWriter.log_event(level, message, **fields)


class RunEvents:
    """The event file of one attempt; every method is a no-op once it is off."""

    def __init__(self, run_dir: Path, mode: str, log_event: LogEvent) -> None:
        self.log_dir = run_dir / TENSORBOARD_DIR
        self.mode = mode  # auto | on | off (RunConfig.logging.tensorboard)
        self._log_event = log_event
        self._file: tbevents.EventFile | None = None

    @property
    def active(self) -> bool:
        return self._file is not None

    def open(self, purge_step: int) -> None:
        """Start this attempt's file at the resume point ``purge_step``."""
        if self.mode == "off" or self._file is not None:
            return
        missing = tbevents.available()
        if missing is not None:
            level = "warning" if self.mode == "on" else "info"
            self._log_event(level, f"no TensorBoard event files: {missing}")
            return
        if self.log_dir.is_symlink():  # a link could point into someone else's folder
            self._log_event("warning", f"no TensorBoard event files: {self.log_dir} is a link")
            return
        try:
            self._file = tbevents.EventFile(self.log_dir, purge_step=purge_step)
        except Exception as exc:  # an unwritable or broken tb/ folder: the run goes on
            self._turn_off("cannot open", exc)

    def rows(self, stream: str, rows: list[Mapping[str, Any]]) -> None:
        """The scalars of rows just appended to ``stream``, handed to the OS at once (this
        is the run's block flush, validation or metric evaluation)."""
        if self._file is not None:
            self.scalars([(int(r["step"]), tbevents.scalars_of(stream, r)) for r in rows])

    def scalars(self, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        if self._file is None:
            return
        try:
            self._file.add(rows)
            self._file.flush()
        except Exception as exc:  # a full disk, a removed folder: the streams go on
            self._turn_off("cannot write", exc)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception as exc:
                self._turn_off("cannot close", exc)
            self._file = None

    def _turn_off(self, what: str, exc: BaseException) -> None:
        where = self._file.path if self._file is not None else self.log_dir
        self._log_event(
            "warning",
            f"TensorBoard events off for this attempt: {what} {where}: {type(exc).__name__}: "
            f"{exc} (the metric streams go on; `decon export --tensorboard` rebuilds the "
            "events from them)",
            exception_type=type(exc).__name__,
        )
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):  # the error was already reported
                file.close()
