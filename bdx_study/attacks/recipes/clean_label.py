"""Params and recipes of the clean-label attacks (:mod:`bdx_study.attacks.clean_label`): SIG
and label-consistent. Only target-class images are poisoned; ``poison_rate`` is still a
fraction of the whole training set, so the target class must hold that many images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe, count_classes


class TargetClassRecipe(AttackRecipe):
    """Poisons drawn from the target class only: it must hold ``int(N * poison_rate)`` images."""

    def check_data(self, shape: Sequence[int], labels: np.ndarray) -> None:
        super().check_data(shape, labels)
        target = self.params.target
        need, have = int(len(labels) * self.poison_rate), count_classes(labels, target)
        if need > have:
            raise self.fail(
                f"poison_rate {self.poison_rate} needs {need} images of target class {target} "
                f"(clean-label attacks poison only the target class), the training set has {have}"
            )


class SIGRecipe(TargetClassRecipe):
    """The stripes' amplitude at training and test time (``null`` delta: the reference for H)."""

    params: SIGParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        self.delta: float = p.reference_deltas.get(self.input_shape[1], 30 / 255) if p.delta is None else p.delta
        self.test_delta: float = self.delta if p.test_delta is None else p.test_delta

    def identity(self, victim_seed: int) -> dict[str, Any]:
        return {**super().identity(victim_seed), "delta": self.delta, "test_delta": self.test_delta}


class SIGParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.05, 32: 0.02}
    reference_deltas: ClassVar[dict[int, float]] = {16: 40 / 255, 28: 60 / 255, 32: 30 / 255}
    Recipe = SIGRecipe

    delta: float | None = Field(None, gt=0.0, le=1.0, description="amplitude in [0, 1] units; null = reference")
    frequency: float = Field(6.0, gt=0.0, description="stripes across the width (toolbox and BackdoorBench: 6)")
    test_delta: float | None = Field(None, gt=0.0, le=1.0, description="amplitude at test time; null = delta")


class CleanLabelRecipe(TargetClassRecipe):
    """Two corner patches must fit across the input; the PGD radius (``null``: L2 600/255 scaled
    by sqrt(C H W / 3072), L-inf 16/255)."""

    params: CleanLabelParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        c, h, w = self.input_shape
        if 2 * p.patch_size > min(h, w):
            raise self.fail(f"two corner patches of patch_size {p.patch_size} exceed the {h}x{w} input")
        if p.eps is not None:
            self.eps = p.eps
        else:
            self.eps = 600 / 255 * math.sqrt(c * h * w / 3072) if p.norm == "l2" else 16 / 255

    def identity(self, victim_seed: int) -> dict[str, Any]:
        return {**super().identity(victim_seed), "eps": self.eps}


class CleanLabelParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.05, 32: 0.003}
    Recipe = CleanLabelRecipe

    norm: Literal["l2", "linf"] = Field("l2", description="PGD norm (toolbox data: L2, 'two_600')")
    eps: float | None = Field(
        None,
        gt=0.0,
        description="PGD radius in [0, 1] units; null = 600/255 scaled by sqrt(C H W / 3072) (L2), 16/255 (linf)",
    )
    pgd_steps: int = Field(20, ge=1, description="PGD steps against the surrogate")
    surrogate_epochs: int = Field(4, ge=1, description="epochs of the attacker's small-CNN surrogate on clean data")
    surrogate_seed: int = Field(0, description="seed of the surrogate (shared by victims of any seed)")
    patch_size: int = Field(3, ge=1, description="side of each corner checkerboard, pixels")
    amplitude: float = Field(1.0, gt=0.0, le=1.0, description="alpha of the corner patches on training images")
