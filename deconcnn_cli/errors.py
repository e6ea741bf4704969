"""Typed errors. Library code raises these; only the CLI edge prints them."""

from __future__ import annotations


class DeconError(Exception):
    """An error the user can act on: a message and a hint saying what to do next."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(DeconError):
    """A profile, override or flag that does not make a valid run config."""


class RunDirError(DeconError):
    """A run directory that is missing, foreign or unreadable."""


class RunOwnedError(DeconError):
    """Another live process (this host or another) owns the run directory."""

    exit_code = 4


class PrecisionError(DeconError):
    """The run's stored precision cannot run on this device (a resume is refused)."""


class SweepError(DeconError):
    """A sweep root that is missing, foreign, locked or asked for something it cannot do."""


class SchedulerError(DeconError):
    """The scheduler is unreachable or refused a submission (exit 5)."""

    exit_code = 5


class GpuRequiredError(DeconError):
    """A GPU job (its resource profile asks for one) found no usable CUDA device: the run
    fails at once with the reason, never trains on the CPU instead."""

    exit_code = 1
