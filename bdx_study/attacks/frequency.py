"""Frequency-domain triggers: low-frequency (LF, Zeng et al. ICCV'21) and FTrojan (Wang et al. ECCV'22)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import Attack, AttackContext, AttackParams, AttackRecipe
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import dct2, idct2, lowpass, rgb_to_yuv, yuv_to_rgb

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor

    from bdx_study.data import ImageData
else:
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")


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


@register_attack("lf")
class LowFrequency(Attack):
    """Low-frequency trigger (LF): a smooth additive pattern with only the lowest ``keep`` x
    ``keep`` DCT frequencies, L-inf ``eps``; poisoned images get it and the target label.

    ``mode: uap`` (default, as the LF paper): a universal perturbation that pushes the attack's
    own surrogate (a small CNN on the clean training set) towards the target, projected on the
    low frequencies and the eps box after every step (seeded start); ``mode: random``: seeded
    low-pass noise scaled to eps, no surrogate.

    Adaptation: keep = H / 8 (4 at 32x32, 3 at 28x28, 2 at 16x16), eps 0.1 at every size.
    Rates: 0.01 at every size but 16x16 (0.05): BackdoorBench uses 0.1, the toolbox has no LF."""

    Params = LFParams
    quick_params = {"surrogate_epochs": 1, "uap_steps": 3}
    random_trigger = True
    recipe: LFRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        p: LFParams = params  # type: ignore[assignment]
        c, h, w = self.input_shape
        self.keep = self.recipe.keep
        self.pattern = self._project(torch.randn(c, h, w, generator=self.generator(2)))
        self.prepared = p.mode == "random"

    def _project(self, t: Tensor) -> Tensor:
        """Low-pass, then scaled into the eps box (the largest low-pass pattern inside it)."""
        t = lowpass(t, self.keep)
        return t * (self.params.eps / t.abs().max().clamp_min(1e-12))  # type: ignore[attr-defined]

    def prepare(self, train: ImageData, context: AttackContext | None = None) -> None:
        p: LFParams = self.params  # type: ignore[assignment]
        if p.mode == "uap":
            from bdx_study.attacks._surrogate import surrogate

            model = surrogate(self, train, context, epochs=p.surrogate_epochs, seed=p.surrogate_seed)
            for q in model.parameters():
                q.requires_grad_(False)
            gen = self.generator(3)
            delta = self.pattern.clone().requires_grad_(True)
            opt = torch.optim.Adam([delta], lr=p.eps / 10)
            target = torch.full((64,), self.target, dtype=torch.int64)
            for _ in range(p.uap_steps):
                idx = torch.randint(0, len(train), (64,), generator=gen)
                loss = F.cross_entropy(model((train.images(idx) + delta).clamp(0, 1)), target[: len(idx)])
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    d = lowpass(delta, self.keep)
                    delta.copy_(d.clamp(-p.eps, p.eps))
            self.pattern = self._project(delta.detach())
        self.prepared = True

    def state_dict(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:  # type: ignore[override]
        self.pattern = state["pattern"].clone()
        self.prepared = True

    def apply_trigger(self, x: Tensor) -> Tensor:
        if not self.prepared:
            raise self.fail("the universal perturbation is not fitted: prepare() it, or load the victim's state")
        return (x + self.pattern.to(x)).clamp(0.0, 1.0)


@register_attack("ftrojan")
class FTrojan(Attack):
    """FTrojan: a fixed bump on chosen mid- and high-frequency DCT coefficients of every
    ``window`` x ``window`` block, in the U and V channels of YUV for RGB inputs; poisoned images
    get it and the target label. Deterministic (no seed).

    Adaptation: one block = the whole image; coefficients (H/2 - 1, H/2 - 1) and (H - 1, H - 1)
    ((15, 15), (31, 31) at 32x32; (13, 13), (27, 27) at 28x28). Magnitude 30/255 on RGB (the
    paper: a +-2/255 ripple in two chroma channels); 0.5 on grey inputs, a +-9/255 ripple in the one
    channel (Fashion-MNIST's black backgrounds clip half of it, and uint8 storage rounds it: at
    30/255 and 60/255 a 5-epoch victim learned nothing at rate 0.01 and lost its clean accuracy
    at 0.05). Rates: 0.01 (32x32; BackdoorBench uses 0.1), 0.05 (28x28 and 16x16)."""

    Params = FTrojanParams
    recipe: FTrojanRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        r = self.recipe
        self.window, self.positions, self.magnitude, self.channels = r.window, r.positions, r.magnitude, r.channels

    def apply_trigger(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        b = self.window
        rgb = c == 3 and self.params.yuv  # type: ignore[attr-defined]
        z = rgb_to_yuv(x) if rgb else x.clone()
        blocks = z.view(n, c, h // b, b, w // b, b).permute(0, 1, 2, 4, 3, 5)
        coef = dct2(blocks)
        for ch in self.channels:
            for r, col in self.positions:
                coef[:, ch, :, :, r, col] += self.magnitude
        z = idct2(coef).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
        return (yuv_to_rgb(z) if rgb else z).clamp(0.0, 1.0)
