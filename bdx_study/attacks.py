"""Backdoor attacks (a registry), per ../shared/reference/attacks.md.

Contract of an attack (all in pixel space [0, 1], images (N, C, H, W)):
- ``poison(data, gen)``: the poisoned training set: which indices carry the trigger and which
  labels they get (:class:`PoisonedSet`);
- ``apply_trigger(x)``: the test-time trigger on a batch (a pure tensor function);
- ``counts_toward_asr(y)`` and ``attack_label(y)``: which evaluation inputs count toward attack
  success (all-to-one: true class != target) and the label that counts as success.
Every trigger is generated from a seed; no third-party images are shipped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from bdx_study._registry import Registry
from bdx_study.data import ImageData


class AttackParams(BaseModel):
    """Parameters shared by every attack; subclasses add their trigger's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    poison_rate: float = Field(0.05, ge=0.0, lt=1.0, description="fraction of the whole training set poisoned")
    target: int = Field(0, ge=0, description="target class of the all-to-one backdoor")
    seed: int | None = Field(None, description="trigger and poison-index seed; null = the victim's seed")


@dataclass(frozen=True)
class PoisonedSet:
    data: ImageData  # the full training set after poisoning
    poison_indices: Tensor  # indices into data that carry the trigger


class Attack(ABC):
    """One attack instance: a trigger fixed by (input shape, params, seed)."""

    Params: ClassVar[type[AttackParams]] = AttackParams

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        if params.target >= num_classes:
            raise ValueError(f"attack target {params.target} must be < num_classes {num_classes}")
        self.params = params
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.seed = seed if params.seed is None else params.seed

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    def poison(self, data: ImageData) -> PoisonedSet:
        """All-to-one data poisoning: ``int(N * poison_rate)`` indices drawn uniformly from the
        whole training set (target class included) get the trigger and the target label."""
        n = len(data)
        k = int(n * self.params.poison_rate)
        idx = torch.randperm(n, generator=self.generator(1))[:k].sort().values
        x, y = data.x.clone(), data.y.clone()
        if k:
            x[idx] = self.train_trigger(x[idx])
            y[idx] = self.params.target
        return PoisonedSet(ImageData(x, y), idx)

    @abstractmethod
    def apply_trigger(self, x: Tensor) -> Tensor:
        """Return ``x`` (N, C, H, W) in [0, 1] with the test-time trigger, in [0, 1]."""

    def train_trigger(self, x: Tensor) -> Tensor:
        """The trigger stamped on poisoned training images; the test-time one unless overridden."""
        return self.apply_trigger(x)

    def counts_toward_asr(self, y: Tensor) -> Tensor:
        """Boolean mask of evaluation inputs whose triggered version counts toward attack success."""
        return y != self.params.target

    def attack_label(self, y: Tensor) -> Tensor:
        """The label that counts as attack success for inputs of true class ``y``."""
        return torch.full_like(y, self.params.target)


ATTACKS: Registry[type[Attack]] = Registry("attack")


def create_attack(
    name: str, params: dict[str, Any], input_shape: tuple[int, int, int], num_classes: int, seed: int
) -> Attack:
    """Build attack ``name``; ``params`` are validated by its Params model (unknown keys fail)."""
    cls = ATTACKS.get(name)
    return cls(cls.Params.model_validate(params), input_shape, num_classes, seed)


def list_attacks() -> list[str]:
    return ATTACKS.names()


def patch_blend(x: Tensor, trigger: Tensor, mask: Tensor, alpha: float) -> Tensor:
    """The generic operator x' = x + alpha * m * (t - x): a patch is alpha = 1 with a local mask,
    a blend is mask = 1. ``trigger`` (C, H, W) and ``mask`` (1 or C, H, W) broadcast over N."""
    return (x + alpha * mask * (trigger - x)).clamp(0.0, 1.0)


@ATTACKS.register("none")
class NoAttack(Attack):
    """A clean victim: nothing is poisoned and no input counts toward attack success."""

    class Params(AttackParams):
        poison_rate: float = Field(0.0, ge=0.0, le=0.0, description="always 0: nothing is poisoned")

    def apply_trigger(self, x: Tensor) -> Tensor:
        return x.clone()

    def counts_toward_asr(self, y: Tensor) -> Tensor:
        return torch.zeros_like(y, dtype=torch.bool)


@ATTACKS.register("badnet")
class BadNet(Attack):
    """BadNet: a black/white checkerboard patch pasted (full mask, alpha 1) in the bottom-right
    corner; 3x3 by default, rows (B,B,W), (B,W,B), (W,B,W) from the top as in the reference."""

    class Params(AttackParams):
        patch_size: int = Field(3, ge=1, description="side of the square patch, pixels")
        margin: int = Field(0, ge=0, description="distance of the patch from the bottom-right corner, pixels")

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        p: BadNet.Params = params  # type: ignore[assignment]
        c, h, w = input_shape
        if p.patch_size + p.margin > min(h, w):
            raise ValueError(f"badnet patch_size + margin = {p.patch_size + p.margin} exceeds the {h}x{w} input")
        if p.patch_size == 3:  # the reference patch, rows from the top: (B,B,W), (B,W,B), (W,B,W)
            checker = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
        else:
            i = torch.arange(p.patch_size)
            checker = ((i[:, None] + i[None, :]) % 2).float()
        self.trigger = torch.zeros(c, h, w)
        self.mask = torch.zeros(1, h, w)
        r0, c0 = h - p.margin - p.patch_size, w - p.margin - p.patch_size
        self.trigger[:, r0 : r0 + p.patch_size, c0 : c0 + p.patch_size] = checker
        self.mask[:, r0 : r0 + p.patch_size, c0 : c0 + p.patch_size] = 1.0

    def apply_trigger(self, x: Tensor) -> Tensor:
        return patch_blend(x, self.trigger.to(x.device), self.mask.to(x.device), 1.0)


@ATTACKS.register("blend")
class Blend(Attack):
    """Blend (Chen et al.): x' = (1 - alpha) x + alpha t with t a seeded U(0, 1) noise image of
    the input's shape; the same alpha at training and test time unless ``test_alpha`` is set."""

    class Params(AttackParams):
        alpha: float = Field(0.2, gt=0.0, le=1.0, description="blend weight of the trigger at training time")
        test_alpha: float | None = Field(None, gt=0.0, le=1.0, description="blend weight at test time; null = alpha")

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        self.pattern = torch.rand(input_shape, generator=self.generator(2))

    def _blend(self, x: Tensor, alpha: float) -> Tensor:
        return patch_blend(x, self.pattern.to(x.device), torch.ones(1, device=x.device), alpha)

    def train_trigger(self, x: Tensor) -> Tensor:
        return self._blend(x, self.params.alpha)  # type: ignore[attr-defined]

    def apply_trigger(self, x: Tensor) -> Tensor:
        p: Blend.Params = self.params  # type: ignore[assignment]
        return self._blend(x, p.alpha if p.test_alpha is None else p.test_alpha)
