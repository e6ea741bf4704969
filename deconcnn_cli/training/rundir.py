"""Opening a run directory for training: identity check, lock, device and precision."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deconcnn_cli.config import (
    RunConfig,
    config_hash,
    identity_dict,
    load_saved_config,
    run_id,
)
from deconcnn_cli.errors import ConfigError, RunDirError
from deconcnn_cli.training.metrics import atomic_write_json, read_json

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | fp16 | bf16
    device_type: str

    @property
    def use_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self) -> Any:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.name == "fp16" else torch.bfloat16
        return torch.autocast(self.device_type, dtype=dtype)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device: {spec!r} is not a device", "use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device: cuda requested but no CUDA device is visible", "use --device cpu"
        )
    return device


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """auto: fp32 on CPU; on CUDA bf16 where supported, else fp16 with a grad scaler (RTX8000)."""
    if spec == "auto":
        if device.type != "cuda":
            spec = "fp32"
        else:
            spec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if spec == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 needs a CUDA device", "use fp32 or bf16 on the CPU")
    return Precision(spec, device.type)


def config_record(cfg: RunConfig) -> dict[str, Any]:
    return {
        "run_id": run_id(cfg),
        "config_hash": config_hash(cfg),
        "config": cfg.model_dump(mode="json"),
    }


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Create ``run_dir`` with its config, or check an existing one is the same run."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        saved = read_json(path)
        if saved is None:
            raise RunDirError(f"{path}: unreadable config", "inspect or move the run directory")
        if saved.get("config_hash") != config_hash(cfg):
            differing = _diff(identity_dict(load_saved_config(path)), identity_dict(cfg))
            raise RunDirError(
                f"{run_dir} holds a different run (config differs in {', '.join(differing)})",
                "use a different --root/--run-dir, or resume it without changing its config",
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, config_record(cfg))


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock: two processes never train the same run at once."""
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            raise RunDirError(
                f"{run_dir} is being trained by {holder}",
                "wait for it, or stop that process first",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        yield
    finally:
        os.close(fd)
