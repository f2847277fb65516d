"""The built-in architectures, declared: the one home of their metadata (accepted input shapes,
BaDExpert's reference values, description). Reading them needs no torch; each implementation
module (imported on the first ``ArchSpec.build``) attaches only the body factory."""

from __future__ import annotations

from bdx_study.archs._base import RESNET18_REFERENCE, BadExpertDefaults, declare_architecture

_CIFAR_SHAPES = [(1, 28, 28), (3, 32, 32)]
_RESNET = "bdx_study.archs.resnet"
_TORCHVISION = "bdx_study.archs.torchvision_models"

declare_architecture(
    "small_cnn",
    "bdx_study.archs.small_cnn",
    input_shapes=[(1, 16, 16), (1, 28, 28), (1, 32, 32), (3, 28, 28), (3, 32, 32), (3, 64, 64)],
    description="""Four 3x3 conv-BN-ReLU layers (32, 32, 64, 64 channels) with two 2x2 max-pools, then a
    128-unit head (~0.2M parameters); BaDExpert values: the paper's ResNet-18 ones.""",
)

declare_architecture(
    "resnet18",
    _RESNET,
    input_shapes=_CIFAR_SHAPES,
    badexpert=RESNET18_REFERENCE,
    description="""ResNet-18, CIFAR variant: 3x3 stem, no max-pool, stages of 64/128/256/512 channels (11M
    parameters); BaDExpert values: the paper's (lr 1e-4, alpha 2, beta 0.5, stop at 0.2).""",
)

declare_architecture(
    "preact_resnet18",
    _RESNET,
    input_shapes=_CIFAR_SHAPES,
    badexpert=BadExpertDefaults(1e-4, 2.0, 0.5, 0.2, "paper's ResNet-18 values (none given for PreAct-ResNet-18)"),
    description="""PreAct-ResNet-18 (BackdoorBench's default model), CIFAR variant: 3x3 stem, pre-activation
    blocks, final BN-ReLU; BaDExpert values: the paper's ResNet-18 ones.""",
)

declare_architecture(
    "vgg16_bn",
    _TORCHVISION,
    input_shapes=[(3, 32, 32), (3, 64, 64)],
    badexpert=BadExpertDefaults(8e-5, 2.5, 0.4, 0.7, "paper, VGG-16"),
    description="""VGG-16-BN: torchvision's 13 conv-BN layers (five max-pools, so inputs of 32x32 or more),
    global average pooling and the CIFAR head 512-512-classes with dropout (as pytorch-vgg-cifar10);
    BaDExpert values: the paper's VGG-16 (lr 8e-5, alpha 2.5, beta 0.4, stop at 0.7).""",
)

declare_architecture(
    "mobilenet_v2",
    _TORCHVISION,
    input_shapes=[(1, 28, 28), (3, 32, 32), (3, 64, 64)],
    badexpert=BadExpertDefaults(5e-5, 5.0, 0.2, 0.7, "paper, MobileNetV2"),
    description="""MobileNetV2: torchvision's blocks with the CIFAR stem (first conv stride 1 and the second
    stage stride 1, as kuangliu/pytorch-cifar), so 32x32 ends at 4x4; BaDExpert values: the
    paper's MobileNetV2 (lr 5e-5, alpha 5, beta 0.2, stop at 0.7).""",
)

declare_architecture(
    "vit_small",
    _TORCHVISION,
    input_shapes=[(1, 28, 28), (3, 32, 32), (3, 64, 64)],
    badexpert=BadExpertDefaults(
        1e-6, 2.0, 0.5, 0.2, "lr: paper's pretrained ViT-B/16 (1e-6); alpha, beta, stop: paper's ResNet-18"
    ),
    description="""A small ViT from torchvision's VisionTransformer: patch 4 (8x8 = 64 patches at 32x32,
    7x7 at 28x28; patch 8 at 64x64), 6 layers, 6 heads, width 384, MLP 768 (~10M parameters).
    BaDExpert lr: the paper's for a pretrained ViT-B/16 (1e-6), likely too low for a ViT trained
    from scratch; the study should sweep it.""",
)

declare_architecture(
    "wide_resnet50_2",
    _TORCHVISION,
    input_shapes=[(3, 64, 64), (3, 128, 128), (3, 224, 224)],
    badexpert=BadExpertDefaults(1e-4, 2.0, 0.5, 0.2, "paper's ResNet-18 values (none given for wide ResNets)"),
    description="""Wide ResNet-50-2 for image-folder datasets (ImageNet subsets): torchvision's definition
    with its ImageNet stem (7x7 stride-2 conv and max-pool), 67M parameters.""",
)
