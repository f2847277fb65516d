"""Params and recipes of the patch attacks (:mod:`bdx_study.attacks.patch`): none, BadNet
(all-to-one and all-to-all), Trojan's square and TaCT."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import ConfigDict, Field, field_validator

from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe, CoverParams, count_classes


class NoAttackParams(AttackParams):
    model_config = ConfigDict(title="Params")  # it was NoAttack.Params: validation errors keep that name
    reference_rates = {32: 0.0}

    poison_rate: float | None = Field(0.0, ge=0.0, le=0.0, description="always 0: nothing is poisoned")


class BadNetRecipe(AttackRecipe):
    """The patch's corner: ``patch_size`` + ``margin`` must fit the input."""

    params: BadNetParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        _, h, w = self.input_shape
        if p.patch_size + p.margin > min(h, w):
            raise self.fail(f"patch_size {p.patch_size} + margin {p.margin} exceeds the {h}x{w} input")
        self.top, self.left = h - p.margin - p.patch_size, w - p.margin - p.patch_size


class BadNetParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    Recipe = BadNetRecipe

    patch_size: int = Field(3, ge=1, description="side of the square checkerboard patch, pixels (reference: 3)")
    margin: int = Field(0, ge=0, description="distance of the patch from the bottom-right corner, pixels")


class BadNetAllToAllParams(BadNetParams):
    """BadNet's params; all-to-all has its own reference rates."""

    model_config = ConfigDict(title="BadNetParams")  # validation errors name the params as before
    reference_rates = {16: 0.1, 28: 0.1, 32: 0.1}


def trojan_size(h: int, side: int | None, margin: int | None) -> tuple[int, int]:
    """(side, margin) of the toolbox's trojan square on H x H inputs; the defaults scale its 8x8
    at rows/columns 21-28 of 32x32: side = H / 4 (at least 2), margin = floor(3 H / 32)."""
    return max(2, round(h / 4)) if side is None else side, (3 * h) // 32 if margin is None else margin


def trojan_geometry(shape: tuple[int, int, int], side: int | None, margin: int | None) -> tuple[int, int]:
    """:func:`trojan_size` on ``shape``; ValueError if the square does not fit."""
    _, h, w = shape
    s, m = trojan_size(h, side, margin)
    if s + m > min(h, w):
        raise ValueError(f"a {s}x{s} trojan square {m} pixels from the corner exceeds the {h}x{w} input")
    return s, m


class TrojanRecipe(AttackRecipe):
    """The trojan square's side and margin (defaults scaled with H), which must fit the input."""

    params: TrojanParams

    def resolve(self) -> None:
        super().resolve()
        try:
            self.side, self.margin = trojan_geometry(self.input_shape, self.params.patch_size, self.params.margin)
        except ValueError as e:
            raise self.fail(str(e)) from None


class TrojanParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    Recipe = TrojanRecipe

    patch_size: int | None = Field(None, ge=1, description="side of the square, pixels; null = H / 4 (8 at 32x32)")
    margin: int | None = Field(None, ge=0, description="pixels from the bottom-right corner; null = 3 H / 32")


class TaCTRecipe(TrojanRecipe):
    """The trojan square; source, target and cover classes distinct classes of the data; the
    training set must hold enough source images for the poisons and cover-class images for the covers."""

    params: TaCTParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        classes = [p.source, *p.cover_classes]
        if max(classes) >= self.num_classes:
            raise self.fail(
                f"source {p.source} and cover_classes {p.cover_classes} must be < num_classes {self.num_classes}"
            )
        if p.source == p.target or p.source in p.cover_classes or p.target in p.cover_classes:
            raise self.fail(
                f"source {p.source}, target {p.target} and cover_classes {p.cover_classes} must be distinct classes"
            )

    def check_data(self, shape: Sequence[int], labels: np.ndarray) -> None:
        super().check_data(shape, labels)
        p = self.params
        n = len(labels)
        need_p, need_c = int(n * self.poison_rate), int(n * self.cover_rate)
        have_p, have_c = count_classes(labels, p.source), count_classes(labels, p.cover_classes)
        if need_p > have_p:
            raise self.fail(
                f"poison_rate {self.poison_rate} needs {need_p} images of source class {p.source}, "
                f"the training set has {have_p}"
            )
        if need_c > have_c:
            raise self.fail(
                f"cover_rate {self.cover_rate} needs {need_c} images of cover classes {list(p.cover_classes)}, "
                f"the training set has {have_c}"
            )


class TaCTParams(CoverParams, TrojanParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    reference_cover_rates = {16: 0.05, 28: 0.01, 32: 0.003}
    Recipe = TaCTRecipe

    source: int = Field(1, ge=0, description="the source class: only its images get the target label")
    cover_classes: list[int] = Field([5, 7], min_length=1, description="classes whose triggered images keep labels")

    @field_validator("cover_classes")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError(f"cover_classes must be distinct class indices, got {v}")
        return v
