"""Params and recipes of the frequency-domain attacks (:mod:`bdx_study.attacks.frequency`):
low-frequency (LF) and FTrojan."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe


class LFRecipe(AttackRecipe):
    """Square inputs; the DCT frequencies kept per axis (``null``: H / 8), at most H."""

    params: LFParams

    def resolve(self) -> None:
        super().resolve()
        _, h, w = self.input_shape
        if h != w:
            raise self.fail(f"needs square inputs, got {h}x{w}")
        self.keep: int = max(1, h // 8) if self.params.keep is None else self.params.keep
        if self.keep > h:
            raise self.fail(f"keep {self.keep} exceeds the {h}x{w} input")

    def identity(self, victim_seed: int) -> dict[str, Any]:
        return {**super().identity(victim_seed), "keep": self.keep}


class LFParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.01, 32: 0.01}
    Recipe = LFRecipe

    eps: float = Field(0.1, gt=0.0, le=1.0, description="L-inf size of the additive trigger, [0, 1] units")
    keep: int | None = Field(None, ge=1, description="DCT frequencies kept per axis; null = H / 8 (4 at 32x32)")
    mode: Literal["uap", "random"] = Field(
        "uap",
        description="uap: a low-pass universal perturbation towards the target against the attack's "
        "own surrogate (the LF paper); random: seeded low-pass noise",
    )
    uap_steps: int = Field(200, ge=1, description="Adam steps of the universal perturbation")
    surrogate_epochs: int = Field(4, ge=1, description="epochs of the attacker's small-CNN surrogate")
    surrogate_seed: int = Field(0, description="seed of the surrogate (shared with clean_label)")


class FTrojanRecipe(AttackRecipe):
    """The DCT block (``null`` window: the whole image) must tile the square input and hold
    every position (``null``: mid (w/2-1, w/2-1) and high (w-1, w-1)); the magnitude (``null``:
    30/255 on RGB, 0.5 on grey) and the channels perturbed (U and V of YUV on RGB)."""

    params: FTrojanParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        c, h, w = self.input_shape
        self.window: int = h if p.window is None else p.window
        if h != w or h % self.window:
            raise self.fail(f"window {self.window} must tile the {h}x{w} input (square)")
        b = self.window
        self.positions = [(b // 2 - 1, b // 2 - 1), (b - 1, b - 1)] if p.positions is None else list(p.positions)
        for r, col in self.positions:
            if not (0 <= r < b and 0 <= col < b):
                raise self.fail(f"position ({r}, {col}) lies outside the {b}x{b} DCT block")
        default = 30 / 255 if c == 3 else 0.5
        self.magnitude: float = default if p.magnitude is None else p.magnitude
        self.channels = [1, 2] if (c == 3 and p.yuv) else list(range(c))

    def identity(self, victim_seed: int) -> dict[str, Any]:
        d = super().identity(victim_seed)
        return {**d, "magnitude": self.magnitude, "window": self.window, "positions": self.positions}


class FTrojanParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.05, 32: 0.01}
    Recipe = FTrojanRecipe

    magnitude: float | None = Field(
        None, gt=0.0, description="added to each chosen DCT coefficient, [0, 1] units; null = reference"
    )
    window: int | None = Field(None, ge=2, description="side of the DCT blocks; null = the whole image")
    positions: list[tuple[int, int]] | None = Field(
        None, description="(row, column) coefficients inside a block; null = mid (w/2-1, w/2-1) and high (w-1, w-1)"
    )
    yuv: bool = Field(True, description="perturb the U and V channels of YUV (RGB inputs; grey: the one channel)")

    @field_validator("positions")
    @classmethod
    def _nonempty(cls, v: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if v is not None and not v:
            raise ValueError("positions must name at least one coefficient")
        return v
