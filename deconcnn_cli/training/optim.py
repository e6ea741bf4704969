"""The optimizer's state, ready before the first step: a skipped fp16 step changes nothing.

A skipped fp16 step must leave the optimizer as it was, at any step, the first included. With a
fused optimizer GradScaler does not skip the call on an overflow: it passes the inf flag to
``optimizer.step()`` and the fused kernel returns at once. Fused SGD with momentum creates its
momentum buffers at its first call with ``torch.empty_like``, which under deterministic mode
(every run) holds NaN, and a skipped call leaves them so: one step later every weight is NaN.
So the buffers are created here, as zeros, by ``training.setup.build_optimizer``. With
dampening 0 (SGD's default, the only one the config allows) ``0 * momentum + grad`` is exactly
the ``grad`` torch copies at its first step, so a run whose first step is taken gives the
same numbers. AdamW creates its moments with
``zeros_like`` and takes its step count back on a skip: nothing to do there.
"""

from __future__ import annotations

import torch

__all__ = ["zero_momentum_buffers"]


def zero_momentum_buffers(optimizer: torch.optim.SGD) -> torch.optim.SGD:
    """Give every parameter of a momentum group a zero momentum buffer where it has none;
    returns ``optimizer`` (``training.setup.build_optimizer`` builds every run's)."""
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("zero momentum buffers equal torch's first step only at dampening 0")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer
