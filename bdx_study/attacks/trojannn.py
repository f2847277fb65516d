"""TrojanNN (Liu et al., NDSS'18): a trigger optimized to fire selected neurons, then retraining."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pydantic import Field

from bdx_study._lazy import LazyModule
from bdx_study.attacks._base import (
    AttackParams,
    AttackRecipe,
    HookBatch,
    TrainingControlledAttack,
    TrainingHook,
    batch_counts,
)
from bdx_study.attacks._registry import register_attack
from bdx_study.attacks._triggers import patch_blend, place
from bdx_study.attacks.patch import trojan_size

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
else:
    torch = LazyModule("torch")


class TrojanNNRecipe(AttackRecipe):
    """The trigger square at the trojan square's place (``null`` side: H / 4, at least 2;
    ``null`` margin: 3 H / 32), which must fit the input."""

    params: TrojanNNParams

    def resolve(self) -> None:
        super().resolve()
        p = self.params
        _, h, w = self.input_shape
        s, m = trojan_size(h, p.patch_size, p.margin)
        if s + m > min(h, w):
            raise self.fail(f"patch_size {s} + margin {m} exceeds the {h}x{w} input")
        self.side, self.top, self.left = s, h - m - s, w - m - s


class TrojanNNParams(AttackParams):
    reference_rates = {32: 0.1}
    Recipe = TrojanNNRecipe

    neurons: int = Field(2, ge=1, description="penultimate neurons the trigger is optimized for (paper: 2)")
    activation_target: float = Field(100.0, gt=0.0, description="value the selected |activations| are pushed to")
    trigger_steps: int = Field(1000, ge=1, description="Adam steps of the trigger (toolbox: 1,000 at lr 0.1)")
    trigger_lr: float = Field(0.1, gt=0.0, description="Adam lr of the trigger, cosine-annealed")
    retrain_epochs: int = Field(1, ge=1, description="last epochs of victim training spent retraining (toolbox: 1)")
    patch_size: int | None = Field(None, ge=1, description="side of the trigger square; null = H / 4 (8 at 32x32)")
    margin: int | None = Field(None, ge=0, description="pixels from the bottom-right corner; null = 3 H / 32")


def select_neurons(head: nn.Linear, k: int) -> Tensor:
    """The ``k`` input units of ``head`` with the largest summed |weight| (the toolbox's choice)."""
    return head.weight.detach().abs().sum(dim=0).topk(min(k, head.in_features)).indices.sort().values


def optimize_trigger(
    model: nn.Module, mask: Tensor, neurons: Tensor, *, value: float, steps: int, lr: float, init: Tensor
) -> Tensor:
    """Pixels inside ``mask`` on an all-zero image, parameterised as (tanh(a) + 1) / 2 and
    optimized with Adam (cosine-annealed lr) so that the selected penultimate |activations| reach
    ``value`` (sum of squared errors). Returns the trigger (C, H, W), zero outside the mask."""
    from bdx_study.archs import penultimate_layer

    head = penultimate_layer(model)
    captured: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0]))
    was_training = model.training
    model.eval()
    device = mask.device
    a = init.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([a], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    try:
        for _ in range(steps):
            captured.clear()
            model(((torch.tanh(a) + 1) / 2 * mask)[None])
            act = captured[0][0, neurons.to(device)]
            loss = ((act.abs() - value) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        handle.remove()
        model.train(was_training)
        opt.zero_grad(set_to_none=True)
    return ((torch.tanh(a.detach()) + 1) / 2 * mask).cpu()


class _TrojanNNHook(TrainingHook):
    def __init__(self, attack: TrojanNN) -> None:
        self.attack = attack
        self.retraining = False

    def start_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:
        a = self.attack
        first_retrain = max(0, epochs - a.params.retrain_epochs)  # type: ignore[attr-defined]
        if epoch == first_retrain and not self.retraining:
            for p in model.parameters():
                p.grad = None
            a.fit_trigger(model)
            self.retraining = True

    def batch(self, x: Tensor, y: Tensor, idx: Tensor, gen: torch.Generator) -> HookBatch:
        if not self.retraining:
            return HookBatch(x, y)
        a = self.attack
        n_bd, _ = batch_counts(len(x), a.poison_rate)
        if n_bd == 0:
            return HookBatch(x, y)
        x, y = x.clone(), y.clone()
        x[:n_bd] = a.apply_trigger(x[:n_bd])
        y[:n_bd] = a.target
        return HookBatch(x, y, n_poison=n_bd)


@register_attack("trojannn")
class TrojanNN(TrainingControlledAttack):
    """TrojanNN: the victim first trains clean (all but the last ``retrain_epochs`` epochs); then
    the ``neurons`` penultimate units with the largest summed |weight| into the final linear
    layer are selected, and the pixels of a square mask (the trojan-square location) on an
    all-zero image are optimized (tanh parameterization, Adam lr 0.1 cosine-annealed, 1,000
    steps) so that those units' |activations| reach 100; the model is then retrained on batches
    whose first ``int(B * poison_rate)`` images carry the trigger (alpha 1, full mask) and the
    target label. The retraining uses the victim's own optimizer (the toolbox uses SGD 0.01).

    Adaptation: the mask is 8x8 at rows/columns 21-28 (32x32), 7x7 at 19-25 (28x28), 4x4 at
    11-14 (16x16). Rate per retraining batch: 0.1 (toolbox) at every size. The optimization
    starts from seeded a ~ N(0, 1), so the trigger depends on the seed and the clean model."""

    Params = TrojanNNParams
    quick_params = {"trigger_steps": 3}
    random_trigger = True
    recipe: TrojanNNRecipe

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        super().__init__(params, input_shape, num_classes, seed)
        r = self.recipe
        _, self.mask = place(self.input_shape, torch.zeros(r.side, r.side), r.top, r.left)
        self.init = torch.randn(self.input_shape, generator=self.generator(2))
        self.trigger: Tensor | None = None

    def fit_trigger(self, model: nn.Module) -> None:
        """Optimize the trigger against ``model`` (its current weights; the model is unchanged)."""
        from bdx_study.archs import penultimate_layer

        p: TrojanNNParams = self.params  # type: ignore[assignment]
        device = next(model.parameters()).device
        neurons = select_neurons(penultimate_layer(model), p.neurons)
        flags = [q.requires_grad for q in model.parameters()]
        for q in model.parameters():
            q.requires_grad_(False)
        try:
            self.trigger = optimize_trigger(
                model, self.mask.to(device), neurons, value=p.activation_target, steps=p.trigger_steps,
                lr=p.trigger_lr, init=self.init,
            )  # fmt: skip
        finally:
            for q, flag in zip(model.parameters(), flags, strict=True):
                q.requires_grad_(flag)
        self.prepared = True

    def training_hook(self) -> TrainingHook:
        return _TrojanNNHook(self)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self.trigger is None else {"trigger": self.trigger.clone()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.trigger = state["trigger"].clone()

    def apply_trigger(self, x: Tensor) -> Tensor:
        if self.trigger is None:
            raise self.fail(
                "the trigger is optimized against the victim during training: load it with the victim "
                "(VictimRecord.load_attack()) or fit_trigger(model) first"
            )
        return patch_blend(x, self.trigger.to(x), self.mask.to(x), 1.0)
