"""Clean-label attacks: SIG and label-consistent (Turner et al.). Only target-class images are
poisoned and every label is kept; ``poison_rate`` is still a fraction of the whole training set.
Their params and checks are in :mod:`bdx_study.attacks.recipes.clean_label`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bdx_study.attacks._base import Attack, AttackContext, AttackParams, class_indices, draw, register_attack
from bdx_study.attacks._surrogate import pgd, surrogate
from bdx_study.attacks._triggers import corner_patches, patch_blend, sinusoid
from bdx_study.attacks.recipes.clean_label import CleanLabelParams, CleanLabelRecipe, SIGParams, SIGRecipe
from bdx_study.data import ImageData


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
    recipe: CleanLabelRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        self.eps = self.recipe.eps
        self.trigger, self.mask = corner_patches(self.input_shape, self.recipe.params.patch_size)
        self.surrogate: nn.Module | None = None

    def prepare(self, train: ImageData, context: AttackContext | None = None) -> None:
        p: CleanLabelParams = self.params  # type: ignore[assignment]
        self.surrogate = surrogate(self, train, context, epochs=p.surrogate_epochs, seed=p.surrogate_seed)
        self.prepared = True

    def poison_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        p: CleanLabelParams = self.params  # type: ignore[assignment]
        assert self.surrogate is not None, "prepare() first"
        y = torch.full((len(x),), self.target, dtype=torch.int64)
        hard = pgd(self.surrogate, x, y, eps=self.eps, steps=p.pgd_steps, norm=p.norm)
        return patch_blend(hard, self.trigger, self.mask, p.amplitude)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return patch_blend(x, self.trigger.to(x), self.mask.to(x), 1.0)
