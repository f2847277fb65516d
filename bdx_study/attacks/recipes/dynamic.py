"""Params and recipe of the input-aware dynamic backdoor (:mod:`bdx_study.attacks.dynamic`)."""

from __future__ import annotations

from pydantic import Field

from bdx_study.attacks.recipes._base import AttackRecipe, CoverParams


class DynamicRecipe(AttackRecipe):
    """The generators are two-level U-Nets: H and W divisible by 4."""

    def resolve(self) -> None:
        super().resolve()
        _, h, w = self.input_shape
        if h % 4 or w % 4:
            raise self.fail(f"the generators need H and W divisible by 4, got {h}x{w}")


class DynamicParams(CoverParams):
    reference_rates = {32: 0.1}
    reference_cover_rates = {32: 0.2}
    Recipe = DynamicRecipe

    lambda_div: float = Field(1.0, ge=0.0, description="weight of the diversity loss (BackdoorBench: 1)")
    lambda_norm: float = Field(100.0, ge=0.0, description="weight of the mask-density loss (BackdoorBench: 100)")
    mask_density: float = Field(0.032, gt=0.0, le=1.0, description="target mean of the mask (BackdoorBench: 0.032)")
    mask_steps: int = Field(200, ge=1, description="Adam steps pretraining the mask generator (batch 64)")
    generator_lr: float = Field(0.01, gt=0.0, description="Adam lr of both generators (BackdoorBench: 0.01)")
    width: int = Field(16, ge=4, description="channels of the generators' first level")
