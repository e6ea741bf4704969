"""Device, precision and float32 exactness: what the hardware can run, chosen once per run.

Precision ``auto`` is resolved at a run's first start and stored in status.json; every later
attempt uses the stored value and is refused (``PrecisionError``) on a device that cannot run
it natively, so a requeue onto another GPU kind never switches precision mid-run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from deconcnn_cli.errors import ConfigError, GpuRequiredError, PrecisionError
from deconcnn_cli.runenv import CUBLAS_ENV, CUBLAS_WORKSPACE, DETERMINISTIC_ENV, REQUIRE_GPU_ENV

NATIVE_BF16_MAJOR = 8  # bf16 tensor cores from Ampere (sm_80); Turing (RTX8000, sm_75) emulates
# Per process, outside the caching allocator: the CUDA context, cuDNN/cuBLAS workspaces.
CONTEXT_RESERVE_BYTES = 1 << 30


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


def resolve_device(spec: str, *, require_gpu: bool | None = None) -> torch.device:
    """The run's device, with its index (``cuda:N``, never a bare ``cuda``).

    ``auto`` is CUDA where torch sees a GPU, else the CPU, unless a GPU is required
    (``require_gpu``, default ``$DECON_REQUIRE_GPU``: set by a job whose resource profile asks
    for one), when no visible GPU is an error naming the driver and the wheel's CUDA: a GPU job
    never trains on the CPU without saying so. A bare ``cuda`` resolves to the current device
    (the one ``CUDA_VISIBLE_DEVICES`` gives the process), since several torch.cuda calls
    (``set_per_process_memory_fraction``) refuse a device without an index.
    """
    if require_gpu is None:
        require_gpu = os.environ.get(REQUIRE_GPU_ENV, "") not in ("", "0")
    if spec == "auto":
        if torch.cuda.is_available():
            return _indexed(torch.device("cuda"))
        if require_gpu:
            raise GpuRequiredError(
                f"no usable CUDA device: {cuda_diagnosis()}",
                "install a torch wheel built for a CUDA the driver supports (docs/cluster.md, "
                "'A torch that matches the driver'), or use a CPU resource profile",
            )
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device: {spec!r} is not a device", "use auto, cpu or cuda[:N]") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        error = GpuRequiredError if require_gpu else ConfigError
        raise error(
            f"device: cuda requested but no CUDA device is usable: {cuda_diagnosis()}",
            "use --device cpu, or a torch wheel that matches the driver (docs/cluster.md)",
        )
    if device.type == "cpu" and require_gpu:
        raise GpuRequiredError(
            "device: cpu, but this job's resource profile asks for a GPU",
            "use device auto or cuda, or a CPU resource profile",
        )
    return _indexed(device) if device.type == "cuda" else device


def _indexed(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def cuda_diagnosis() -> str:
    """Why torch sees no GPU, as far as can be told without one: the wheel's CUDA version and
    the driver's (from ``nvidia-smi``, when there is one)."""
    wheel = torch.version.cuda or "none (a CPU-only wheel)"
    driver = "no NVIDIA driver found (nvidia-smi missing)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version,name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            lines = out.stdout.strip().splitlines()
            driver = f"driver {lines[0]}" if out.returncode == 0 and lines else "nvidia-smi failed"
        except (OSError, subprocess.SubprocessError) as exc:
            driver = f"nvidia-smi failed ({exc})"
    return f"torch {torch.__version__} built for CUDA {wheel}; {driver}"


@contextlib.contextmanager
def deterministic(device: torch.device) -> Iterator[None]:
    """Deterministic kernels inside the block (the previous settings restored after).

    ``torch.use_deterministic_algorithms(True)``: an op without a deterministic kernel raises
    instead of running a nondeterministic one (``$DECON_DETERMINISTIC=warn`` makes it a
    warning, an escape hatch for a torch build that lacks one); cuDNN deterministic and never
    benchmarking. On CUDA, cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first handle:
    the job sets it in every run's environment, and it is set here too (if unset) for a bare
    ``decon train``, which gets here before its first CUDA kernel.
    """
    if device.type == "cuda":
        os.environ.setdefault(CUBLAS_ENV, CUBLAS_WORKSPACE)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    warn_only = os.environ.get(DETERMINISTIC_ENV, "") == "warn"
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


def cap_gpu_memory(device: torch.device, share: int) -> float | None:
    """Cap this process's CUDA caching allocator at its share of the card; the fraction set.

    With ``share`` runs on one GPU (two per RTX8000 on the cluster), each may allocate at most
    ``(total - share x CONTEXT_RESERVE_BYTES) / share / total`` of the card. A run whose
    curvature evaluation would overrun its share then gets the CUDA out-of-memory error itself
    (recorded as NaN + event by ``measure.guarded``; training goes on) instead of starving the
    other run's training step. None (nothing set): not a CUDA device, or a card of its own.
    """
    if device.type != "cuda" or share <= 1:
        return None
    device = _indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = max(0.05, (total - share * CONTEXT_RESERVE_BYTES) / share / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def native_bf16(device: torch.device) -> bool:
    """bf16 runs natively: on the CPU, or on a GPU of compute capability 8.0 or newer."""
    if device.type != "cuda":
        return True
    major, _ = torch.cuda.get_device_capability(device)
    return major >= NATIVE_BF16_MAJOR


def _capability(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def resolve_precision(spec: str, device: torch.device, stored: str | None = None) -> Precision:
    """The run's precision on ``device``.

    ``stored`` (the precision an earlier attempt of this run chose) wins over ``spec`` and is
    refused where the device cannot run it. ``auto``: fp32 on the CPU; on CUDA bf16 where it
    is native (compute capability >= 8.0), else fp16 with a grad scaler. Note that
    ``torch.cuda.is_bf16_supported()`` also counts emulation, so it is not asked.
    """
    if stored is not None:
        if stored == "fp16" and device.type != "cuda":
            raise PrecisionError(
                f"this run trains in fp16 (chosen at its first start); {device} cannot run it",
                "resume it on a CUDA device",
            )
        if stored == "bf16" and not native_bf16(device):
            raise PrecisionError(
                f"this run trains in bf16 (chosen at its first start); {device} "
                f"({_capability(device)}) has no native bf16",
                "resume it on a GPU of compute capability 8.0 or newer (A100, H100, ...)",
            )
        return Precision(stored, device.type)
    if spec == "auto":
        native = "bf16" if native_bf16(device) else "fp16"
        spec = "fp32" if device.type != "cuda" else native
    if spec == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 needs a CUDA device", "use fp32 or bf16 on the CPU")
    if spec == "bf16" and not native_bf16(device):
        raise ConfigError(
            f"precision: bf16 is emulated on {device} ({_capability(device)})",
            "use fp16 (with a grad scaler) or auto",
        )
    return Precision(spec, device.type)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS matmuls and cuDNN convolutions inside the block (restored after):
    on Ampere and later, TF32 carries ~1e-3 relative error, as large as the Lanczos
    tolerance. A no-op on the CPU, where the flags have no effect."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
