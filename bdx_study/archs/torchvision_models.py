"""Architectures whose definitions come from torchvision (the field's), with the stems adapted
to small inputs where the backdoor literature adapts them.

torchvision is imported inside each builder: importing ``torchvision.models`` costs about a
second (it pulls in torch._dynamo), which every command that only reads the registry (``validate``,
``list``) would otherwise pay."""

from __future__ import annotations

from torch import nn

from bdx_study.archs._base import BadExpertDefaults, register_architecture


@register_architecture(
    "vgg16_bn",
    input_shapes=[(3, 32, 32), (3, 64, 64)],
    badexpert=BadExpertDefaults(8e-5, 2.5, 0.4, 0.7, "paper, VGG-16"),
)
def vgg16_bn_cifar(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    """VGG-16-BN: torchvision's 13 conv-BN layers (five max-pools, so inputs of 32x32 or more),
    global average pooling and the CIFAR head 512-512-classes with dropout (as pytorch-vgg-cifar10);
    BaDExpert values: the paper's VGG-16 (lr 8e-5, alpha 2.5, beta 0.4, stop at 0.7)."""
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


@register_architecture(
    "mobilenet_v2",
    input_shapes=[(1, 28, 28), (3, 32, 32), (3, 64, 64)],
    badexpert=BadExpertDefaults(5e-5, 5.0, 0.2, 0.7, "paper, MobileNetV2"),
)
def mobilenet_v2_cifar(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    """MobileNetV2: torchvision's blocks with the CIFAR stem (first conv stride 1 and the second
    stage stride 1, as kuangliu/pytorch-cifar), so 32x32 ends at 4x4; BaDExpert values: the
    paper's MobileNetV2 (lr 5e-5, alpha 5, beta 0.2, stop at 0.7)."""
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


@register_architecture(
    "vit_small",
    input_shapes=[(1, 28, 28), (3, 32, 32), (3, 64, 64)],
    badexpert=BadExpertDefaults(
        1e-6, 2.0, 0.5, 0.2, "lr: paper's pretrained ViT-B/16 (1e-6); alpha, beta, stop: paper's ResNet-18"
    ),
)
def vit_small(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    """A small ViT from torchvision's VisionTransformer: patch 4 (8x8 = 64 patches at 32x32,
    7x7 at 28x28; patch 8 at 64x64), 6 layers, 6 heads, width 384, MLP 768 (~10M parameters).
    BaDExpert lr: the paper's for a pretrained ViT-B/16 (1e-6), likely too low for a ViT trained
    from scratch; the study should sweep it."""
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


@register_architecture(
    "wide_resnet50_2",
    input_shapes=[(3, 64, 64), (3, 128, 128), (3, 224, 224)],
    badexpert=BadExpertDefaults(1e-4, 2.0, 0.5, 0.2, "paper's ResNet-18 values (none given for wide ResNets)"),
)
def wide_resnet50_2_imagenet(in_channels: int, num_classes: int, hw: tuple[int, int]) -> nn.Module:
    """Wide ResNet-50-2 for image-folder datasets (ImageNet subsets): torchvision's definition
    with its ImageNet stem (7x7 stride-2 conv and max-pool), 67M parameters."""
    from torchvision.models import wide_resnet50_2

    m = wide_resnet50_2(weights=None, num_classes=num_classes)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return m
