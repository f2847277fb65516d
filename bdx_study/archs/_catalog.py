"""The built-in architectures, declared: the one home of their metadata (accepted input shapes,
description). Reading them needs no torch; each implementation module (imported on the first
``ArchSpec.build``) attaches only the body factory."""

from __future__ import annotations

from bdx_study.archs._base import declare_architecture

_CIFAR_SHAPES = [(1, 28, 28), (3, 32, 32)]
_RESNET = "bdx_study.archs.resnet"
_TORCHVISION = "bdx_study.archs.torchvision_models"

declare_architecture(
    "small_cnn",
    "bdx_study.archs.small_cnn",
    input_shapes=[(1, 16, 16), (1, 28, 28), (1, 32, 32), (3, 28, 28), (3, 32, 32), (3, 64, 64)],
    description="""Four 3x3 conv-BN-ReLU layers (32, 32, 64, 64 channels) with two 2x2 max-pools, then a
    128-unit head (~0.2M parameters).""",
)

declare_architecture(
    "resnet18",
    _RESNET,
    input_shapes=_CIFAR_SHAPES,
    description="""ResNet-18, CIFAR variant: 3x3 stem, no max-pool, stages of 64/128/256/512 channels (11M
    parameters).""",
)

declare_architecture(
    "preact_resnet18",
    _RESNET,
    input_shapes=_CIFAR_SHAPES,
    description="""PreAct-ResNet-18 (BackdoorBench's default model), CIFAR variant: 3x3 stem, pre-activation
    blocks, final BN-ReLU.""",
)

declare_architecture(
    "vgg16_bn",
    _TORCHVISION,
    input_shapes=[(3, 32, 32), (3, 64, 64)],
    description="""VGG-16-BN: torchvision's 13 conv-BN layers (five max-pools, so inputs of 32x32 or more),
    global average pooling and the CIFAR head 512-512-classes with dropout (as pytorch-vgg-cifar10).""",
)

declare_architecture(
    "mobilenet_v2",
    _TORCHVISION,
    input_shapes=[(1, 28, 28), (3, 32, 32), (3, 64, 64)],
    description="""MobileNetV2: torchvision's blocks with the CIFAR stem (first conv stride 1 and the second
    stage stride 1, as kuangliu/pytorch-cifar), so 32x32 ends at 4x4.""",
)

declare_architecture(
    "vit_small",
    _TORCHVISION,
    input_shapes=[(1, 28, 28), (3, 32, 32), (3, 64, 64)],
    description="""A small ViT from torchvision's VisionTransformer: patch 4 (8x8 = 64 patches at 32x32,
    7x7 at 28x28; patch 8 at 64x64), 6 layers, 6 heads, width 384, MLP 768 (~10M parameters).""",
)

declare_architecture(
    "wide_resnet50_2",
    _TORCHVISION,
    input_shapes=[(3, 64, 64), (3, 128, 128), (3, 224, 224)],
    description="""Wide ResNet-50-2 for image-folder datasets (ImageNet subsets): torchvision's definition
    with its ImageNet stem (7x7 stride-2 conv and max-pool), 67M parameters.""",
)
