"""Patch attacks: BadNet (all-to-one and all-to-all), Trojan's square and TaCT. Their params
and checks are in :mod:`bdx_study.attacks.recipes.patch`."""

from __future__ import annotations

import torch
from torch import Tensor

from bdx_study.attacks._base import Attack, AttackParams, class_indices, draw, register_attack
from bdx_study.attacks._triggers import checkerboard, patch_blend, place, seeded_pattern
from bdx_study.attacks.recipes.patch import (
    BadNetAllToAllParams,
    BadNetParams,
    BadNetRecipe,
    NoAttackParams,
    TaCTParams,
    TaCTRecipe,
    TrojanParams,
    TrojanRecipe,
    trojan_geometry,
)


@register_attack("none")
class NoAttack(Attack):
    """A clean victim: nothing is poisoned and no input counts toward attack success."""

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
    21-28 of 32x32 (:func:`~bdx_study.attacks.recipes.patch.trojan_geometry`; 28x28: 7x7 at
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
