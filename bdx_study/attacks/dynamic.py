"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS'20): pattern and mask generators."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import (
    AttackContext,
    AttackParams,
    AttackRecipe,
    CoverParams,
    HookBatch,
    TrainingControlledAttack,
    TrainingHook,
    batch_counts,
    seeded_init,
)
from bdx_study.attacks._registry import register_attack

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn

    from bdx_study.data import ImageData
else:
    torch = LazyModule("torch")
    F = LazyModule("torch.nn.functional")


class DynamicRecipe(AttackRecipe):
    """The generators are two-level U-Nets: H and W divisible by 4."""

    def resolve(self) -> None:
        super().resolve()
        _, h, w = self.input_shape
        if h % 4 or w % 4:
            raise self.fail(f"the generators need H and W divisible by 4, got {h}x{w}")


class DynamicParams(CoverParams):
    reference_rates = {32: 0.1}
    reference_cover_rates = {32: 0.2}
    Recipe = DynamicRecipe

    lambda_div: float = Field(1.0, ge=0.0, description="weight of the diversity loss (BackdoorBench: 1)")
    lambda_norm: float = Field(100.0, ge=0.0, description="weight of the mask-density loss (BackdoorBench: 100)")
    mask_density: float = Field(0.032, gt=0.0, le=1.0, description="target mean of the mask (BackdoorBench: 0.032)")
    mask_steps: int = Field(200, ge=1, description="Adam steps pretraining the mask generator (batch 64)")
    generator_lr: float = Field(0.01, gt=0.0, description="Adam lr of both generators (BackdoorBench: 0.01)")
    width: int = Field(16, ge=4, description="channels of the generators' first level")


EPS = 1e-7


