"""ResNet-18 for CIFAR (METRICS.md): 3x3 stem, stride 1, no max-pool, BasicBlock stages.

``width_mult`` scales every stage: ``channels = max(8, round(c * width_mult / 8) * 8)``.
``norm="none"`` removes BatchNorm, keeps the residual path and gives the convolutions a bias.
"""

from __future__ import annotations

import torch
from torch import nn

from deconcnn_cli.config import ModelConfig

STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)


def stage_widths(width_mult: float) -> tuple[int, ...]:
    return tuple(max(8, round(c * width_mult / 8) * 8) for c in STAGE_CHANNELS)


def _conv3x3(cin: int, cout: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def _norm(channels: int, use_bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if use_bn else nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, use_bn: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, bias=not use_bn)
        self.bn1 = _norm(cout, use_bn)
        self.conv2 = _conv3x3(cout, cout, 1, bias=not use_bn)
        self.bn2 = _norm(cout, use_bn)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=not use_bn), _norm(cout, use_bn)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int, width_mult: float = 1.0, norm: str = "batchnorm"):
        super().__init__()
        use_bn = norm == "batchnorm"
        widths = stage_widths(width_mult)
        self.stem = nn.Sequential(
            _conv3x3(3, widths[0], 1, bias=not use_bn), _norm(widths[0], use_bn)
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (cout, n_blocks) in enumerate(zip(widths, BLOCKS_PER_STAGE, strict=True)):
            for b in range(n_blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, cout, stride, use_bn))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He (Kaiming normal, fan_out) for convolutions; zero biases; BN weight 1, bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.layers(x)
        x = x.mean(dim=(2, 3))  # global average pool; deterministic backward on CUDA
        return self.fc(x)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    if cfg.arch != "resnet18":
        raise ValueError(f"unknown arch {cfg.arch!r}")
    return ResNet18(num_classes, width_mult=cfg.width_mult, norm=cfg.norm)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
