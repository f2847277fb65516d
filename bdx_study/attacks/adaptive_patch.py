"""Adaptive-Patch (Qi et al., ICLR'23): four weak training patches, a stronger test-time union."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import (
    Attack,
    AttackParams,
    AttackRecipe,
    CoverParams,
    check_placement,
    corner_positions,
    scaled,
)
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import corner_patches, merge, patch_blend, place, seeded_pattern, smooth_pattern
from bdx_study.attacks.patch import trojan_geometry, trojan_square

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = LazyModule("torch")


class AdaptivePatchRecipe(AttackRecipe):
    """The geometry of the four training triggers and the test trigger, scaled with H, each of
    which must fit the input: the corner logo (``logo_side``, at ``corner_at`` and mirrored at
    ``corner_left_at``), the top logo (``top_side`` at ``top_at``), four 3x3 corner
    checkerboards and the trojan square (``square_side``, ``square_margin``)."""

    params: AdaptivePatchParams
    checker_side = 3

    def resolve(self) -> None:
        super().resolve()
        shape = self.input_shape
        _, h, w = shape
        s0, s1, off = scaled(5, h, 3), scaled(13, h, 3), scaled(1, h, 0)
        self.logo_side, self.top_side = s0, s1
        self.corner_at, self.top_at, self.corner_left_at = (h - s0, w - s0), (off, w - off - s1), (h - s0, 0)
        try:  # in the order the trigger is built
            check_placement(shape, (s0, s0), *self.corner_at)
            check_placement(shape, (s1, s1), *self.top_at)
            for at in corner_positions(shape, self.checker_side):
                check_placement(shape, (self.checker_side, self.checker_side), *at)
            self.square_side, self.square_margin = trojan_geometry(shape, None, None)
            check_placement(shape, (s0, s0), *self.corner_left_at)
        except ValueError as e:
            raise self.fail(str(e)) from None


class AdaptivePatchParams(CoverParams):
    reference_rates = {16: 0.05, 28: 0.02, 32: 0.003}
    reference_cover_rates = {16: 0.1, 28: 0.04, 32: 0.006}
    Recipe = AdaptivePatchRecipe

    alphas: tuple[float, float, float, float] = Field(
        (0.5, 0.2, 0.5, 0.3), description="training alpha of the corner logo, top logo, four corners, square"
    )
    test_alpha: float = Field(1.0, gt=0.0, le=1.0, description="alpha of the test trigger (toolbox: 1)")


@register_attack("adaptive_patch")
class AdaptivePatch(Attack):
    """Adaptive-Patch: k = 4 seeded training triggers, each at its own alpha (toolbox geometry
    at 32x32, the logos replaced by seeded patterns):

    0. a 5x5 "corner logo" at the bottom right (rows/columns 27-31), alpha 0.5;
    1. a 13x13 smooth "top logo" at rows 1-13, columns 18-30, alpha 0.2;
    2. four 3x3 checkerboards, one per corner, alpha 0.5;
    3. the trojan square (8x8 at 21-28), alpha 0.3.

    The poison indices are cut into 4 consecutive chunks, trigger j on chunk j; likewise the
    cover indices (which keep their labels). Test: the corner logo at both bottom corners plus
    the four corner checkerboards, at alpha 1 (the toolbox's phoenix_corner2 + badnet_patch4):
    a trigger never seen in training at full strength.

    Adaptation: logo sides and offsets scale with H (28x28: 4x4 corner logo, 11x11 top logo at
    rows 1-11; 16x16: 3x3 and 6x6), checkerboards stay 3x3. Rates: 0.003 / 0.006 (32x32,
    toolbox), 0.02 / 0.04 (28x28: at 0.01 / 0.02 a 5-epoch Fashion-MNIST victim reached 81%),
    0.05 / 0.1 (16x16)."""

    Params = AdaptivePatchParams
    random_trigger = True
    recipe: AdaptivePatchRecipe  # the geometry, checked

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        r, shape = self.recipe, self.input_shape
        c = shape[0]
        gen = self.generator(2)
        logo = seeded_pattern((c, r.logo_side, r.logo_side), gen, binary=True)
        corner = place(shape, logo, *r.corner_at)
        top = place(shape, smooth_pattern((c, r.top_side, r.top_side), gen, cells=3), *r.top_at)
        self.triggers = [
            corner,
            top,
            corner_patches(shape, r.checker_side),
            trojan_square(shape, gen, r.square_side, r.square_margin),
        ]
        corner_left = place(shape, logo.flip(-1), *r.corner_left_at)
        self.test_trigger = merge(self.triggers[2], corner, corner_left)  # the logos drawn over the checkerboards

    def _chunks(self, x: Tensor) -> Tensor:
        alphas = self.params.alphas  # type: ignore[attr-defined]
        out = x.clone()
        for j, part in enumerate(torch.arange(len(x)).tensor_split(4)):
            if len(part):
                t, m = self.triggers[j]
                out[part] = patch_blend(x[part], t.to(x), m.to(x), alphas[j])
        return out

    def poison_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        return self._chunks(x)

    def cover_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        return self._chunks(x)

    def apply_trigger(self, x: Tensor) -> Tensor:
        t, m = self.test_trigger
        return patch_blend(x, t.to(x), m.to(x), self.params.test_alpha)  # type: ignore[attr-defined]
