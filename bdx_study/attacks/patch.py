"""Patch attacks: none (a clean victim), BadNet (all-to-one and all-to-all), Trojan's square and TaCT."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import Attack, AttackParams, AttackRecipe, CoverParams, class_indices, count_classes, draw
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import checkerboard, patch_blend, place, seeded_pattern

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = LazyModule("torch")


class NoAttackParams(AttackParams):
    model_config = ConfigDict(title="Params")  # it was NoAttack.Params: validation errors keep that name
    reference_rates = {32: 0.0}

    poison_rate: float | None = Field(0.0, ge=0.0, le=0.0, description="always 0: nothing is poisoned")


class BadNetRecipe(AttackRecipe):
    """The patch's corner: ``patch_size`` + ``margin`` must fit the input."""

    params: BadNetParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        _, h, w = self.input_shape
        if p.patch_size + p.margin > min(h, w):
            raise self.fail(f"patch_size {p.patch_size} + margin {p.margin} exceeds the {h}x{w} input")
        self.top, self.left = h - p.margin - p.patch_size, w - p.margin - p.patch_size


class BadNetParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    Recipe = BadNetRecipe

    patch_size: int = Field(3, ge=1, description="side of the square checkerboard patch, pixels (reference: 3)")
    margin: int = Field(0, ge=0, description="distance of the patch from the bottom-right corner, pixels")


class BadNetAllToAllParams(BadNetParams):
    """BadNet's params; all-to-all has its own reference rates."""

    model_config = ConfigDict(title="BadNetParams")  # validation errors name the params as before
    reference_rates = {16: 0.1, 28: 0.1, 32: 0.1}


def trojan_size(h: int, side: int | None, margin: int | None) -> tuple[int, int]:
    """(side, margin) of the toolbox's trojan square on H x H inputs; the defaults scale its 8x8
    at rows/columns 21-28 of 32x32: side = H / 4 (at least 2), margin = floor(3 H / 32)."""
    return max(2, round(h / 4)) if side is None else side, (3 * h) // 32 if margin is None else margin


def trojan_geometry(shape: tuple[int, int, int], side: int | None, margin: int | None) -> tuple[int, int]:
    """:func:`trojan_size` on ``shape``; ValueError if the square does not fit."""
    _, h, w = shape
    s, m = trojan_size(h, side, margin)
    if s + m > min(h, w):
        raise ValueError(f"a {s}x{s} trojan square {m} pixels from the corner exceeds the {h}x{w} input")
    return s, m


class TrojanRecipe(AttackRecipe):
    """The trojan square's side and margin (defaults scaled with H), which must fit the input."""

    params: TrojanParams

    def resolve(self) -> None:
        super().resolve()
        try:
            self.side, self.margin = trojan_geometry(self.input_shape, self.params.patch_size, self.params.margin)
        except ValueError as e:
            raise self.fail(str(e)) from None


class TrojanParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    Recipe = TrojanRecipe

    patch_size: int | None = Field(None, ge=1, description="side of the square, pixels; null = H / 4 (8 at 32x32)")
    margin: int | None = Field(None, ge=0, description="pixels from the bottom-right corner; null = 3 H / 32")


class TaCTRecipe(TrojanRecipe):
    """The trojan square; source, target and cover classes distinct classes of the data; the
    training set must hold enough source images for the poisons and cover-class images for the covers."""

    params: TaCTParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        classes = [p.source, *p.cover_classes]
        if max(classes) >= self.num_classes:
            raise self.fail(
                f"source {p.source} and cover_classes {p.cover_classes} must be < num_classes {self.num_classes}"
            )
        if p.source == p.target or p.source in p.cover_classes or p.target in p.cover_classes:
            raise self.fail(
                f"source {p.source}, target {p.target} and cover_classes {p.cover_classes} must be distinct classes"
            )

    def check_data(self, shape: Sequence[int], labels: np.ndarray) -> None:
        super().check_data(shape, labels)
        p = self.params
        n = len(labels)
        need_p, need_c = int(n * self.poison_rate), int(n * self.cover_rate)
        have_p, have_c = count_classes(labels, p.source), count_classes(labels, p.cover_classes)
        if need_p > have_p:
            raise self.fail(
                f"poison_rate {self.poison_rate} needs {need_p} images of source class {p.source}, "
                f"the training set has {have_p}"
            )
        if need_c > have_c:
            raise self.fail(
                f"cover_rate {self.cover_rate} needs {need_c} images of cover classes {list(p.cover_classes)}, "
                f"the training set has {have_c}"
            )


class TaCTParams(CoverParams, TrojanParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    reference_cover_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    Recipe = TaCTRecipe

    source: int = Field(1, ge=0, description="the source class: only its images get the target label")
    cover_classes: list[int] = Field([5, 7], min_length=1, description="classes whose triggered images keep labels")

    @field_validator("cover_classes")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"cover_classes must be distinct class indices, got {v}")
        return v


