"""The resource profile's ``[container]`` and ``[sbatch]`` sections, and their refusals.

``[container]``: every job runs inside a Singularity/Apptainer image (docs/cluster.md,
"Inside a container"). ``[sbatch]``: extra ``#SBATCH`` options decon does not model itself
(``constraint``, ``mail_type``, ...), each value checked as the profile's own strings are.
Torch-free and free of the rest of the package (``config.py`` imports it).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# singularity/apptainer flags that break a job: they drop the SLURM environment (the job's id,
# its CPUs, DECON_* and the MPS pipe directories) or give the container a private /tmp
REFUSED_FLAGS = {
    "--cleanenv": "drops the SLURM environment (job id, CPUs, DECON_* settings)",
    "-e": "(--cleanenv) drops the SLURM environment (job id, CPUs, DECON_* settings)",
    "--containall": "drops the SLURM environment and hides the host's /tmp (MPS pipes)",
    "-C": "(--containall) drops the SLURM environment and hides the host's /tmp (MPS pipes)",
    "--contain": "hides the host's /tmp and $HOME (MPS pipes, the job's files)",
    "-c": "(--contain) hides the host's /tmp and $HOME (MPS pipes, the job's files)",
}

# [sbatch] options decon writes itself (or that break how submitit reads sbatch's answer)
OWNED_OPTIONS = {
    "output": "decon (submitit) writes each job's log under the sweep root",
    "error": "decon (submitit) writes each job's log under the sweep root",
    "open_mode": "decon (submitit) appends each attempt to the job's log",
    "signal": "set signal_delay_s",
    "array": "decon packs the jobs into arrays below MaxArraySize",
    "requeue": "decon always asks for requeue",
    "no_requeue": "decon relies on requeue after a time limit or a node failure",
    "time": "set time_limit_min",
    "gres": "set the profile's gres (one GPU per job)",
    "gpus": "set the profile's gres (one GPU per job)",
    "gpus_per_node": "set the profile's gres (one GPU per job)",
    "gpus_per_task": "set the profile's gres (one GPU per job)",
    "job_name": "decon names the jobs after the grid",
    "nodes": "a decon job is one task on one node",
    "ntasks": "a decon job is one task on one node",
    "ntasks_per_node": "a decon job is one task on one node",
    "cpus_per_task": "set cpus_per_run (the job asks for cpus_per_run x runs_per_gpu)",
    "mem": "set mem_gb_per_run (the job asks for mem_gb_per_run x runs_per_gpu)",
    "mem_per_cpu": "set mem_gb_per_run (the job asks for mem_gb_per_run x runs_per_gpu)",
    "mem_per_gpu": "set mem_gb_per_run (the job asks for mem_gb_per_run x runs_per_gpu)",
    "partition": "set the profile's partition",
    "account": "set the profile's account",
    "qos": "set the profile's qos",
    "export": "the job needs the submitting shell's environment (DECON_*, PATH)",
    "parsable": "decon reads the job id from sbatch's usual answer",
    "test_only": "decon reads the job id from sbatch's usual answer",
    "wait": "decon submit returns once the jobs are queued",
    "wrap": "decon writes the job's script",
}

# what an #SBATCH value may hold: SLURM's names, lists, node ranges (node[01-04]), features
# (rtx8000|v100&ib), mail addresses, times; never whitespace, quotes, $ or a control character
SBATCH_VALUE_PATTERN = re.compile(r"^[A-Za-z0-9_.,:+=/@%\[\]|&!*-]*$")
SBATCH_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")

SbatchValue = bool | int | str


def _printable(value: str, field: str) -> str:
    if not value.isprintable():
        raise ValueError(f"{field} {value!r} holds a control character (a newline, a tab, ...)")
    return value


def _absolute(value: str, field: str) -> str:
    _printable(value, field)
    if not value.startswith("/"):
        raise ValueError(
            f"{field} {value!r} is not an absolute path (a job starts in another folder)"
        )
    if "," in value:  # singularity splits -B/--overlay lists at commas
        raise ValueError(f"{field} {value!r} holds a comma (the runtime splits lists there)")
    return value


class ContainerConfig(BaseModel):
    """``[container]``: run every job inside this image (docs/cluster.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: Literal["singularity", "apptainer"] = "singularity"  # looked up on the node's PATH
    image: str  # an absolute path of the image (.sif) on a filesystem the nodes see
    overlays: list[str] = []  # --overlay each: PATH or PATH:ro (PATH:rw only for one job)
    binds: list[str] = []  # -B each: SRC[:DEST[:OPTS]]; the sweep root and data_dir are added
    setup: list[str] = []  # shell lines run inside the container before python
    python: Annotated[str, Field(min_length=1)] = "python"  # the python inside (after setup)
    flags: list[str] = []  # more flags of `RUNTIME exec` (e.g. --writable-tmpfs)

    @field_validator("setup", mode="before")
    @classmethod
    def _setup_lines(cls, value: Any) -> Any:
        return value.splitlines() if isinstance(value, str) else value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        return _absolute(value, "image")

    @field_validator("overlays")
    @classmethod
    def _overlays(cls, value: list[str]) -> list[str]:
        for i, item in enumerate(value):
            path = item.removesuffix(":ro").removesuffix(":rw")
            _absolute(path, f"overlays[{i}]")
        return value

    @field_validator("binds")
    @classmethod
    def _binds(cls, value: list[str]) -> list[str]:
        for i, item in enumerate(value):
            _absolute(item.split(":")[0], f"binds[{i}]")
            _printable(item, f"binds[{i}]")
        return value

    @field_validator("setup")
    @classmethod
    def _setup(cls, value: list[str]) -> list[str]:
        for i, line in enumerate(value):
            _printable(line, f"setup line {i + 1}")
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        _printable(value, "python")
        if not re.fullmatch(r"[A-Za-z0-9_./+-]+", value):
            raise ValueError(f"python {value!r}: a command name or path, without spaces")
        return value

    @field_validator("flags")
    @classmethod
    def _flags(cls, value: list[str]) -> list[str]:
        for i, flag in enumerate(value):
            _printable(flag, f"flags[{i}]")
            name = flag.split("=")[0]
            if name in REFUSED_FLAGS:
                raise ValueError(f"flags[{i}] {flag!r} {REFUSED_FLAGS[name]}: the job breaks")
            if not flag.startswith("-"):
                raise ValueError(f"flags[{i}] {flag!r} is not a flag (begins with -)")
        return value

    def writable_overlays(self) -> list[str]:
        return [o for o in self.overlays if not o.endswith(":ro")]


def check_sbatch_options(options: dict[str, Any]) -> dict[str, Any]:
    """``[sbatch]``: every key a plain option name decon does not own, every value a bool, an
    int or a string of what SLURM accepts in a directive. Raises ValueError naming the key."""
    for key, value in options.items():
        field = f"sbatch.{key}"
        if not SBATCH_KEY_PATTERN.match(key):
            raise ValueError(f"{field}: not an sbatch option name (lower case, - or _)")
        norm = key.replace("-", "_")
        if norm in OWNED_OPTIONS:
            raise ValueError(f"{field}: decon sets this option itself ({OWNED_OPTIONS[norm]})")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            continue
        if not isinstance(value, str):
            raise ValueError(f"{field}: give a string, a number or true/false")
        if not value.isprintable():
            raise ValueError(f"{field}: {value!r} holds a control character")
        if not SBATCH_VALUE_PATTERN.match(value):
            raise ValueError(
                f"{field}: {value!r} holds a character an #SBATCH line cannot carry safely "
                "(whitespace, a quote, $, ;, ...)"
            )
    normalized = [k.replace("-", "_") for k in options]
    if len(set(normalized)) != len(normalized):
        raise ValueError("sbatch: an option is given twice (with - and with _)")
    return options


def sbatch_parameters(options: dict[str, Any]) -> dict[str, Any]:
    """``[sbatch]`` as submitit's ``additional_parameters``: ``true`` a bare flag, ``false``
    and empty strings dropped (submitit would write ``--x=False``), the rest as text."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if value is False or value == "" or value is None:
            continue
        out[key.replace("-", "_")] = True if value is True else str(value)
    return out


def gres_gpu_count(gres: str) -> int | None:
    """GPUs per node asked for by a ``gres`` string (``gpu:1``, ``gpu:rtx8000:2``, ``gpu``);
    None when it asks for none."""
    for entry in gres.split(","):
        parts = entry.split(":")
        if parts[0] != "gpu":
            continue
        if len(parts) > 1 and parts[-1].isdigit():
            return int(parts[-1])
        return 1
    return None
