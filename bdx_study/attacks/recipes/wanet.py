"""Params and recipe of WaNet (:mod:`bdx_study.attacks.wanet`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bdx_study.attacks.recipes._base import AttackRecipe, CoverParams


class WaNetRecipe(AttackRecipe):
    """The control grid must not exceed the input."""

    params: WaNetParams

    def resolve(self) -> None:
        super().resolve()
        _, h, w = self.input_shape
        if self.params.k > min(h, w):
            raise self.fail(f"control grid k {self.params.k} exceeds the {h}x{w} input")


class WaNetParams(CoverParams):
    reference_rates = {16: 0.1, 28: 0.1, 32: 0.05}
    reference_cover_rates = {16: 0.2, 28: 0.2, 32: 0.1}
    Recipe = WaNetRecipe

    k: int = Field(4, ge=2, description="side of the random control grid (toolbox: 4)")
    strength: float = Field(0.5, gt=0.0, description="warping strength s (toolbox: 0.5)")
    grid_rescale: float = Field(1.0, gt=0.0, description="grid rescale factor (toolbox: 1)")
    cover_noise: Literal["per_batch", "fixed"] = Field(
        "per_batch",
        description="noise-mode covers: a fresh random perturbation every time a cover image is trained on "
        "(original WaNet, through the training hook), or one perturbation drawn once (the toolbox's poisoned set)",
    )
