"""The CUDA path on a CPU machine: precision by compute capability (faked at the
``torch.cuda`` boundary), RNG states loaded on the CPU and restored on another GPU count,
TF32 off inside every analysis call."""

from __future__ import annotations

import os

import pytest
import torch

from deconcnn_cli.errors import ConfigError, GpuRequiredError, PrecisionError
from deconcnn_cli.runenv import GPU_SHARE_ENV, gpu_share
from deconcnn_cli.training import measure
from deconcnn_cli.training.checkpoint import (
    load_latest_checkpoint,
    restore_rng_states,
    rng_states,
    save_checkpoint,
)
from deconcnn_cli.training.device import (
    CUBLAS_ENV,
    CUBLAS_WORKSPACE,
    REQUIRE_GPU_ENV,
    cap_gpu_memory,
    deterministic,
    exact_fp32,
    resolve_device,
    resolve_precision,
)
from deconcnn_cli.training.writer import RunWriter

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def capability(mocker):
    """Set the (faked) compute capability of the visible GPU; bf16 'supported' either way,
    as torch.cuda.is_bf16_supported() says on Turing (it counts emulation)."""
    mocker.patch("torch.cuda.is_bf16_supported", return_value=True)
    fake = mocker.patch("torch.cuda.get_device_capability")

    def set_to(major: int, minor: int) -> None:
        fake.return_value = (major, minor)

    return set_to


@pytest.mark.parametrize(
    ("cap", "expected", "scaler"),
    [
        ((7, 5), "fp16", True),  # RTX8000 (Turing): emulated bf16 is not taken
        ((7, 0), "fp16", True),
        ((8, 0), "bf16", False),  # A100
        ((9, 0), "bf16", False),  # H100
    ],
)
def test_auto_precision_by_compute_capability(capability, cap, expected, scaler):
    capability(*cap)
    prec = resolve_precision("auto", CUDA)
    assert prec.name == expected and prec.use_scaler is scaler


def test_auto_on_cpu_is_fp32_and_fp16_on_cpu_is_bad_input():
    assert resolve_precision("auto", CPU).name == "fp32"
    with pytest.raises(ConfigError):
        resolve_precision("fp16", CPU)


def test_stored_precision_wins_and_is_refused_where_it_cannot_run(capability):
    capability(8, 0)  # an A100 resumes a run that started in fp16 on an RTX8000: keep fp16
    assert resolve_precision("auto", CUDA, stored="fp16").name == "fp16"
    capability(7, 5)  # a bf16 run requeued onto an RTX8000
    with pytest.raises(PrecisionError, match="bf16.*sm_75"):
        resolve_precision("auto", CUDA, stored="bf16")
    with pytest.raises(PrecisionError, match="fp16"):
        resolve_precision("auto", CPU, stored="fp16")
    assert resolve_precision("auto", CUDA, stored="fp32").name == "fp32"
    with pytest.raises(ConfigError, match="emulated"):
        resolve_precision("bf16", CUDA)


def test_rng_states_load_on_the_cpu(tmp_path, mocker):
    save_checkpoint(tmp_path, 5, {"model": {}})
    spy = mocker.spy(torch, "load")
    state, _ = load_latest_checkpoint(tmp_path)
    assert spy.call_args.kwargs["map_location"] == "cpu"  # never the training device
    assert state["rng"]["torch_cpu"].device.type == "cpu"
    torch.manual_seed(0)
    restore_rng_states(state["rng"])  # the generator accepts them


@pytest.mark.parametrize(("saved_gpus", "host_gpus", "restored"), [(2, 1, [0]), (1, 4, [0])])
def test_cuda_rng_states_restored_on_another_gpu_count(mocker, saved_gpus, host_gpus, restored):
    mocker.patch("torch.cuda.is_available", return_value=True)
    mocker.patch("torch.cuda.device_count", return_value=host_gpus)
    set_one = mocker.patch("torch.cuda.set_rng_state")
    mocker.patch("torch.cuda.set_rng_state_all", side_effect=AssertionError("needs same count"))
    states = rng_states()
    states["torch_cuda"] = [torch.zeros(16, dtype=torch.uint8)] * saved_gpus
    restore_rng_states(states)
    assert [c.args[1] for c in set_one.call_args_list] == restored


def _tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_tf32_off_inside_analysis_calls_and_restored_after(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = True  # what a user or library may have set
    try:
        with exact_fp32():
            assert _tf32() == (False, False)
        assert _tf32() == (True, True)  # cudnn's default is True
        seen = []
        measure.guarded(RunWriter(tmp_path), "noise", 0, lambda: seen.append(_tf32()) or {})
        assert seen == [(False, False)] and _tf32() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize(("share", "fraction"), [(1, None), (2, (48 - 2) / 2 / 48), (3, 15 / 48)])
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_gpu_memory_capped_at_the_runs_share_of_the_card(fake_card, share, fraction, spec):
    """No GPU here: the card (48 GiB, an RTX8000) is faked at the driver boundary only, so
    torch's own set_per_process_memory_fraction checks the device it is given (including a
    bare ``cuda``, which it refuses: the cap must pass an index)."""
    fake_card.count, fake_card.current = 2, 1 if spec == "cuda:1" else 0
    got = cap_gpu_memory(torch.device(spec), share)
    if fraction is None:
        assert got is None and fake_card.fractions == []
    else:
        assert got == pytest.approx(fraction)
        assert fake_card.fractions == [(pytest.approx(fraction), 1 if spec == "cuda:1" else 0)]
    assert cap_gpu_memory(CPU, 2) is None  # nothing to cap on the CPU


def test_the_fake_card_keeps_torchs_device_check(fake_card):
    """The fake must refuse what torch refuses: a device without an index."""
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))


def test_resolved_devices_carry_their_index(fake_card, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_card.count, fake_card.current = 2, 1
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == CPU


def test_a_gpu_job_without_a_usable_gpu_fails_naming_driver_and_wheel(monkeypatch, tmp_path):
    """auto falls back to the CPU only where no GPU is required ($DECON_REQUIRE_GPU unset)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_smi = tmp_path / "nvidia-smi"
    fake_smi.write_text("#!/bin/sh\necho '470.57.02, Quadro RTX 8000'\n")
    fake_smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert resolve_device("auto") == CPU
    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    with pytest.raises(GpuRequiredError) as err:
        resolve_device("auto")
    assert "470.57.02" in err.value.message and "built for CUDA" in err.value.message
    with pytest.raises(GpuRequiredError):
        resolve_device("cpu")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(GpuRequiredError, match="no NVIDIA driver found"):
        resolve_device("cuda")


def test_deterministic_block_sets_and_restores_the_flags(monkeypatch):
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic(CPU):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic
    assert CUBLAS_ENV not in os.environ  # set only for CUDA
    with deterministic(torch.device("cuda", 0)):
        assert os.environ[CUBLAS_ENV] == CUBLAS_WORKSPACE


def test_gpu_share_from_the_launcher_environment():
    assert gpu_share({}) == 1
    assert gpu_share({GPU_SHARE_ENV: "2"}) == 2
    assert gpu_share({GPU_SHARE_ENV: "two"}) == 1 and gpu_share({GPU_SHARE_ENV: "0"}) == 1
