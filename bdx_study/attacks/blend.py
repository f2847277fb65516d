"""Blend attacks: Blend (seeded noise or a user's image) and Adaptive-Blend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from bdx_study._io import sha256_file
from bdx_study.attacks._base import Attack, AttackParams, CoverParams, register_attack
from bdx_study.attacks._triggers import patch_blend, seeded_pattern
from bdx_study.data import DataError, read_image


class BlendParams(AttackParams):
    alpha: float = Field(0.2, gt=0.0, le=1.0, description="blend weight of the trigger at training time")
    test_alpha: float | None = Field(None, gt=0.0, le=1.0, description="blend weight at test time; null = alpha")
    trigger_image: str | None = Field(
        None, description="an image file (PNG, JPEG, ...) to blend, resized to the input; null = seeded U(0, 1) noise"
    )


def blend_pattern(attack: Attack, path: str | None) -> Tensor:
    """The blend pattern (C, H, W): the user's image resized to the input (grey: luminance), or
    seeded U(0, 1) noise from the attack's pattern generator."""
    c, h, w = attack.input_shape
    if path is None:
        return seeded_pattern((c, h, w), attack.generator(2))
    file = Path(path).expanduser()
    if not file.is_file():
        raise attack.fail(f"trigger_image {path!r}: no such file")
    if h != w:
        raise attack.fail(f"trigger_image needs square inputs, got {h}x{w}")
    try:
        arr = read_image(file, h, channels=c)
    except DataError as e:
        raise attack.fail(f"trigger_image {path!r}: {e}") from None
    return torch.from_numpy(arr.copy()).float() / 255.0


@register_attack("blend")
class Blend(Attack):
    """Blend (Chen et al.): x' = (1 - alpha) x + alpha t, with t a seeded U(0, 1) noise image of
    the input's shape (the "random" trigger of the toolbox) or an image file the user gives;
    the same alpha at training and test time unless ``test_alpha`` is set.

    Adaptation: the pattern is generated at the input's size; alpha 0.2 at every size (toolbox).
    Rates: 0.003 (32x32, toolbox), 0.01 (28x28), 0.05 (16x16)."""

    Params = BlendParams
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    random_trigger = True

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        p: BlendParams = params  # type: ignore[assignment]
        self.pattern = blend_pattern(self, p.trigger_image)
        self._file_sha = None if p.trigger_image is None else sha256_file(Path(p.trigger_image).expanduser())

    def identity(self) -> dict[str, Any]:
        d = super().identity()
        if self._file_sha is not None:
            d["trigger_image_sha256"] = self._file_sha  # a changed file is a different victim
        return d

    def _blend(self, x: Tensor, alpha: float) -> Tensor:
        return patch_blend(x, self.pattern.to(x), torch.ones(1, device=x.device), alpha)

    def train_trigger(self, x: Tensor) -> Tensor:
        return self._blend(x, self.params.alpha)  # type: ignore[attr-defined]

    def apply_trigger(self, x: Tensor) -> Tensor:
        p: BlendParams = self.params  # type: ignore[assignment]
        return self._blend(x, p.alpha if p.test_alpha is None else p.test_alpha)


class AdaptiveBlendParams(CoverParams):
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
    reference_rates = {16: 0.05, 28: 0.02, 32: 0.003}
    reference_cover_rates = {16: 0.05, 28: 0.02, 32: 0.003}
    random_trigger = True

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        p: AdaptiveBlendParams = params  # type: ignore[assignment]
        _, h, w = self.input_shape
        self.grid = math.isqrt(p.pieces)
        if h % self.grid or w % self.grid:
            raise self.fail(f"pieces {p.pieces} ({self.grid} x {self.grid} blocks) do not divide the {h}x{w} input")
        self.drop = round(p.mask_rate * p.pieces)
        self.pattern = blend_pattern(self, p.trigger_image)
        self._file_sha = None if p.trigger_image is None else sha256_file(Path(p.trigger_image).expanduser())

    def identity(self) -> dict[str, Any]:
        d = super().identity()
        if self._file_sha is not None:
            d["trigger_image_sha256"] = self._file_sha
        return d

    def poison_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        _, h, w = self.input_shape
        masks = block_masks(len(x), self.grid, self.drop, h, w, gen).to(x)
        return patch_blend(x, self.pattern.to(x), masks, self.params.alpha)  # type: ignore[attr-defined]

    def apply_trigger(self, x: Tensor) -> Tensor:
        return patch_blend(x, self.pattern.to(x), torch.ones(1, device=x.device), self.params.test_alpha)  # type: ignore[attr-defined]
