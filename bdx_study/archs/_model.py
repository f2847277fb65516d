"""The torch side of the architecture contract: the normalizing :class:`Classifier` wrapper,
:func:`create_model` and :func:`penultimate_layer`.

Every model takes pixel-space inputs in [0, 1] and normalizes them itself, so triggers,
exports and detectors never handle normalization separately.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bdx_study.archs._base import architecture_spec, check_input_shape


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
    body = architecture_spec(name).build(input_shape[0], num_classes, (input_shape[1], input_shape[2]))
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
