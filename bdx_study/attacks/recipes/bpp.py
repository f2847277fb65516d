"""Params and recipe of BppAttack (:mod:`bdx_study.attacks.bpp`)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from bdx_study.attacks.recipes._base import AttackRecipe, CoverParams


class BppRecipe(AttackRecipe):
    """The squeezing levels (``null``: 8 on RGB, 4 on grey)."""

    params: BppParams

    def resolve(self) -> None:
        super().resolve()
        q = self.params.squeeze_num
        self.levels: int = (8 if self.input_shape[0] == 3 else 4) if q is None else q

    def identity(self, victim_seed: int) -> dict[str, Any]:
        return {**super().identity(victim_seed), "squeeze_num": self.levels}


class BppParams(CoverParams):
    reference_rates = {32: 0.1}
    reference_cover_rates = {32: 0.1}
    Recipe = BppRecipe

    squeeze_num: int | None = Field(
        None, ge=2, le=256, description="levels per channel after squeezing; null = 8 (RGB, toolbox), 4 (grey)"
    )
    dither: bool = Field(True, description="Floyd-Steinberg dithering (toolbox: on; BackdoorBench: off)")
