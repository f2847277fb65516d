"""Blend attacks: Blend (seeded noise or a user's image) and Adaptive-Blend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, model_validator

from bdx_study._io import sha256_file
from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import Attack, AttackParams, AttackRecipe, CoverParams
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import patch_blend, seeded_pattern

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = LazyModule("torch")


def read_trigger_image(recipe: AttackRecipe, path: str | None) -> np.ndarray | None:
    """The user's trigger image as uint8 (C, H, W) at the input's size (grey: luminance), or
    None for seeded noise. The file must exist and decode, and the input must be square."""
    if path is None:
        return None
    c, h, w = recipe.input_shape
    file = Path(path).expanduser()
    if not file.is_file():
        raise recipe.fail(f"trigger_image {path!r}: no such file")
    if h != w:
        raise recipe.fail(f"trigger_image needs square inputs, got {h}x{w}")
    from bdx_study.data import DataError, read_image  # only for a user's file

    try:
        return read_image(file, h, channels=c)
    except DataError as e:
        raise recipe.fail(f"trigger_image {path!r}: {e}") from None


class _TriggerImageRecipe(AttackRecipe):
    """The trigger image (``image``, None: seeded noise) and its file's sha256, which is part
    of the identity: a changed file is a different victim."""

    def read_image(self, path: str | None) -> None:
        self.image = read_trigger_image(self, path)
        self.file_sha = None if path is None else sha256_file(Path(path).expanduser())

    def identity(self, victim_seed: int) -> dict[str, Any]:
        d = super().identity(victim_seed)
        if self.file_sha is not None:
            d["trigger_image_sha256"] = self.file_sha
        return d


class BlendRecipe(_TriggerImageRecipe):
    """The trigger image, read and resized."""

    params: BlendParams

    def resolve(self) -> None:
        super().resolve()
        self.read_image(self.params.trigger_image)


class BlendParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    Recipe = BlendRecipe

    alpha: float = Field(0.2, gt=0.0, le=1.0, description="blend weight of the trigger at training time")
    test_alpha: float | None = Field(None, gt=0.0, le=1.0, description="blend weight at test time; null = alpha")
    trigger_image: str | None = Field(
        None, description="an image file (PNG, JPEG, ...) to blend, resized to the input; null = seeded U(0, 1) noise"
    )


class AdaptiveBlendRecipe(_TriggerImageRecipe):
    """The block grid (``pieces`` = grid x grid blocks must tile the input), the blocks dropped
    per image, and the trigger image."""

    params: AdaptiveBlendParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        _, h, w = self.input_shape
        self.grid = math.isqrt(p.pieces)
        if h % self.grid or w % self.grid:
            raise self.fail(f"pieces {p.pieces} ({self.grid} x {self.grid} blocks) do not divide the {h}x{w} input")
        self.drop = round(p.mask_rate * p.pieces)
        self.read_image(p.trigger_image)


class AdaptiveBlendParams(CoverParams):
    reference_rates = {16: 0.05, 28: 0.02, 32: 0.003}
    reference_cover_rates = {16: 0.05, 28: 0.02, 32: 0.003}
    Recipe = AdaptiveBlendRecipe

    alpha: float = Field(0.15, gt=0.0, le=1.0, description="blend weight on poison and cover images (toolbox 0.15)")
    test_alpha: float = Field(0.2, gt=0.0, le=1.0, description="blend weight of the full test trigger (toolbox 0.2)")
    pieces: int = Field(16, ge=1, description="blocks the trigger is cut into (a square number: 16 = 4 x 4)")
    mask_rate: float = Field(0.5, ge=0.0, lt=1.0, description="share of blocks dropped on each training image")
    trigger_image: str | None = Field(None, description="an image file to blend; null = seeded U(0, 1) noise")

    @model_validator(mode="after")
    def _square(self) -> AdaptiveBlendParams:
        if math.isqrt(self.pieces) ** 2 != self.pieces:
            raise ValueError(f"pieces must be a square number (4, 9, 16, ...), got {self.pieces}")
        return self


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
