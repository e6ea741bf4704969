from __future__ import annotations

import pytest
import torch
from torch import nn

from deconcnn_cli.config import load_run_config
from deconcnn_cli.training.models import build_model, count_parameters, stage_widths

# The standard CIFAR ResNet-18 (3x3 stem, BasicBlocks 64/128/256/512, 10 classes).
RESNET18_CIFAR10_PARAMS = 11_173_962


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_base_is_the_standard_cifar_resnet18():
    model = build_model(load_run_config(variant="base").model, num_classes=10)
    assert count_parameters(model) == RESNET18_CIFAR10_PARAMS
    stem = _convs(model)[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_bn_off_has_no_norm_and_biased_convs():
    model = build_model(load_run_config(variant="bn_off").model, num_classes=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(c.bias is not None for c in _convs(model))
    # 20 convs gain a bias; 20 BN layers (2 params per channel) disappear
    assert count_parameters(model) < RESNET18_CIFAR10_PARAMS


def test_narrow_halves_every_stage():
    assert stage_widths(0.5) == (32, 64, 128, 256)
    model = build_model(load_run_config(variant="narrow").model, num_classes=10)
    assert {c.out_channels for c in _convs(model)} == {32, 64, 128, 256}
    assert count_parameters(model) == pytest.approx(RESNET18_CIFAR10_PARAMS / 4, rel=0.01)


@pytest.mark.parametrize(
    ("mult", "widths"), [(0.125, (8, 16, 32, 64)), (0.01, (8, 8, 8, 8)), (1.5, (96, 192, 384, 768))]
)
def test_width_rule(mult: float, widths: tuple[int, ...]):
    assert stage_widths(mult) == widths


def test_adamw_variant_uses_base_model():
    a = build_model(load_run_config(variant="adamw").model, num_classes=10)
    assert count_parameters(a) == RESNET18_CIFAR10_PARAMS
