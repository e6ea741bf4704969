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
    ValidationError,
    model_validator,
)

from deconcnn_cli.errors import ConfigError
from deconcnn_cli.fileio import read_regular

MAX_SEED = 2**63 - 1  # what torch.manual_seed takes without overflow (a seed is an int64)


class StrictModel(BaseModel):
    # inf and nan are no value for any field (an lr, a tolerance, a memory size)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(StrictModel):
    arch: Literal["resnet18"] = "resnet18"
    width_mult: Annotated[float, Field(gt=0)] = 1.0  # scales every stage's channels
    norm: Literal["batchnorm", "none"] = "batchnorm"  # none: conv bias, residual kept


class OptimConfig(StrictModel):
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


class ScheduleConfig(StrictModel):
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


class DataConfig(StrictModel):
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


class CadenceConfig(StrictModel):
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


class AnalysisConfig(StrictModel):
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


class LoggingConfig(StrictModel):
    # TensorBoard event files in <run>/tb/ (the [tensorboard] extra): auto = when installed;
    # on = also say so in events.jsonl when it is not; never part of a run's identity
    tensorboard: Literal["auto", "on", "off"] = "auto"


class RunConfig(StrictModel):
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


def is_profile_path(name_or_path: str) -> bool:
    """A path (ends in ``.toml`` or holds a ``/``), not a name: a bare name is always looked up
    in profiles/, so a file or folder of that name in the current folder never takes its
    place (that would change a run's config and id with the folder it is run from)."""
    return name_or_path.endswith(".toml") or "/" in name_or_path or os.sep in name_or_path


def resolve_profile(name_or_path: str, *, variant: bool = False) -> Path:
    """A profile name (``smoke``; a variant name with ``variant=True``) or a path to a TOML."""
    if is_profile_path(name_or_path):
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


# ---------------------------------------------------------------------------------------------
# Sweeps: grids and resource profiles (profiles/grids/*.toml, profiles/resources/*.toml)
