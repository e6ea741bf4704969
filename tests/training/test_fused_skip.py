"""A skipped fp16 step leaves a fused optimizer as it was, the first step included.

The project's own optimizer construction with ``fused=True`` on the CPU (torch's fused CPU
kernels, the same code path as CUDA's: GradScaler passes the inf flag into the step), under
the run's deterministic mode, where new memory is NaN-filled. The first step's gradients are
inf; the finite steps after it must give exactly the parameters of torch's own fused
optimizer in a run whose first step was never taken.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.device import deterministic
from deconcnn_cli.training.setup import build_optimizer

FINITE_STEPS = 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def _step(model, optimizer, scaler, i: int, *, poison: bool = False) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    loss = F.cross_entropy(model(x), y) * (float("inf") if poison else 1.0)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()


def _reference(cfg) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """torch's own fused optimizer with the config's hyper-parameters, nothing prepared."""
    o, model = cfg.optim, _model()
    if o.name == "sgd":
        kw = {"momentum": o.momentum, "nesterov": o.nesterov}
        opt = torch.optim.SGD(
            model.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=True, **kw
        )
    else:
        kw = {"betas": o.betas, "eps": o.eps}
        opt = torch.optim.AdamW(
            model.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=True, **kw
        )
    return model, opt


@pytest.mark.parametrize("variant", ["base", "bn_off", "narrow", "adamw"])
def test_a_skipped_first_step_leaves_the_fused_optimizer_as_it_was(variant):
    cfg = load_run_config(variant=variant, profiles=["smoke"], flags={})
    with deterministic(torch.device("cpu")):
        assert torch.utils.deterministic.fill_uninitialized_memory  # new memory is NaN
        model = _model()
        optimizer = build_optimizer(cfg, model, fused=True)
        scaler = torch.amp.GradScaler("cpu")
        _step(model, optimizer, scaler, 0, poison=True)  # overflow: skipped
        assert scaler.get_scale() == 2.0**15
        for i in range(1, FINITE_STEPS + 1):
            _step(model, optimizer, scaler, i)

        ref_model, ref_opt = _reference(cfg)
        ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**15)
        for i in range(1, FINITE_STEPS + 1):
            _step(ref_model, ref_opt, ref_scaler, i)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.isfinite(p).all(), f"{variant}: NaN weights after a skipped first step"
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        for name, value in ref_opt.state[q].items():
            assert torch.equal(optimizer.state[p][name], value), name
