"""The sweep's schemas: grids (``profiles/grids/*.toml``) and resource profiles
(``profiles/resources/*.toml``), and their loaders, whose errors name the file and field.
A run's own config models are in :mod:`deconcnn_cli.config`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from deconcnn_cli.cluster_options import (
    ContainerConfig,
    SbatchValue,
    check_sbatch_options,
    gres_gpu_count,
)
from deconcnn_cli.config import MAX_SEED, StrictModel, is_profile_path, profiles_dir, read_toml
from deconcnn_cli.contract import NAME_PATTERN
from deconcnn_cli.errors import ConfigError


class GridAxes(StrictModel):
    """The swept axes; every combination is one run. Values are numbers as written: a
    string (``"0.1"``) or a boolean (``true``) is refused, never coerced into a run."""

    lr: Annotated[list[Annotated[float, Field(gt=0, strict=True)]], Field(min_length=1)]
    weight_decay: Annotated[list[Annotated[float, Field(ge=0, strict=True)]], Field(min_length=1)]
    seed: Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]], Field(min_length=1)
    ]


class VariantAxes(StrictModel):
    """Per-variant replacement of some axes (e.g. a sane lr range for adamw)."""

    lr: Annotated[list[Annotated[float, Field(gt=0, strict=True)]], Field(min_length=1)] | None = (
        None
    )
    weight_decay: (
        Annotated[list[Annotated[float, Field(ge=0, strict=True)]], Field(min_length=1)] | None
    ) = None
    seed: (
        Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]], Field(min_length=1)]
        | None
    ) = None


class GridSpec(StrictModel):
    """A sweep as data: variants x axes, each run = variant profile < profiles < overrides."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]  # also the sweep's job name
    description: str = ""
    variants: Annotated[list[str], Field(min_length=1)]
    profiles: list[str] = []  # extra profiles layered after the variant (e.g. ["smoke"])
    overrides: dict[str, Any] = {}  # a nested config layer applied to every run
    variant_overrides: dict[str, dict[str, Any]] = {}  # one more layer for one variant
    axes: GridAxes
    variant_axes: dict[str, VariantAxes] = {}

    @model_validator(mode="after")
    def _variant_axes_known(self) -> GridSpec:
        for key in ("variant_axes", "variant_overrides"):
            unknown = sorted(set(getattr(self, key)) - set(self.variants))
            if unknown:
                raise ValueError(f"{key} names variants not in `variants`: {unknown}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants lists a name twice")
        return self

    def axes_for(self, variant: str) -> GridAxes:
        extra = self.variant_axes.get(variant)
        if extra is None:
            return self.axes
        return self.axes.model_copy(update=extra.model_dump(exclude_none=True))


# partition/account/qos: one name or a comma-separated list; gres: e.g. gpu:1, gpu:a100:2
SLURM_NAMES_PATTERN = r"^[A-Za-z0-9_.,+-]*$"


SLURM_GRES_PATTERN = r"^[A-Za-z0-9_.,:+=/-]*$"


