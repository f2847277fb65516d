"""Params and recipe of Adaptive-Patch (:mod:`bdx_study.attacks.adaptive_patch`)."""

from __future__ import annotations

from pydantic import Field

from bdx_study.attacks.recipes._base import AttackRecipe, CoverParams, check_placement, corner_positions, scaled
from bdx_study.attacks.recipes.patch import trojan_geometry


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
