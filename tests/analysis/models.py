"""Tiny float64 models and probe batches for the analysis tests, and a check that an
evaluation leaves a model as it found it."""

from __future__ import annotations

import torch
from torch import nn


def tiny_cnn(*, bn: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Conv(1->2, 3x3) [+BN] + tanh + linear(32 -> 3): about 120 parameters."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.BatchNorm2d(2) if bn else nn.Identity(),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        )
        if bn:  # non-trivial affine and running statistics
            model[1].weight.data.uniform_(0.5, 1.5)
            model[1].bias.data.uniform_(-0.5, 0.5)
            model[1].running_mean.uniform_(-1, 1)
    return model.to(dtype)


def probe_batch(n: int = 10, seed: int = 1, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def snapshot(model: nn.Module) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grads": [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
    }


def assert_state_equal(model: nn.Module, before: dict) -> None:
    for p, saved in zip(model.parameters(), before["params"], strict=True):
        torch.testing.assert_close(p.detach(), saved, rtol=0, atol=0, equal_nan=True)
    for b, saved in zip(model.buffers(), before["buffers"], strict=True):
        torch.testing.assert_close(b, saved, rtol=0, atol=0, equal_nan=True)
    for p, (ref, value) in zip(model.parameters(), before["grads"], strict=True):
        assert p.grad is ref
        if ref is not None:
            assert torch.equal(p.grad, value) and p.grad.grad_fn is None
    assert [m.training for m in model.modules()] == before["modes"]
