"""Architectures (a registry with per-entry metadata): every model takes [0, 1] pixel inputs
and normalizes inside (:class:`Classifier`); every entry declares the input shapes it accepts
and BaDExpert's reference starting values for it."""

from bdx_study.archs import resnet, small_cnn, torchvision_models  # noqa: F401  (registration)
from bdx_study.archs._base import (
    ARCHITECTURES,
    RESNET18_REFERENCE,
    ArchSpec,
    BadExpertDefaults,
    BodyFactory,
    Classifier,
    architecture_spec,
    check_input_shape,
    create_model,
    list_architectures,
    penultimate_layer,
    register_architecture,
)

__all__ = [
    "ARCHITECTURES",
    "RESNET18_REFERENCE",
    "ArchSpec",
    "BadExpertDefaults",
    "BodyFactory",
    "Classifier",
    "architecture_spec",
    "check_input_shape",
    "create_model",
    "list_architectures",
    "penultimate_layer",
    "register_architecture",
]