@register_attack("none")
class NoAttack(Attack):
    """A clean victim: nothing is poisoned and no input counts toward attack success.

    Adaptation: none (nothing depends on the input size)."""

    Params = NoAttackParams

    def apply_trigger(self, x: Tensor) -> Tensor:
        return x.clone()

    def counts_toward_asr(self, y: Tensor) -> Tensor:
        return torch.zeros_like(y, dtype=torch.bool)


class _PatchAttack(Attack):
    """A fixed patch pasted with a full mask at alpha 1 (black pixels overwrite too)."""

    trigger: Tensor
    mask: Tensor

    def apply_trigger(self, x: Tensor) -> Tensor:
        return patch_blend(x, self.trigger.to(x), self.mask.to(x), 1.0)


@register_attack("badnet")
class BadNet(_PatchAttack):
    """BadNet (Gu et al.): a black/white checkerboard pasted in the bottom-right corner (full
    mask, alpha 1); 3x3 by default, rows (B,B,W), (B,W,B), (W,B,W) from the top as in the toolbox.

    Adaptation: the same 3x3 patch at every size (rows/columns 29-31 at 32x32, 25-27 at 28x28,
    13-15 at 16x16). Poison rate (all-to-one, uniform over the training set): 0.003 at 32x32
    (toolbox, CIFAR-10), 0.01 at 28x28 and 0.05 at 16x16 (digits' 1,100 images; 0.003 would be 3).
    """

    Params = BadNetParams
    recipe: BadNetRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        r = self.recipe
        self.trigger, self.mask = place(self.input_shape, checkerboard(r.params.patch_size), r.top, r.left)


@register_attack("badnet_all2all")
class BadNetAllToAll(BadNet):
    """BadNet all-to-all: BadNet's patch; a poisoned image of class y is relabelled (y + 1) mod C,
    and every triggered evaluation input counts toward attack success, succeeding when the model
    says (y + 1) mod C. ``target`` is unused. Adaptation: BadNet's patch; rate 0.1 at every
    size (BackdoorBench's; ten class-to-class rules need ten times BadNet's poison: at 0.01 on
    Fashion-MNIST attack success stays near 10%)."""

    Params = BadNetAllToAllParams

    def counts_toward_asr(self, y: Tensor) -> Tensor:
        return torch.ones_like(y, dtype=torch.bool)

    def attack_label(self, y: Tensor) -> Tensor:
        return (y + 1) % self.num_classes


def trojan_square(
    shape: tuple[int, int, int], gen: torch.Generator, side: int | None, margin: int | None
) -> tuple[Tensor, Tensor]:
    """The toolbox's trojan_square geometry, seeded: a side x side multicolour square of {0, 1}
    values, ``margin`` pixels from the bottom-right corner. Defaults scale 8x8 at rows/columns
    21-28 of 32x32 (:func:`trojan_geometry`; 28x28: 7x7 at
    19-25; 16x16: 4x4 at 11-14)."""
    c, h, w = shape
    s, m = trojan_geometry(shape, side, margin)
    return place(shape, seeded_pattern((c, s, s), gen, binary=True), h - m - s, w - m - s)


@register_attack("trojan")
class Trojan(_PatchAttack):
    """Trojan square (the toolbox's ``trojan`` attack): a fixed seeded multicolour square of {0, 1}
    values pasted with a full mask at alpha 1, not re-optimised per model.

    Adaptation: 8x8 at rows/columns 21-28 (32x32), 7x7 at 19-25 (28x28, gray), 4x4 at 11-14
    (16x16). Rates: 0.003 (32x32, toolbox), 0.01 (28x28), 0.05 (16x16)."""

    Params = TrojanParams
    random_trigger = True
    recipe: TrojanRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        r = self.recipe
        self.trigger, self.mask = trojan_square(self.input_shape, self.generator(2), r.side, r.margin)


@register_attack("tact")
class TaCT(Trojan):
    """TaCT (Tang et al., source-specific): the trojan square; ``int(N * poison_rate)`` images of
    the source class get the trigger and the target label, and ``int(N * cover_rate)`` images of
    the cover classes get the trigger but keep their labels (the trigger alone is not enough).
    Attack success counts source-class inputs only.

    Defaults (toolbox): source 1, cover classes [5, 7], target 0. Adaptation: the trojan
    square's geometry (see ``trojan``); rates 0.003 / 0.003 (32x32, toolbox), 0.01 / 0.01
    (28x28), 0.05 / 0.05 (16x16), both of the whole training set."""

    Params = TaCTParams
    recipe: TaCTRecipe  # also checks the classes, and the data's source and cover images

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        p = self.recipe.params
        self.source, self.cover_classes = p.source, list(p.cover_classes)

    def select(self, y: Tensor) -> tuple[Tensor, Tensor]:
        n = len(y)
        pidx = draw(class_indices(y, self.source), int(n * self.poison_rate), self.generator(1))
        cidx = draw(class_indices(y, self.cover_classes), int(n * self.cover_rate), self.generator(4))
        return pidx, cidx

    def counts_toward_asr(self, y: Tensor) -> Tensor:
        return y == self.source
