"""Clean-label attacks: SIG and label-consistent (Turner et al.). Only target-class images are
poisoned and every label is kept; ``poison_rate`` is still a fraction of the whole training set,
so the target class must hold that many images."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import (
    Attack,
    AttackContext,
    AttackParams,
    AttackRecipe,
    class_indices,
    count_classes,
    draw,
)
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import corner_patches, patch_blend, sinusoid

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from bdx_study.data import ImageData
else:
    torch = LazyModule("torch")


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


class _CleanLabel(Attack):
    """Poison indices drawn from the target class only (its recipe checks the class holds
    enough images); labels unchanged."""

    def select(self, y: Tensor) -> tuple[Tensor, Tensor]:
        pool = class_indices(y, self.target)
        return draw(pool, int(len(y) * self.poison_rate), self.generator(1)), torch.zeros(0, dtype=torch.int64)

    def poison_labels(self, y: Tensor) -> Tensor:
        return y.clone()


@register_attack("sig")
class SIG(_CleanLabel):
    """SIG (Barni et al., clean-label): v(i, j) = delta sin(2 pi j f / W), vertical stripes the
    same on every row and channel, added to ``int(N * poison_rate)`` target-class images
    (clamped, labels kept). Test: v added to every non-target input.

    Adaptation: W is the input's width, f = 6 at every size; delta 30/255 at 32x32 (toolbox),
    40/255 at 16x16 (BackdoorBench's amplitude: one grey channel carries less signal), 60/255 at
    28x28 (at 40/255 Fashion-MNIST victims reached 49% with rate 0.02 and 53% with 0.05).
    Rates: 0.02 (32x32, toolbox), 0.05 (28x28: half of a Fashion-MNIST class), 0.05 (16x16)."""

    Params = SIGParams
    recipe: SIGRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        self.delta, self.test_delta = self.recipe.delta, self.recipe.test_delta

    def _add(self, x: Tensor, delta: float) -> Tensor:
        v = sinusoid(self.input_shape, delta, self.params.frequency)  # type: ignore[attr-defined]
        return (x + v.to(x)).clamp(0.0, 1.0)

    def train_trigger(self, x: Tensor) -> Tensor:
        return self._add(x, self.delta)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return self._add(x, self.test_delta)


@register_attack("clean_label")
class CleanLabel(_CleanLabel):
    """Label-consistent backdoor (Turner et al.): ``int(N * poison_rate)`` target-class images are
    first made hard to classify by PGD against a surrogate the attack trains itself (a small CNN
    on the clean training set), then stamped with four 3x3 corner checkerboards (the toolbox's
    badnet_patch4); labels are kept. Test: the corner patches at full amplitude.

    Adaptation: L2 PGD with the toolbox's eps 600/255 at 32x32x3 scaled by sqrt(CHW / 3072)
    (the same per-pixel strength: 1.19 at 28x28, 0.59 at 16x16), 20 steps; 3x3 patches at every
    size. Rates: 0.003 (32x32, toolbox), 0.05 (28x28: half of a Fashion-MNIST class; at 0.02
    victims reached 88% and 69% in two budgets), 0.05 (16x16)."""

    Params = CleanLabelParams
    quick_params = {"surrogate_epochs": 1, "pgd_steps": 2}
    recipe: CleanLabelRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        self.eps = self.recipe.eps
        self.trigger, self.mask = corner_patches(self.input_shape, self.recipe.params.patch_size)
        self.surrogate: nn.Module | None = None

    def prepare(self, train: ImageData, context: AttackContext | None = None) -> None:
        from bdx_study.attacks._surrogate import surrogate

        p: CleanLabelParams = self.params  # type: ignore[assignment]
        self.surrogate = surrogate(self, train, context, epochs=p.surrogate_epochs, seed=p.surrogate_seed)
        self.prepared = True

    def poison_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        p: CleanLabelParams = self.params  # type: ignore[assignment]
        from bdx_study.attacks._surrogate import pgd

        assert self.surrogate is not None, "prepare() first"
        y = torch.full((len(x),), self.target, dtype=torch.int64)
        hard = pgd(self.surrogate, x, y, eps=self.eps, steps=p.pgd_steps, norm=p.norm)
        return patch_blend(hard, self.trigger, self.mask, p.amplitude)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return patch_blend(x, self.trigger.to(x), self.mask.to(x), 1.0)
