"""Count the copies a block of code asks to move a tensor to a device, on the CPU.

A ``TorchFunctionMode`` sees every ``Tensor.to`` / ``Tensor.cuda`` call with its arguments.
On a CPU run the "device" is the CPU and nothing is really copied, but the calls are the ones
that on a GPU are host-to-device copies: a call without ``non_blocking=True`` is a
``cudaMemcpyAsync`` followed by a stream synchronisation (the host waits for the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def _names_a_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if "device" in kwargs:
        return True
    return any(isinstance(a, (torch.device, str, int)) and not isinstance(a, bool) for a in args)


@dataclass
class DeviceCopies(TorchFunctionMode):
    """Inside ``with DeviceCopies() as copies``: ``copies.blocking`` and ``copies.async_``
    count the device copies asked for (``to(device)``, ``cuda()``), ``copies.tags`` the
    blocking ones by the current ``tag`` (set it to the step being run)."""

    blocking: int = 0
    async_: int = 0
    tag: Any = None
    tags: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) and (
            func is torch.Tensor.cuda or _names_a_device(args[1:], kwargs)
        ):
            if kwargs.get("non_blocking"):
                self.async_ += 1
            else:
                self.blocking += 1
                self.tags.append(self.tag)
        return func(*args, **kwargs)
