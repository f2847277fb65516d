"""Params and recipe of ISSBA (:mod:`bdx_study.attacks.issba`)."""

from __future__ import annotations

from pydantic import Field

from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe


class ISSBARecipe(AttackRecipe):
    """The encoder's secret map is H/4 x W/4: H and W divisible by 4."""

    def resolve(self) -> None:
        super().resolve()
        _, h, w = self.input_shape
        if h % 4 or w % 4:
            raise self.fail(f"the encoder needs H and W divisible by 4, got {h}x{w}")


class ISSBAParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.02, 32: 0.02}
    Recipe = ISSBARecipe

    secret_bits: int = Field(20, ge=1, description="length of the embedded secret (toolbox: 20)")
    encoder_steps: int = Field(1500, ge=1, description="training steps of the encoder (batch 64)")
    encoder_width: int = Field(16, ge=4, description="channels of the encoder's first level")
    amplitude: float = Field(0.05, gt=0.0, le=1.0, description="bound on the residual, [0, 1] units (~13/255)")
    image_weight: float = Field(
        0.0, ge=0.0, description="weight of the residual's mean square in the encoder loss (0: the bound alone)"
    )
    encoder_seed: int = Field(0, description="seed of the encoder (shared by victims of any seed)")
