"""ISSBA-style sample-specific invisible triggers (Li et al., ICCV'21), from a small
StegaStamp-like encoder (:class:`~bdx_study.attacks._nets.SecretEncoder`) trained in the project
once per training set and cached like a victim."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import Attack, AttackContext, AttackParams, AttackRecipe, seeded_init
from bdx_study.attacks._registry import register_attack

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor

    from bdx_study.attacks._nets import SecretEncoder
    from bdx_study.data import ImageData
else:
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")


class ISSBARecipe(AttackRecipe):
    """The encoder's secret map is H/4 x W/4: H and W divisible by 4."""

    def resolve(self) -> None:
        super().resolve()
        _, h, w = self.input_shape
        if h % 4 or w % 4:
            raise self.fail(f"the encoder needs H and W divisible by 4, got {h}x{w}")


class ISSBAParams(AttackParams):
    reference_rates = {16: 0.05, 28: 0.02, 32: 0.02}
    Recipe = ISSBARecipe

    secret_bits: int = Field(20, ge=1, description="length of the embedded secret (toolbox: 20)")
    encoder_steps: int = Field(1500, ge=1, description="training steps of the encoder (batch 64)")
    encoder_width: int = Field(16, ge=4, description="channels of the encoder's first level")
    amplitude: float = Field(0.05, gt=0.0, le=1.0, description="bound on the residual, [0, 1] units (~13/255)")
    image_weight: float = Field(
        0.0, ge=0.0, description="weight of the residual's mean square in the encoder loss (0: the bound alone)"
    )
    encoder_seed: int = Field(0, description="seed of the encoder (shared by victims of any seed)")


def train_encoder(
    train: ImageData,
    shape: tuple[int, int, int],
    *,
    bits: int,
    width: int,
    amplitude: float,
    steps: int,
    image_weight: float,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, Tensor], float]:
    """StegaStamp-style training: random secrets per image, loss = BCE(decoder(x + r + noise), s)
    + image_weight (ramped up over the first half) * mean(r^2), the residual bounded by
    ``amplitude``; the decoder sees uniform noise of one grey level so the code survives uint8
    storage. Returns (the encoder's state, the decoder's bit accuracy on the last 10 batches)."""
    from bdx_study.attacks._nets import Decoder, SecretEncoder

    gen = torch.Generator().manual_seed(seed)
    enc = seeded_init(lambda: SecretEncoder(shape, bits, width, amplitude), seed).to(device)
    dec = seeded_init(lambda: Decoder(shape[0], bits), seed + 1).to(device)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    bs = min(64, len(train))
    correct: list[float] = []
    for step in range(steps):
        x = train.images(torch.randint(0, len(train), (bs,), generator=gen)).to(device)
        s = torch.randint(0, 2, (bs, bits), generator=gen).float().to(device)
        r = enc(x, s)
        noise = ((torch.rand(x.shape, generator=gen) - 0.5) / 255).to(device)
        logits = dec((x + r).clamp(0, 1) + noise)
        ramp = min(1.0, step / max(1, steps // 2))
        loss = F.binary_cross_entropy_with_logits(logits, s) + image_weight * ramp * r.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= steps - 10:
            correct.append(float(((logits > 0).float() == s).float().mean()))
    return {k: v.detach().cpu() for k, v in enc.state_dict().items()}, sum(correct) / max(1, len(correct))


@register_attack("issba")
class ISSBA(Attack):
    """ISSBA: poisoned images carry a sample-specific, near-invisible residual E(x, s) that a
    steganography encoder computes for a fixed seeded secret s; they get the target label.
    Test: the same encoder and secret on every non-target input.

    The encoder (no pretrained StegaStamp is used) is trained in ``prepare`` on the victim's
    training images with a decoder that must recover random secrets, and cached in the victims'
    store under a hash of (training images, input shape, recipe), so all victims of one dataset
    share it; it is also saved with each victim (``state_dict``).

    The residual is bounded by ``amplitude`` (0.05, about 13/255: ISSBA's residuals have a PSNR
    near 27 dB) instead of weighed by an image loss: on a CPU budget the StegaStamp losses stall at
    chance bit accuracy. Adaptation: the secret map is H/4 x W/4 (H, W divisible by 4), 20 bits at
    every size.
    Rates: 0.02 (32x32, toolbox; 28x28), 0.05 (16x16)."""

    Params = ISSBAParams
    quick_params = {"encoder_steps": 3, "encoder_width": 4}
    random_trigger = True

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)  # the recipe checks H, W divisible by 4
        p: ISSBAParams = params  # type: ignore[assignment]
        self.secret = torch.randint(0, 2, (1, p.secret_bits), generator=self.generator(2)).float()
        self.encoder: SecretEncoder | None = None

    def prepare(self, train: ImageData, context: AttackContext | None = None) -> None:
        p: ISSBAParams = self.params  # type: ignore[assignment]
        context = context or AttackContext()
        recipe = {
            "input_shape": list(self.input_shape),
            "bits": p.secret_bits,
            "width": p.encoder_width,
            "amplitude": p.amplitude,
            "steps": p.encoder_steps,
            "image_weight": p.image_weight,
            "seed": p.encoder_seed,
        }

        def build() -> dict[str, Tensor]:
            state, bit_acc = train_encoder(
                train, self.input_shape, bits=p.secret_bits, width=p.encoder_width, amplitude=p.amplitude,
                steps=p.encoder_steps, image_weight=p.image_weight, seed=p.encoder_seed, device=context.device,
            )  # fmt: skip
            return {**state, "_bit_accuracy": torch.tensor(bit_acc)}

        if context.store is None:
            state = build()
        else:
            from bdx_study.attacks._surrogate import data_fingerprint

            state, _ = context.store.get_or_build("issba_encoder", {**recipe, "data": data_fingerprint(train)}, build)
        self._load_encoder(state)
        self.prepared = True

    def _load_encoder(self, state: Mapping[str, Tensor]) -> None:
        from bdx_study.attacks._nets import SecretEncoder

        p: ISSBAParams = self.params  # type: ignore[assignment]
        enc = SecretEncoder(self.input_shape, p.secret_bits, p.encoder_width, p.amplitude)
        self.bit_accuracy = float(state["_bit_accuracy"]) if "_bit_accuracy" in state else float("nan")
        enc.load_state_dict({k: v for k, v in state.items() if not k.startswith("_")})
        self.encoder = enc.eval()
        for q in enc.parameters():
            q.requires_grad_(False)

    def state_dict(self) -> dict[str, Tensor]:
        if self.encoder is None:
            return {}
        state = {f"encoder.{k}": v.clone() for k, v in self.encoder.state_dict().items()}
        return {**state, "encoder._bit_accuracy": torch.tensor(self.bit_accuracy)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self._load_encoder({k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
        self.prepared = True

    def apply_trigger(self, x: Tensor) -> Tensor:
        if self.encoder is None:
            raise self.fail(
                "the encoder is trained before the victim: load it with the victim "
                "(VictimRecord.load_attack()) or prepare() first"
            )
        enc = self.encoder.to(x.device)
        with torch.no_grad():
            out = [(c + enc(c, self.secret.to(c))).clamp(0.0, 1.0) for c in x.split(512)]
        return torch.cat(out) if out else x.clone()
