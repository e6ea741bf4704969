"""The progress callable of the long evaluations: told every unit, asked inside every pass,
and a True answer abandons the evaluation with the model as found (issue 24)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deconcnn_cli.analysis.hessian import HessianOperator, evaluate_curvature
from deconcnn_cli.analysis.noise import gradient_noise
from deconcnn_cli.analysis.progress import STILL_WORKING, EvaluationStopped


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 5),
    )


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 5, (n,), generator=gen)


def _curvature(model: nn.Module, progress=None):
    x, y = _batch()
    return evaluate_curvature(
        model,
        x,
        y,
        chunk_size=8,
        n_probes=4,
        generator=torch.Generator().manual_seed(2),
        tol=1e-9,
        max_hvp=12,
        progress=progress,
    )


class Recorder:
    def __init__(self, stop_when=lambda stage, done: False) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.stop_when = stop_when

    def __call__(self, stage: str, done: int, total: int) -> bool:
        self.calls.append((stage, done, total))
        return self.stop_when(stage, done)


def test_progress_is_told_every_unit_and_changes_no_value():
    plain = _curvature(_model())
    rec = Recorder()
    told = _curvature(_model(), rec)
    assert (told.lambda_max, told.hutch_trace, told.n_hvp) == (
        plain.lambda_max, plain.hutch_trace, plain.n_hvp
    )  # fmt: skip
    assert torch.equal(told.eigenvector, plain.eigenvector)
    counted = [c for c in rec.calls if c[0] != STILL_WORKING]
    assert counted[:2] == [("lanczos", 0, 12), ("probes", 0, 4)]  # both stages from the start
    lanczos = [d for s, d, _ in counted if s == "lanczos"]
    assert lanczos == [0, *range(told.n_hvp - 4)]  # the start, then before each product
    assert [d for s, d, _ in counted if s == "probes"] == [0, 0, 1, 2, 3, 4]
    assert len(rec.calls) - len(counted) > 10 * told.n_hvp  # asked inside every product


def test_a_stop_inside_a_product_abandons_the_evaluation_with_the_model_as_found():
    model = _model()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {"lanczos": 0}

    def stop_inside_the_third_product(stage: str, done: int) -> bool:
        if stage == "lanczos":
            seen["lanczos"] = done
        return stage == STILL_WORKING and seen["lanczos"] == 2

    rec = Recorder(stop_inside_the_third_product)
    with pytest.raises(EvaluationStopped):
        _curvature(model, rec)
    assert rec.calls[-1][0] == STILL_WORKING  # from a hook, inside the product
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_stop_between_units_and_in_the_graph_build():
    for stage in ("lanczos", "probes"):
        rec = Recorder(lambda s, d, stage=stage: s == stage and d == 1)
        with pytest.raises(EvaluationStopped):
            _curvature(_model(), rec)
        assert rec.calls[-1] == (stage, 1, 12 if stage == "lanczos" else 4)
    model, (x, y) = _model(), _batch()
    with pytest.raises(EvaluationStopped):
        HessianOperator(model, x, y, chunk_size=8, progress=lambda *_: True)


def test_gradient_noise_is_told_each_batch_and_stops_inside_one():
    batches = [_batch(8, seed) for seed in range(4)]
    plain = gradient_noise(_model(), batches)
    rec = Recorder()
    told = gradient_noise(_model(), batches, progress=rec)
    assert told == plain
    counted = [c for c in rec.calls if c[0] != STILL_WORKING]
    assert counted == [("batches", i, 4) for i in range(4)]
    model = _model()
    rec = Recorder(lambda s, d: s == STILL_WORKING and len(rec.calls) > 20)
    with pytest.raises(EvaluationStopped):
        gradient_noise(model, batches, progress=rec)
    assert model.training and all(p.grad is None for p in model.parameters())
