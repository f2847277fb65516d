"""The architecture contract: a registry of entries with per-entry metadata (as timm's
default_cfgs), the normalizing :class:`Classifier` wrapper and the input-shape check.

Every model takes pixel-space inputs in [0, 1] and normalizes them itself, so triggers,
exports and detectors never handle normalization separately.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bdx_study._registry import Registry

Shape = tuple[int, int, int]  # (C, H, W)
BodyFactory = Callable[[int, int, tuple[int, int]], nn.Module]  # (in_channels, classes, (H, W)) -> logits net


@dataclass(frozen=True)
class BadExpertDefaults:
    """BaDExpert's reference starting values for an architecture (../shared/reference/badexpert.md);
    names as in DefenseConfig. ``source`` says where they come from."""

    unlearn_lr: float  # Adam lr of the backdoor expert B
    ensemble_alpha: float  # ensemble weight alpha
    ensemble_beta: float  # ensemble weight beta
    unlearn_early_stop_acc: float  # stop B once its held-out clean accuracy falls below this
    source: str


# The paper's ResNet-18 / CIFAR-10 values: the fallback where the paper gives none.
RESNET18_REFERENCE = BadExpertDefaults(1e-4, 2.0, 0.5, 0.2, "paper, ResNet-18 on CIFAR-10")


@dataclass(frozen=True)
class ArchSpec:
    """One registered architecture: its body factory and metadata."""

    name: str
    build: BodyFactory
    input_shapes: tuple[Shape, ...]  # every (C, H, W) it accepts; anything else is refused
    badexpert: BadExpertDefaults
    description: str


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")


def register_architecture(
    name: str, *, input_shapes: Sequence[Shape], badexpert: BadExpertDefaults = RESNET18_REFERENCE
) -> Callable[[BodyFactory], BodyFactory]:
    """Decorator: register a body factory with the shapes it accepts and its BaDExpert defaults
    (the description is the factory's docstring)."""

    def deco(fn: BodyFactory) -> BodyFactory:
        doc = " ".join((fn.__doc__ or "").split())
        ARCHITECTURES.register(name)(ArchSpec(name, fn, tuple(tuple(s) for s in input_shapes), badexpert, doc))  # type: ignore[misc]
        return fn

    return deco


def architecture_spec(name: str) -> ArchSpec:
    return ARCHITECTURES.get(name)


def list_architectures() -> list[str]:
    return ARCHITECTURES.names()


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_input_shape(name: str, shape: Sequence[int]) -> None:
    """Raise ValueError unless architecture ``name`` accepts inputs of ``shape`` (C, H, W)."""
    spec = ARCHITECTURES.get(name)
    if tuple(int(s) for s in shape) not in spec.input_shapes:
        raise ValueError(
            f"architecture {name!r} does not accept inputs of shape {_fmt(shape)} (C x H x W); "
            f"it accepts {', '.join(_fmt(s) for s in spec.input_shapes)}"
        )


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
    """Build architecture ``name`` for inputs of ``input_shape`` (C, H, W) in [0, 1]; a shape the
    architecture does not accept is a ValueError naming both."""
    check_input_shape(name, input_shape)
    body = ARCHITECTURES.get(name).build(input_shape[0], num_classes, (input_shape[1], input_shape[2]))
    return Classifier(body, mean, std)


def penultimate_layer(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``model`` (its input is the penultimate representation; used by
    attacks that select neurons, e.g. TrojanNN). Every registered architecture ends in one."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return last
