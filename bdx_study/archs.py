"""Architectures (a registry). Every model takes pixel-space inputs in [0, 1] and normalizes
them itself, so triggers, exports and detectors never handle normalization separately."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bdx_study._registry import Registry

BodyFactory = Callable[[int, int, tuple[int, int]], nn.Module]  # (in_channels, classes, (H, W))
ARCHITECTURES: Registry[BodyFactory] = Registry("architecture")


class Classifier(nn.Module):
    """Normalization (per-channel mean/std buffers) followed by a network body; outputs logits."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return self.body((x - mean) / std)  # type: ignore[no-any-return]


def create_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Classifier:
    """Build architecture ``name`` for inputs of ``input_shape`` (C, H, W) in [0, 1]."""
    body = ARCHITECTURES.get(name)(input_shape[0], num_classes, (input_shape[1], input_shape[2]))
    return Classifier(body, mean, std)


def list_architectures() -> list[str]:
    return ARCHITECTURES.names()


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@ARCHITECTURES.register("small_cnn")
def small_cnn(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    """Four 3x3 conv-BN-ReLU layers (32, 32, 64, 64 channels) with two 2x2 max-pools, then a
    128-unit head; for 16x16, 28x28 and 32x32 inputs of any channel count (~0.2M parameters)."""
    return nn.Sequential(
        *_conv_bn(in_channels, 32),
        *_conv_bn(32, 32),
        nn.MaxPool2d(2),
        *_conv_bn(32, 64),
        *_conv_bn(64, 64),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


@ARCHITECTURES.register("resnet18")
def resnet18(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    """ResNet-18, CIFAR variant: 3x3 stem, no max-pool, stages of 64/128/256/512 channels."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)
