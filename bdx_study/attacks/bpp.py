"""BppAttack (Wang et al., CVPR'22): colour-depth squeezing with dithering, trained with negatives."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import (
    AttackParams,
    AttackRecipe,
    CoverParams,
    HookBatch,
    TrainingControlledAttack,
    TrainingHook,
    batch_counts,
)
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import dither_quantize, quantize

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = LazyModule("torch")


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


class _BppHook(TrainingHook):
    def __init__(self, attack: Bpp) -> None:
        self.attack = attack

    def batch(self, x: Tensor, y: Tensor, idx: Tensor, gen: torch.Generator) -> HookBatch:
        a = self.attack
        n_bd, n_neg = batch_counts(len(x), a.poison_rate, a.cover_rate)
        if n_bd + n_neg == 0:
            return HookBatch(x, y)
        x, y = x.clone(), y.clone()
        x[:n_bd] = a.apply_trigger(x[:n_bd])
        y[:n_bd] = a.target
        if n_neg:
            # negatives: a clean image plus the squeezing residual of another training image, true label
            other = x[torch.randperm(len(x), generator=gen)[:n_neg].to(x.device)]
            residual = a.apply_trigger(other) - other
            x[n_bd : n_bd + n_neg] = (x[n_bd : n_bd + n_neg] + residual).clamp(0.0, 1.0)
        return HookBatch(x, y, n_poison=n_bd, n_cover=n_neg)


@register_attack("bpp")
class Bpp(TrainingControlledAttack):
    """BppAttack: the trigger squeezes every channel to ``squeeze_num`` levels,
    round(x (q - 1)) / (q - 1), with Floyd-Steinberg dithering. Training-controlled, no fixed
    poisoned set: in every batch (shuffled by the trainer) the first ``int(B * poison_rate)``
    images are squeezed and relabelled to the target, the next ``int(B * cover_rate)`` are
    negatives (a clean image plus the squeezing residual of another image of the batch, true
    label), the rest stay clean. Deterministic trigger (no seed).

    Adaptation: q = 8 levels per channel on RGB (512 colours, toolbox); q = 4 on one grey
    channel (8 grey levels with dithering left a 5-epoch Fashion-MNIST victim at 25% success,
    plain 8-level rounding at 5%). Rates per batch: 0.1 / 0.1 (BackdoorBench's pratio and
    neg_ratio; the toolbox uses 0.2 / 0.2) at every size."""

    Params = BppParams
    quick_params = {}  # its hook trains nothing of its own
    recipe: BppRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        self.levels = self.recipe.levels

    def training_hook(self) -> TrainingHook:
        return _BppHook(self)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return dither_quantize(x, self.levels) if self.params.dither else quantize(x, self.levels)  # type: ignore[attr-defined]
