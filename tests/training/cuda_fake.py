"""A CUDA card faked at the driver boundary, keeping torch's own argument handling.

Only what needs a driver is replaced: ``_lazy_init`` (driver initialisation), the device
count and current device, the card's properties and the allocator's fraction setter (the C
call). ``torch.cuda.get_device_properties`` and ``torch.cuda.set_per_process_memory_fraction``
themselves run for real, so a device without an index, a non-float fraction or a device
index the card does not have raises exactly as it would on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch


@dataclass
class FakeCard:
    total_memory: int = 48 << 30  # an RTX8000
    count: int = 1
    current: int = 0
    fractions: list[tuple[float, int]] = field(default_factory=list)  # (fraction, index) set


@pytest.fixture
def fake_card(monkeypatch: pytest.MonkeyPatch) -> FakeCard:
    card = FakeCard()
    noop = lambda: None  # noqa: E731
    monkeypatch.setattr(torch.cuda, "_lazy_init", noop)
    monkeypatch.setattr(torch.cuda.memory, "_lazy_init", noop)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: card.count)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: card.current)

    def properties(index: int) -> SimpleNamespace:
        assert isinstance(index, int), f"the C call got {index!r}, not a device index"
        return SimpleNamespace(total_memory=card.total_memory, name="Fake RTX 8000")

    monkeypatch.setattr(torch.cuda, "_get_device_properties", properties, raising=False)

    def set_fraction(fraction: float, index: int) -> None:
        assert isinstance(index, int), f"the C call got {index!r}, not a device index"
        card.fractions.append((fraction, index))

    monkeypatch.setattr(torch._C, "_cuda_setMemoryFraction", set_fraction, raising=False)
    return card
