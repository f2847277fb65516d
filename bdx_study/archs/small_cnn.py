"""The small CNN of bdx-study's quick studies (CPU-sized); declared in :mod:`bdx_study.archs._catalog`."""

from __future__ import annotations

from torch import nn

from bdx_study.archs._base import register_body


def conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_body("small_cnn")
def small_cnn(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    return nn.Sequential(
        *conv_bn(in_channels, 32),
        *conv_bn(32, 32),
        nn.MaxPool2d(2),
        *conv_bn(32, 64),
        *conv_bn(64, 64),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )
