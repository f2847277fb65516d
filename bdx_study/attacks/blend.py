"""Blend attacks: Blend (seeded noise or a user's image) and Adaptive-Blend. Their params and
checks are in :mod:`bdx_study.attacks.recipes.blend`."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bdx_study.attacks._base import Attack, AttackParams, register_attack
from bdx_study.attacks._triggers import patch_blend, seeded_pattern
from bdx_study.attacks.recipes.blend import AdaptiveBlendParams, AdaptiveBlendRecipe, BlendParams, BlendRecipe


def blend_pattern(attack: Attack, image: np.ndarray | None) -> Tensor:
    """The blend pattern (C, H, W): the user's image as the recipe read it (resized to the
    input, grey: luminance), or seeded U(0, 1) noise from the attack's pattern generator."""
    if image is None:
        return seeded_pattern(attack.input_shape, attack.generator(2))
    return torch.from_numpy(image.copy()).float() / 255.0


@register_attack("blend")
class Blend(Attack):
    """Blend (Chen et al.): x' = (1 - alpha) x + alpha t, with t a seeded U(0, 1) noise image of
    the input's shape (the "random" trigger of the toolbox) or an image file the user gives;
    the same alpha at training and test time unless ``test_alpha`` is set.

    Adaptation: the pattern is generated at the input's size; alpha 0.2 at every size (toolbox).
    Rates: 0.003 (32x32, toolbox), 0.01 (28x28), 0.05 (16x16)."""

    Params = BlendParams
    random_trigger = True
    recipe: BlendRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        self.pattern = blend_pattern(self, self.recipe.image)

    def _blend(self, x: Tensor, alpha: float) -> Tensor:
        return patch_blend(x, self.pattern.to(x), torch.ones(1, device=x.device), alpha)

    def train_trigger(self, x: Tensor) -> Tensor:
        return self._blend(x, self.params.alpha)  # type: ignore[attr-defined]

    def apply_trigger(self, x: Tensor) -> Tensor:
        p: BlendParams = self.params  # type: ignore[assignment]
        return self._blend(x, p.alpha if p.test_alpha is None else p.test_alpha)


def block_masks(n: int, grid: int, drop: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """(n, 1, H, W) masks on a grid x grid partition, each with ``drop`` random blocks zeroed."""
    keep = torch.ones(n, grid * grid)
    for i in range(n):
        keep[i, torch.randperm(grid * grid, generator=gen)[:drop]] = 0.0
    blocks = keep.view(n, 1, grid, grid)
    return blocks.repeat_interleave(h // grid, dim=2).repeat_interleave(w // grid, dim=3)


@register_attack("adaptive_blend")
class AdaptiveBlend(Attack):
    """Adaptive-Blend (Qi et al., ICLR'23): the blend pattern is cut into ``pieces`` blocks; every
    poison and cover image gets it with a random ``round(mask_rate * pieces)`` blocks dropped, at
    alpha 0.15. Poisons get the target label, covers keep theirs (which suppresses latent
    separability). Test: the full pattern at alpha 0.2.

    Adaptation: a 4 x 4 grid needs H, W divisible by 4 (16, 28, 32 all are); the seeded noise
    replaces the toolbox's Hello Kitty. Rates: 0.003 / 0.003 (32x32, toolbox),
    0.02 / 0.02 (28x28: at 0.01 / 0.01 Fashion-MNIST victims reached 91% and 82% in two budgets),
    0.05 / 0.05 (16x16)."""

    Params = AdaptiveBlendParams
    random_trigger = True
    recipe: AdaptiveBlendRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        r = self.recipe
        self.grid, self.drop = r.grid, r.drop
        self.pattern = blend_pattern(self, r.image)

    def poison_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        _, h, w = self.input_shape
        masks = block_masks(len(x), self.grid, self.drop, h, w, gen).to(x)
        return patch_blend(x, self.pattern.to(x), masks, self.params.alpha)  # type: ignore[attr-defined]

    def apply_trigger(self, x: Tensor) -> Tensor:
        return patch_blend(x, self.pattern.to(x), torch.ones(1, device=x.device), self.params.test_alpha)  # type: ignore[attr-defined]