def diversity(x1: Tensor, x2: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
    """Mean over the batch of ||x1 - x2|| / ||g1 - g2|| (distances as RMS): small when different
    inputs get different patterns (masks), so the generator does not collapse to one trigger."""
    d_x = (x1 - x2).pow(2).flatten(1).mean(1).add(1e-6).sqrt()
    d_g = (g1 - g2).pow(2).flatten(1).mean(1).add(1e-6).sqrt()  # the 1e-6 keeps the gradient finite at 0
    return (d_x / d_g).mean()


def threshold(m: Tensor) -> Tensor:
    """A soft step at 0.5 (BackdoorBench's mask threshold): tanh(20 m - 10) / 2 + 0.5."""
    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


class _DynamicHook(TrainingHook):
    def __init__(self, attack: InputAware) -> None:
        self.attack = attack
        self.opt: torch.optim.Optimizer | None = None
        self.classifier_opt: torch.optim.Optimizer | None = None
        self.base_lr = 1.0

    def start(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        a = self.attack
        a.pattern_gen.to(device).train()
        a.mask_gen.to(device).eval()
        self.opt = torch.optim.Adam(a.pattern_gen.parameters(), lr=a.params.generator_lr, betas=(0.5, 0.9))  # type: ignore[attr-defined]
        self.classifier_opt, self.base_lr = optimizer, float(optimizer.param_groups[0]["lr"])

    def start_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        """G's lr follows the classifier's schedule (BackdoorBench steps both): a generator that
        keeps moving at full lr while the classifier settles leaves it a stale trigger."""
        assert self.opt is not None and self.classifier_opt is not None
        scale = float(self.classifier_opt.param_groups[0]["lr"]) / self.base_lr
        for group in self.opt.param_groups:
            group["lr"] = self.attack.params.generator_lr * scale  # type: ignore[attr-defined]

    def batch(self, x: Tensor, y: Tensor, idx: Tensor, gen: torch.Generator) -> HookBatch:
        a = self.attack
        assert self.opt is not None, "start() first"
        self.opt.zero_grad(set_to_none=True)
        n_bd, n_cross = batch_counts(len(x), a.poison_rate, a.cover_rate)
        if n_bd + n_cross == 0:
            return HookBatch(x, y)
        other = x[torch.randperm(len(x), generator=gen).to(x.device)]
        with torch.no_grad():
            # threshold(M(x)) with M's sigmoid, exactly as apply_trigger: the trigger trained is the one tested
            masks = threshold(a.mask(torch.cat([x[:n_bd], other[:n_cross]])))
        patterns = a.pattern(torch.cat([x[:n_bd], other[: max(n_bd, n_cross)]]))
        p_bd, p_other = patterns[:n_bd], patterns[n_bd:]  # G(own image), G(other images)
        x_bd = x[:n_bd] + (p_bd - x[:n_bd]) * masks[:n_bd]
        cross_in = x[n_bd : n_bd + n_cross]
        x_cross = cross_in + (p_other[:n_cross] - cross_in) * masks[n_bd:]  # another image's pattern and mask
        x_new = torch.cat([x_bd, x_cross, x[n_bd + n_cross :]])
        y_new = y.clone()
        y_new[:n_bd] = a.target
        extra = None
        if a.params.lambda_div > 0 and n_bd:  # type: ignore[attr-defined]
            extra = a.params.lambda_div * diversity(x[:n_bd], other[:n_bd], p_bd, p_other[:n_bd])  # type: ignore[attr-defined]
        return HookBatch(x_new, y_new, extra, n_poison=n_bd, n_cover=n_cross)

    def after_step(self) -> None:
        assert self.opt is not None
        self.opt.step()

    def finish(self) -> None:
        a = self.attack
        a.pattern_gen.cpu().eval()
        a.mask_gen.cpu().eval()
        self.opt = None


@register_attack("dynamic")
class InputAware(TrainingControlledAttack):
    """Input-aware dynamic backdoor: a pattern generator G and a mask generator M (small U-Nets)
    make a different trigger for every input, x' = x + (G(x) - x) * threshold(M(x)).

    Training-controlled: M is first trained alone (``prepare``: a density loss
    lambda_norm * relu(mean(M(x)) - density) plus lambda_div times the diversity loss), then
    fixed; G trains jointly with the classifier (its own Adam, its lr scaled as the classifier's
    follows its schedule): in every batch the first
    ``int(B * poison_rate)`` images get their own trigger and the target label, the next
    ``int(B * cover_rate)`` get another image's pattern and mask but keep their label (cross
    samples: the trigger must match its input), the rest stay clean; G's loss adds
    lambda_div times the diversity loss. Test: each input's own trigger.

    Adaptation: U-Nets of two levels (H, W divisible by 4: 16, 28, 32), width 16; mask density
    0.032 at every size. Rates per batch: 0.1 poison, 0.2 cross (BackdoorBench: pratio 0.1,
    cross_ratio 2) at every size."""

    Params = DynamicParams
    quick_params = {"mask_steps": 2, "width": 4}
    random_trigger = True

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)  # the recipe checks H, W divisible by 4
        from bdx_study.attacks._nets import UNetLite

        p: DynamicParams = params  # type: ignore[assignment]
        c = self.input_shape[0]
        self.pattern_gen: nn.Module = seeded_init(lambda: UNetLite(c, c, p.width), self.seed * 1000 + 5)
        self.mask_gen: nn.Module = seeded_init(lambda: UNetLite(c, 1, p.width), self.seed * 1000 + 6)
        self.pattern_gen.eval()
        self.mask_gen.eval()

    def pattern(self, x: Tensor) -> Tensor:
        """G(x) in [0, 1]."""
        return torch.sigmoid(self.pattern_gen(x))

    def mask(self, x: Tensor) -> Tensor:
        """M(x) in [0, 1], (N, 1, H, W), before the threshold."""
        return torch.sigmoid(self.mask_gen(x))

    def prepare(self, train: ImageData, context: AttackContext | None = None) -> None:
        p: DynamicParams = self.params  # type: ignore[assignment]
        device = (context or AttackContext()).device
        m = self.mask_gen.to(device).train()
        opt = torch.optim.Adam(m.parameters(), lr=p.generator_lr, betas=(0.5, 0.9))
        gen = self.generator(3)
        bs = min(64, len(train))
        for _ in range(p.mask_steps):
            x1 = train.images(torch.randint(0, len(train), (bs,), generator=gen)).to(device)
            x2 = train.images(torch.randint(0, len(train), (bs,), generator=gen)).to(device)
            m1, m2 = torch.sigmoid(m(x1)), torch.sigmoid(m(x2))
            loss = p.lambda_norm * F.relu(m1.mean() - p.mask_density) + p.lambda_div * diversity(x1, x2, m1, m2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.mask_gen = m.cpu().eval()
        for q in self.mask_gen.parameters():
            q.requires_grad_(False)
        self.prepared = True

    def training_hook(self) -> TrainingHook:
        return _DynamicHook(self)

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"pattern_gen.{k}": v.detach().cpu().clone() for k, v in self.pattern_gen.state_dict().items()}
        state.update({f"mask_gen.{k}": v.detach().cpu().clone() for k, v in self.mask_gen.state_dict().items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name, net in (("pattern_gen", self.pattern_gen), ("mask_gen", self.mask_gen)):
            net.load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})
            net.eval()
        self.prepared = True

    def apply_trigger(self, x: Tensor) -> Tensor:
        if not self.prepared:
            raise self.fail(
                "the generators are trained with the victim: load them with the victim "
                "(VictimRecord.load_attack()) or prepare() and train first"
            )
        with torch.no_grad():
            self.pattern_gen.to(x.device)
            self.mask_gen.to(x.device)
            out = torch.cat([c + (self.pattern(c) - c) * threshold(self.mask(c)) for c in x.split(512)] or [x.clone()])
        return out.clamp(0.0, 1.0)
