"""Params and recipes of the blend attacks (:mod:`bdx_study.attacks.blend`): Blend and Adaptive-Blend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from bdx_study._io import sha256_file
from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe, CoverParams


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
