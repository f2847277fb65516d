"""Architectures whose definitions come from torchvision (the field's), with the stems adapted
to small inputs where the backdoor literature adapts them. Their metadata (shapes,
descriptions) is declared in :mod:`bdx_study.archs._catalog`.

torchvision is imported inside each builder: importing ``torchvision.models`` costs about a
second (it pulls in torch._dynamo), which every command that only reads the registry (``validate``,
``list``) would otherwise pay."""

from __future__ import annotations

from torch import nn

from bdx_study.archs._base import register_body


@register_body("vgg16_bn")
def vgg16_bn_cifar(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["D"], batch_norm=True)  # torchvision's VGG-16-BN convolutions
    if in_channels != 3:
        features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    m = nn.Sequential(
        features,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(512, 512),
        nn.ReLU(True),
        nn.Dropout(0.5),
        nn.Linear(512, 512),
        nn.ReLU(True),
        nn.Linear(512, num_classes),
    )
    for mod in m.modules():  # torchvision's VGG initialization
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.constant_(mod.bias, 0)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.constant_(mod.weight, 1)
            nn.init.constant_(mod.bias, 0)
        elif isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, 0, 0.01)
            nn.init.constant_(mod.bias, 0)
    return m


@register_body("mobilenet_v2")
def mobilenet_v2_cifar(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    setting = [
        [1, 16, 1, 1],
        [6, 24, 2, 1],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]
    from torchvision.models import MobileNetV2

    m = MobileNetV2(num_classes=num_classes, inverted_residual_setting=setting)
    m.features[0] = nn.Sequential(nn.Conv2d(in_channels, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(True))
    return m


@register_body("vit_small")
def vit_small(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    size = hw[0]
    patch = 8 if size >= 64 else 4
    from torchvision.models import VisionTransformer

    m = VisionTransformer(
        image_size=size, patch_size=patch, num_layers=6, num_heads=6, hidden_dim=384, mlp_dim=768,
        num_classes=num_classes,
    )  # fmt: skip
    if in_channels != 3:
        m.conv_proj = nn.Conv2d(in_channels, 384, kernel_size=patch, stride=patch)
    return m


@register_body("wide_resnet50_2")
def wide_resnet50_2_imagenet(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    from torchvision.models import wide_resnet50_2

    m = wide_resnet50_2(weights=None, num_classes=num_classes)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return m
