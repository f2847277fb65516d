"""WaNet (Nguyen & Tran, ICLR'21): an imperceptible warping field, with noise-mode cover samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import (
    Attack,
    AttackParams,
    AttackRecipe,
    CoverParams,
    HookBatch,
    PoisonedSet,
    TrainingHook,
)
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import wanet_grid, wanet_noise_grid, warp

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from bdx_study.data import ImageData
else:
    torch = LazyModule("torch")


class WaNetRecipe(AttackRecipe):
    """The control grid must not exceed the input."""

    params: WaNetParams

    def resolve(self) -> None:
        super().resolve()
        _, h, w = self.input_shape
        if self.params.k > min(h, w):
            raise self.fail(f"control grid k {self.params.k} exceeds the {h}x{w} input")


class WaNetParams(CoverParams):
    reference_rates = {16: 0.1, 28: 0.1, 32: 0.05}
    reference_cover_rates = {16: 0.2, 28: 0.2, 32: 0.1}
    Recipe = WaNetRecipe

    k: int = Field(4, ge=2, description="side of the random control grid (toolbox: 4)")
    strength: float = Field(0.5, gt=0.0, description="warping strength s (toolbox: 0.5)")
    grid_rescale: float = Field(1.0, gt=0.0, description="grid rescale factor (toolbox: 1)")
    cover_noise: Literal["per_batch", "fixed"] = Field(
        "per_batch",
        description="noise-mode covers: a fresh random perturbation every time a cover image is trained on "
        "(original WaNet, through the training hook), or one perturbation drawn once (the toolbox's poisoned set)",
    )


class _NoiseModeHook(TrainingHook):
    """Re-warps the cover images of every batch with grid + U(-1, 1) / H drawn afresh per image."""

    def __init__(self, attack: WaNet, cover: Tensor) -> None:
        self.attack, self.cover = attack, cover

    def batch(self, x: Tensor, y: Tensor, idx: Tensor, gen: torch.Generator) -> HookBatch:
        is_cover = torch.isin(idx, self.cover).to(x.device)
        n = int(is_cover.sum())
        if n == 0:
            return HookBatch(x, y)
        x = x.clone()
        x[is_cover] = warp(x[is_cover], self.attack.noisy_grid(n, gen).to(x))
        return HookBatch(x, y, n_cover=n)


@register_attack("wanet")
class WaNet(Attack):
    """WaNet: a seeded 2 x k x k control grid U(-1, 1) / mean|.|, upsampled bicubically to H x W;
    warp grid = clamp(identity + s noise / H, -1, 1), applied with grid_sample
    (align_corners=True). Poison: ``int(N * poison_rate)`` warped images relabelled to the
    target. Noise-mode covers: ``int(N * cover_rate)`` other images warped with
    grid + U(-1, 1) / H per pixel and labels kept; by default that perturbation is drawn afresh
    every time a cover image is trained on (a training hook, as the original WaNet), or once
    (``cover_noise: fixed``, the toolbox). Test: the clean warp grid only.

    Adaptation: k = 4 and s = 0.5 at every size (BackdoorBench uses the same on MNIST);
    rates 0.05 / 0.1 (toolbox, 32x32), 0.1 / 0.2 (BackdoorBench's pratio and cross ratio) at
    28x28 (at 0.05 / 0.1 a 5-epoch Fashion-MNIST victim reached 57%) and 16x16."""

    Params = WaNetParams
    quick_params = {}  # its hook only re-draws cover noise
    random_trigger = True

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)  # the recipe checks k against the input
        p: WaNetParams = params  # type: ignore[assignment]
        _, h, w = self.input_shape
        self.noise_grid = wanet_noise_grid(p.k, h, w, self.generator(2))
        self.grid = wanet_grid(self.noise_grid, p.strength, p.grid_rescale)
        self._cover = torch.zeros(0, dtype=torch.int64)

    def noisy_grid(self, n: int, gen: torch.Generator) -> Tensor:
        """(n, H, W, 2) cover grids: the warp grid plus U(-1, 1) / H per pixel, clamped."""
        _, h, w = self.input_shape
        return (self.grid + (torch.rand(n, h, w, 2, generator=gen) * 2 - 1) / h).clamp(-1.0, 1.0)

    def poison(self, data: ImageData) -> PoisonedSet:
        ps = super().poison(data)
        self._cover = ps.cover_indices
        return ps

    def cover_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if self.params.cover_noise == "per_batch":  # type: ignore[attr-defined]
            return x.clone()  # stored clean; the training hook warps them batch by batch
        return warp(x, self.noisy_grid(1, gen).to(x))

    def training_hook(self) -> TrainingHook | None:
        if self.params.cover_noise == "fixed" or not len(self._cover):  # type: ignore[attr-defined]
            return None
        return _NoiseModeHook(self, self._cover)

    def apply_trigger(self, x: Tensor) -> Tensor:
        return warp(x, self.grid.to(x))