class ResourceProfile(StrictModel):
    """Where and how a sweep's runs execute: a SLURM GPU layout or N local CPU runs."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]  # the file's stem unless it sets one
    executor: Literal["slurm", "local"]
    description: str = ""
    # -- both
    cpus_per_run: Annotated[int, Field(ge=1)] = 1  # threads each run's torch may use
    max_attempts: Annotated[int, Field(ge=1)] = 5  # starts per run before it is left to recover
    data_dir: str | None = None  # where this machine keeps CIFAR (not part of run identity)
    # -- slurm: one job per GPU holding runs_per_gpu runs
    runs_per_gpu: Annotated[int, Field(ge=1)] = 2
    gpu_memory_gb: Annotated[float, Field(gt=0)] | None = None  # of one card
    gpu_memory_gb_per_run: dict[str, Annotated[float, Field(gt=0)]] = {}  # per variant
    mem_gb_per_run: Annotated[float, Field(gt=0)] = 8.0  # host memory
    time_limit_min: Annotated[int, Field(ge=1)] = 1440
    # each becomes an `#SBATCH --key=value` line: what SLURM accepts there, and nothing that
    # could end the line or the directive block (whitespace, control characters, quotes, $)
    partition: Annotated[str, Field(pattern=SLURM_NAMES_PATTERN)] | None = None
    account: Annotated[str, Field(pattern=SLURM_NAMES_PATTERN)] | None = None
    qos: Annotated[str, Field(pattern=SLURM_NAMES_PATTERN)] | None = None
    # what one job asks for; "" = no GPU (tests on CPU-only SLURM)
    gres: Annotated[str, Field(pattern=SLURM_GRES_PATTERN)] = "gpu:1"
    array_parallelism: Annotated[int, Field(ge=1)] = 64  # the %N of every array
    max_array_size: Annotated[int, Field(ge=1)] | None = None  # None: ask `scontrol show config`
    signal_delay_s: Annotated[int, Field(ge=10)] = 120  # USR2 this long before the limit
    # the runs must train on a GPU: one that finds none fails at once, naming the driver and
    # the wheel's CUDA, instead of training on the CPU (docs/cluster.md)
    require_gpu: bool = False
    # one CUDA MPS control daemon per job, shared by its runs (docs/cluster.md, "MPS")
    mps: bool = False
    # each run's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE under MPS (its share of the card's SMs, for a
    # card shared by more than two runs); None: the runs share all of them
    mps_active_thread_percentage: Annotated[int, Field(ge=1, le=100)] | None = None
    # run every job inside a Singularity/Apptainer image (docs/cluster.md, "Inside a container")
    container: ContainerConfig | None = None
    # extra `#SBATCH --key=value` options (constraint, mail_type, ...): true = a bare flag,
    # false or "" = not sent; the options decon sets itself are refused (cluster_options.py)
    sbatch: dict[str, SbatchValue] = {}
    # -- local
    parallel_runs: Annotated[int, Field(ge=1)] = 1
    host_memory_gb_per_run: dict[str, Annotated[float, Field(gt=0)]] = {}  # per variant
    _source: str = PrivateAttr(default="")  # how to load it again (set by the loader)

    @property
    def reference(self) -> str:
        """What a sweep records to load this profile again (recover, resubmit): its name
        when it is a shipped profile, else the absolute path of the file it came from."""
        return self._source or self.name

    @field_validator("sbatch")
    @classmethod
    def _sbatch_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_sbatch_options(value)

    @field_validator("gres")
    @classmethod
    def _one_gpu(cls, value: str) -> str:
        count = gres_gpu_count(value)
        if count is not None and count != 1:
            raise ValueError(
                f"{value!r} asks for {count} GPUs per job: a decon job is one GPU holding "
                "runs_per_gpu runs (write gpu:1, or gpu:TYPE:1, and set runs_per_gpu)"
            )
        return value

    @model_validator(mode="after")
    def _shared_overlays_read_only(self) -> ResourceProfile:
        if self.container is not None and (self.runs_per_gpu > 1 or self.array_parallelism > 1):
            for overlay in self.container.writable_overlays():
                raise ValueError(
                    f"container.overlays: {overlay!r} is writable, and several jobs or runs "
                    f"mount it at once (runs_per_gpu {self.runs_per_gpu}, array_parallelism "
                    f"{self.array_parallelism}): a writable overlay can be mounted once; "
                    "append :ro"
                )
        return self

    @model_validator(mode="after")
    def _fits_on_card(self) -> ResourceProfile:
        if self.gpu_memory_gb is not None:
            for variant, gb in self.gpu_memory_gb_per_run.items():
                if gb * self.runs_per_gpu > self.gpu_memory_gb:
                    raise ValueError(
                        f"gpu_memory_gb_per_run.{variant} = {gb} x runs_per_gpu "
                        f"{self.runs_per_gpu} exceeds gpu_memory_gb {self.gpu_memory_gb}"
                    )
        if self.mps_active_thread_percentage is not None and not self.mps:
            raise ValueError("mps_active_thread_percentage is set but mps is false")
        return self


def grid_names() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "grids").glob("*.toml"))


def resource_names() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "resources").glob("*.toml"))


def resolve_named(name_or_path: str, kind: str) -> Path:
    """A grid/resource name (``profiles/<kind>s/<name>.toml``) or a path to a TOML file."""
    if is_profile_path(name_or_path):
        return Path(name_or_path)
    folder = profiles_dir() / ("grids" if kind == "grid" else "resources")
    path = folder / f"{name_or_path}.toml"
    if not path.is_file():
        known = grid_names() if kind == "grid" else resource_names()
        raise ConfigError(
            f"unknown {kind} {name_or_path!r}",
            f"known: {', '.join(known) or '(none)'}; or give a path to a .toml file",
        )
    return path


def validate_file(model: type[BaseModel], path: Path, data: dict[str, Any], kind: str) -> Any:
    """``model.model_validate(data)`` with errors as ``file: field: message`` lines."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{path}: {field}: {err['msg']}")
        hint = f"valid keys: {', '.join(model.model_fields)}"
        raise ConfigError(f"invalid {kind}:\n  " + "\n  ".join(lines), hint) from None


def load_grid(name_or_path: str) -> GridSpec:
    """A grid by name (``profiles/grids/NAME.toml``) or path; errors name file and field."""
    path = resolve_named(name_or_path, "grid")
    return validate_file(GridSpec, path, read_toml(path), "grid")


def load_resources(name_or_path: str) -> ResourceProfile:
    """A resource profile by name (``profiles/resources/NAME.toml``) or path."""
    path = resolve_named(name_or_path, "resource profile")
    data = read_toml(path)
    data.setdefault("name", path.stem)
    profile = validate_file(ResourceProfile, path, data, "resource profile")
    shipped = path.resolve() == (profiles_dir() / "resources" / f"{path.stem}.toml").resolve()
    profile._source = path.stem if shipped else str(path.resolve())
    return profile
