"""Params and recipe of TrojanNN (:mod:`bdx_study.attacks.trojannn`)."""

from __future__ import annotations

from pydantic import Field

from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe
from bdx_study.attacks.recipes.patch import trojan_size


class TrojanNNRecipe(AttackRecipe):
    """The trigger square at the trojan square's place (``null`` side: H / 4, at least 2;
    ``null`` margin: 3 H / 32), which must fit the input."""

    params: TrojanNNParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        _, h, w = self.input_shape
        s, m = trojan_size(h, p.patch_size, p.margin)
        if s + m > min(h, w):
            raise self.fail(f"patch_size {s} + margin {m} exceeds the {h}x{w} input")
        self.side, self.top, self.left = s, h - m - s, w - m - s


class TrojanNNParams(AttackParams):
    reference_rates = {32: 0.1}
    Recipe = TrojanNNRecipe

    neurons: int = Field(2, ge=1, description="penultimate neurons the trigger is optimized for (paper: 2)")
    activation_target: float = Field(100.0, gt=0.0, description="value the selected |activations| are pushed to")
    trigger_steps: int = Field(1000, ge=1, description="Adam steps of the trigger (toolbox: 1,000 at lr 0.1)")
    trigger_lr: float = Field(0.1, gt=0.0, description="Adam lr of the trigger, cosine-annealed")
    retrain_epochs: int = Field(1, ge=1, description="last epochs of victim training spent retraining (toolbox: 1)")
    patch_size: int | None = Field(None, ge=1, description="side of the trigger square; null = H / 4 (8 at 32x32)")
    margin: int | None = Field(None, ge=0, description="pixels from the bottom-right corner; null = 3 H / 32")
