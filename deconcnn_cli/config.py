"""Config models shared by every command, and how they are loaded.

Precedence is explicit and layered: model defaults < profile files (TOML) < ``--set key=value``
overrides < dedicated CLI flags. Each layer is a nested dict tagged with its source, so a
validation error can name the file (or flag) that supplied the offending field.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
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
from deconcnn_cli.contract import CONFIG_FILE, NAME_PATTERN
from deconcnn_cli.errors import ConfigError, RunDirError
from deconcnn_cli.fileio import atomic_write_json, read_json, read_regular

MAX_SEED = 2**63 - 1  # what torch.manual_seed takes without overflow (a seed is an int64)


class _Strict(BaseModel):
    # inf and nan are no value for any field (an lr, a tolerance, a memory size)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    arch: Literal["resnet18"] = "resnet18"
    width_mult: Annotated[float, Field(gt=0)] = 1.0  # scales every stage's channels
    norm: Literal["batchnorm", "none"] = "batchnorm"  # none: conv bias, residual kept


class OptimConfig(_Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0)] = 0.1  # peak lr (end of warmup), per batch of batch_size
    weight_decay: Annotated[float, Field(ge=0)] = 1e-3  # coupled for sgd, decoupled for adamw
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )  # adamw only
    eps: Annotated[float, Field(gt=0)] = 1e-8  # adamw only


class ScheduleConfig(_Strict):
    epochs: Annotated[int, Field(ge=1)] = 50
    warmup_epochs: Annotated[float, Field(ge=0)] = 5.0  # linear from 0, then cosine to 0

    @model_validator(mode="after")
    def _warmup_fits(self) -> ScheduleConfig:
        if self.warmup_epochs > self.epochs:
            scaled = f"{self.epochs / 10:g}"  # the protocol's warmup: 5 of 50 epochs
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs}); for a "
                f"short run with the protocol's shape add --set schedule.warmup_epochs={scaled}"
            )
        return self


class DataConfig(_Strict):
    dataset: Literal["cifar10", "cifar100", "digits"] = "cifar10"
    data_dir: Path | None = None  # where torchvision finds (or downloads) CIFAR
    download: bool = False
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    split_seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = (
        0  # fixes the train/val split, not the run seed
    )
    batch_size: Annotated[int, Field(ge=1)] = 128
    image_size: Annotated[int, Field(ge=8)] = 32
    augmentation: Literal["crop_flip", "none"] = "crop_flip"


class CadenceConfig(_Strict):
    val_per_epoch: Annotated[int, Field(ge=1)] = 4  # quarter epochs; the last at epoch end
    curvature_every_steps: Annotated[int, Field(ge=0)] = 500  # and at step 0; 0 = off
    noise_every_epochs: Annotated[int, Field(ge=0)] = 2  # noise + spectral metrics; 0 = off
    shape_every_epochs: Annotated[int, Field(ge=0)] = 1  # alpha_early/alpha_full; 0 = off
    checkpoint_every_epochs: Annotated[int, Field(ge=1)] = 1
    # ... at an epoch end only once this many minutes passed since the last checkpoint (0:
    # every such epoch end); and always on a stop signal and at the end. A checkpoint is
    # 134-179 MB at full width: every epoch would be 5-15% of a GPU run (docs/performance.md)
    checkpoint_every_minutes: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 10.0
    flush_every_steps: Annotated[int, Field(ge=1)] = 200  # per-step rows written in blocks


class AnalysisConfig(_Strict):
    # Curvature defaults are sized to the cost budget (docs/metrics-curvature-noise.md):
    # one HVP costs ~3 training steps, so every HVP per evaluation is ~0.6% of a run.
    n_probe: Annotated[int, Field(ge=1)] = 128  # fixed probe batch = one training batch
    hutchinson_probes: Annotated[int, Field(ge=2)] = (
        6  # deflated Rademacher probes: rel. SEM <= 10%
    )
    # a tenth of lambda_max's spread between two 128-image probe batches (~11%, measured)
    lanczos_tol: Annotated[float, Field(gt=0)] = 1e-2  # a-posteriori rel. error bound
    lanczos_max_hvp: Annotated[int, Field(ge=2)] = 40  # bounds the basis: 40 x P x 4 bytes
    noise_k: Annotated[int, Field(ge=2)] = 8  # mini-batch gradients per noise estimate
    alpha_early_epochs: tuple[float, float] = (5.0, 15.0)  # [start, end) of the early fit
    burn_in_ce_nats: Annotated[float, Field(gt=0)] = 1.0
    # the precision of the curvature's Hessian-vector products (docs/performance.md, "HVP
    # precision"); fp32 is exact to ~1e-6, fp16/bf16 autocast is cheaper on tensor cores
    hvp_precision: Literal["fp32", "fp16", "bf16"] = "fp32"

    @model_validator(mode="after")
    def _window_is_ordered(self) -> AnalysisConfig:
        start, end = self.alpha_early_epochs
        if not 0 <= start < end:
            raise ValueError(
                f"alpha_early_epochs [{start:g}, {end:g}] is not a window [start, end) with "
                "0 <= start < end (e.g. [5, 15])"
            )
        return self


class LoggingConfig(_Strict):
    # TensorBoard event files in <run>/tb/ (the [tensorboard] extra): auto = when installed;
    # on = also say so in events.jsonl when it is not; never part of a run's identity
    tensorboard: Literal["auto", "on", "off"] = "auto"


class RunConfig(_Strict):
    """Everything that defines one training run."""

    variant: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")] = "base"
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0  # the only source of randomness
    grad_clip_norm: Annotated[float, Field(gt=0)] | None = None  # global L2, None = off
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp32 CPU, amp CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    data: DataConfig = DataConfig()
    cadence: CadenceConfig = CadenceConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    logging: LoggingConfig = LoggingConfig()


# Fields that do not change what a run computes; left out of its identity.
_NOT_IDENTITY: dict[str, Any] = {
    "device": True,
    "data": {"data_dir": True, "download": True},
    "cadence": {"flush_every_steps": True, "checkpoint_every_minutes": True},
    "logging": True,
}


# Fields added after sweeps were run: left out of the identity at the value that reproduces
# what those runs computed, so their run ids (and resubmitting them) do not change.
_IDENTITY_WHEN_NOT: dict[tuple[str, str], Any] = {("analysis", "hvp_precision"): "fp32"}


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    """The canonical, result-affecting part of a config, as plain JSON types."""
    ident = cfg.model_dump(mode="json", exclude=_NOT_IDENTITY)
    for (section, key), old in _IDENTITY_WHEN_NOT.items():
        if ident.get(section, {}).get(key) == old:
            del ident[section][key]
    return ident


def identity_json(cfg: RunConfig) -> str:
    """:func:`identity_dict` as canonical JSON (sorted keys, no spaces): what is hashed."""
    return json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"))


def config_hash(cfg: RunConfig, identity: str | None = None) -> str:
    """First 10 hex of the sha256 of the config's identity (``identity``: its
    :func:`identity_json`, when the caller has it already)."""
    canonical = identity if identity is not None else identity_json(cfg)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def run_id(cfg: RunConfig, identity: str | None = None) -> str:
    """Readable prefix + short hash: ``base_lr0.1_wd0.001_s0_3f2a9c01de``."""
    o = cfg.optim
    return f"{cfg.variant}_lr{o.lr:g}_wd{o.weight_decay:g}_s{cfg.seed}_{config_hash(cfg, identity)}"


# ---------------------------------------------------------------------------------------------
# Loading: profiles, overrides, flags


def profiles_dir() -> Path:
    """``$DECON_PROFILES`` or the ``profiles/`` folder beside the package."""
    env = os.environ.get("DECON_PROFILES")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"


def variant_names() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "variants").glob("*.toml"))


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


Layer = tuple[str, dict[str, Any]]  # (source description, nested dict)


def read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"profile file not found: {path}", "check the path or `decon --help`")
    try:
        return tomllib.loads(read_regular(path).decode())
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 1]!r})",
            "TOML files are UTF-8: remove or fix that byte",
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: malformed TOML: {exc}", "fix the syntax at that line") from exc
    except RecursionError:
        raise ConfigError(
            f"{path}: nested too deeply to read", "no decon setting nests more than a few levels"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", "check the file") from exc


def _is_path(name_or_path: str) -> bool:
    """A path (ends in ``.toml`` or holds a ``/``), not a name: a bare name is always looked up
    in profiles/, so a file or folder of that name in the current folder never takes its
    place (that would change a run's config and id with the folder it is run from)."""
    return name_or_path.endswith(".toml") or "/" in name_or_path or os.sep in name_or_path


def resolve_profile(name_or_path: str, *, variant: bool = False) -> Path:
    """A profile name (``smoke``; a variant name with ``variant=True``) or a path to a TOML."""
    if _is_path(name_or_path):
        return Path(name_or_path)
    folder = profiles_dir() / "variants" if variant else profiles_dir()
    path = folder / f"{name_or_path}.toml"
    if not path.is_file():
        known = variant_names() if variant else profile_names()
        kind = "variant" if variant else "profile"
        raise ConfigError(f"unknown {kind} {name_or_path!r}", f"known: {', '.join(known)}")
    return path


def parse_override(text: str) -> dict[str, Any]:
    """``optim.lr=0.05`` -> ``{"optim": {"lr": 0.05}}``; the value is read as TOML, else text."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"bad override {text!r}", "use --set section.field=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except RecursionError:
        raise ConfigError(f"--set {key}: value nested too deeply", "give a plain value") from None
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _source_of(loc: tuple[Any, ...], layers: list[Layer]) -> str:
    """The highest-precedence layer that sets the field at ``loc`` (else its nearest parent)."""

    def depth(data: dict[str, Any]) -> int:
        node: Any = data
        for n, part in enumerate(loc):
            if not isinstance(node, dict) or part not in node:
                return n
            node = node[part]
        return len(loc)

    best_source, best_depth = "defaults", 0
    for source, data in reversed(layers):
        d = depth(data)
        if d == len(loc):
            return source
        if d > best_depth:
            best_source, best_depth = source, d
    return best_source


def _hint_for(loc: tuple[Any, ...], kind: str) -> str:
    if kind == "extra_forbidden":
        model: type[BaseModel] = RunConfig
        for part in loc[:-1]:
            field = model.model_fields.get(str(part))
            ann = field.annotation if field else None
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                break
            model = ann
        where = ".".join(map(str, loc[:-1])) or "top level"
        return f"valid keys at {where}: {', '.join(model.model_fields)}"
    return "see docs/configuration.md for each field's type and range"


def build_config(layers: list[Layer]) -> RunConfig:
    """Merge the layers (lowest precedence first) and validate; errors name source and field."""
    merged: dict[str, Any] = {}
    for _, data in layers:
        merged = deep_merge(merged, data)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        lines = []
        hints = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not isinstance(p, int)) or err["loc"]
            field = ".".join(str(p) for p in err["loc"]) or "(config)"
            lines.append(f"{_source_of(loc, layers)}: {field}: {err['msg']}")
            hints.append(_hint_for(tuple(err["loc"]), err["type"]))
        raise ConfigError(
            "invalid config:\n  " + "\n  ".join(lines), "; ".join(dict.fromkeys(hints))
        ) from None


def load_run_config(
    *,
    variant: str | None = None,
    profiles: list[str] | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults < variant profile < extra profiles (in order) < ``--set`` overrides < flags."""
    layers: list[Layer] = []
    if variant is not None:
        path = resolve_profile(variant, variant=True)
        layers.append((str(path), deep_merge({"variant": variant}, read_toml(path))))
    for name in profiles or []:
        path = resolve_profile(name)
        layers.append((str(path), read_toml(path)))
    for text in overrides or []:
        layers.append((f"--set {text}", parse_override(text)))
    if flags:
        layers.append(("command-line flags", flags))
    return build_config(layers)


def load_saved_config(path: Path) -> RunConfig:
    """Read a run directory's ``config.json`` back into a RunConfig."""
    try:
        data = json.loads(read_regular(path).decode())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSON or UTF-8
        raise ConfigError(f"{path}: cannot read saved config: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("config", data), dict):
        raise ConfigError(f"{path}: cannot read saved config: not a JSON object")
    return build_config([(str(path), data.get("config", data))])


# ---------------------------------------------------------------------------------------------
# The run directory's config.json (torch-free: `decon sweep submit` creates run directories)


def config_record(cfg: RunConfig) -> dict[str, Any]:
    """What ``config.json`` holds: ``{"run_id", "config_hash", "config"}``."""
    return {
        "run_id": run_id(cfg),
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
    }


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Create ``run_dir`` with its ``config.json``, or check an existing one is the same run."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        saved = read_json(path)
        if saved is None:
            raise RunDirError(f"{path}: unreadable config", "inspect or move the run directory")
        if saved.get("config_hash") != config_hash(cfg):
            saved_identity = identity_dict(load_saved_config(path))
            differing = [p for p, _, _ in dict_changes(saved_identity, identity_dict(cfg))]
            raise RunDirError(
                f"{run_dir} holds a different run (config differs in {', '.join(differing)})",
                "use a different --root/--run-dir, or resume it without changing its config",
            )
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, config_record(cfg))
    except OSError as exc:  # a file where a folder belongs, a read-only filesystem, ...
        raise RunDirError(
            f"cannot create run directory {run_dir}: {exc.strerror or exc}",
            "give a --root/--run-dir that is (or can be made) a writable folder",
        ) from exc


def dict_changes(
    a: dict[str, Any], b: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(dotted.path, value in a, value in b)`` for every leaf where two nested dicts differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += dict_changes(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append((f"{prefix}{key}", va, vb))
    return out


# ---------------------------------------------------------------------------------------------
# Sweeps: grids and resource profiles (profiles/grids/*.toml, profiles/resources/*.toml)


class GridAxes(_Strict):
    """The swept axes; every combination is one run. Values are numbers as written: a
    string (``"0.1"``) or a boolean (``true``) is refused, never coerced into a run."""

    lr: Annotated[list[Annotated[float, Field(gt=0, strict=True)]], Field(min_length=1)]
    weight_decay: Annotated[list[Annotated[float, Field(ge=0, strict=True)]], Field(min_length=1)]
    seed: Annotated[
        list[Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)]], Field(min_length=1)
    ]


class VariantAxes(_Strict):
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


class GridSpec(_Strict):
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


class ResourceProfile(_Strict):
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
    if _is_path(name_or_path):
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


def load_grid_spec(name_or_path: str) -> GridSpec:
    path = resolve_named(name_or_path, "grid")
    return validate_file(GridSpec, path, read_toml(path), "grid")


def load_resource_profile(name_or_path: str) -> ResourceProfile:
    path = resolve_named(name_or_path, "resource profile")
    data = read_toml(path)
    data.setdefault("name", path.stem)
    profile = validate_file(ResourceProfile, path, data, "resource profile")
    shipped = path.resolve() == (profiles_dir() / "resources" / f"{path.stem}.toml").resolve()
    profile._source = path.stem if shipped else str(path.resolve())
    return profile
