"""BaDExpert (Xie et al., ICLR 2024), per ../shared/reference/badexpert.md.

Components:
- ``expert``, the backdoor expert B: a copy of the model M finetuned with Adam on the defender's
  clean finetune data with deliberately wrong labels (y + 1) mod C, so that it forgets the task
  and keeps the backdoor; optionally stopped once its accuracy on held-out clean data (the
  calibration part of D_c, disjoint from everything scored) falls below a bound;
- ``auxiliary``, M': a copy of M finetuned with correct labels, aggressively (SGD Nesterov, a
  large first lr, x0.1 at milestones), which weakens the backdoor.

Score, for y_hat = argmax M(x), b = softmax(B(x))[y_hat], m = softmax(M'(x))[y_hat] (higher =
more suspicious): ``expert``: b; ``auxiliary``: -m; ``ensemble`` (the paper's "triangle"):
-min(alpha * m / max(b, eps), (1 - b) / max(beta - m, eps)). M itself is never modified.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from bdx_study.data import DatasetInfo, ImageData
from bdx_study.training import fit, predict_proba

from . import register_detector
from ._base import DetectorFamily, DetectorParams, FitContext, Fitted, fit_param

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ScoreKind = Literal["ensemble", "expert", "auxiliary"]
SCORE_EPS = 1e-8
EXPERT, AUX = "expert", "auxiliary"


class BaDExpertParams(DetectorParams):
    """BaDExpert's hyperparameters. Defaults: the paper's CIFAR-10 ResNet-18 values."""

    unlearn_lr: float = fit_param(EXPERT, 1e-4, gt=0, le=10, description="Adam lr of the backdoor expert (paper: 1e-4)")
    unlearn_epochs: int = fit_param(EXPERT, 1, ge=1, description="epochs of mislabeled finetuning (paper: 1)")
    unlearn_steps: int | None = fit_param(
        EXPERT,
        None,
        ge=1,
        description="cap on the expert's optimizer steps (ends finetuning early); null = epochs only",
    )
    unlearn_batch_size: int = fit_param(
        EXPERT, 128, ge=1, description="batch size of the expert's finetuning (paper: 128)"
    )
    unlearn_early_stop_acc: float | None = fit_param(
        EXPERT, None, gt=0, le=1, description="stop B once its held-out clean accuracy < this (paper: 0.2); null = off"
    )
    unlearn_early_stop_every: Literal["step", "epoch"] = fit_param(
        EXPERT, "step", description="when the early stop is checked: after every step, or per epoch (the reference)"
    )
    unlearn_milestones: tuple[int, ...] = fit_param(
        EXPERT, (), description="epochs after which B's lr x0.1 (the reference: [1] for ResNet-18 when epochs > 1)"
    )
    aux_lr: float = fit_param(AUX, 0.1, gt=0, le=10, description="first SGD lr of M' (paper: 0.1, deliberately large)")
    aux_epochs: int = fit_param(AUX, 10, ge=1, description="epochs of the auxiliary model's finetuning (paper: 10)")
    aux_milestones: tuple[int, ...] = fit_param(AUX, (2, 4, 6, 8), description="epochs at which the auxiliary lr x0.1")
    aux_batch_size: int = fit_param(AUX, 64, ge=1, description="batch size of the auxiliary finetuning (paper: 64)")
    aux_momentum: float = fit_param(AUX, 0.9, ge=0, lt=1, description="Nesterov momentum of the auxiliary SGD")
    aux_weight_decay: float = fit_param(AUX, 1e-4, ge=0, le=1, description="weight decay of the auxiliary SGD")
    augment: bool = fit_param(
        (EXPERT, AUX), True, description="training augmentation while finetuning B and M' (paper: on)"
    )
    score_kind: ScoreKind = Field("ensemble", description="which score flags inputs (paper: ensemble)")
    ensemble_alpha: float = Field(2.0, gt=0, le=1e6, description="ensemble weight alpha (paper: 2 for ResNet-18)")
    ensemble_beta: float = Field(0.5, gt=0, le=1, description="ensemble weight beta (paper: 0.5 for ResNet-18)")

    @model_validator(mode="after")
    def _milestones_sorted(self) -> BaDExpertParams:
        for name in ("aux_milestones", "unlearn_milestones"):
            m = list(getattr(self, name))
            if m != sorted(set(m)) or any(e < 1 for e in m):
                raise ValueError(f"{name} must be increasing epochs >= 1, got {m}")
        return self


# ------------------------------------------------------------------------------------ pure maths


def badexpert_score(b: Tensor, m: Tensor, kind: ScoreKind, alpha: float, beta: float, eps: float = SCORE_EPS) -> Tensor:
    """Suspicion score from the expert's confidence ``b`` and the auxiliary model's confidence
    ``m`` in M's predicted class (both in [0, 1]); higher = more suspicious."""
    if kind == "expert":
        return b.clone()
    if kind == "auxiliary":
        return -m
    if kind == "ensemble":
        left = alpha * m / b.clamp_min(eps)
        right = (1.0 - b) / (beta - m).clamp_min(eps)
        return -torch.minimum(left, right)
    raise ValueError(f"unknown score kind {kind!r}; known: ensemble, expert, auxiliary")


def shifted_labels(y: Tensor, num_classes: int) -> Tensor:
    """The backdoor expert's deliberately wrong labels: (y + 1) mod C."""
    return (y + 1) % num_classes


def _in_pred(probs: Tensor, pred: Tensor) -> Tensor:
    return probs.gather(1, pred[:, None].long()).squeeze(1)


# ------------------------------------------------------------------------------------ finetuning


def finetune_expert(
    model: nn.Module,
    finetune: ImageData,
    p: BaDExpertParams,
    num_classes: int,
    *,
    augment: DatasetInfo | None,
    holdout: ImageData | None,
    device: torch.device,
) -> tuple[nn.Module, int]:
    """The backdoor expert B: a copy of ``model`` finetuned towards (y + 1) mod C. Returns (B, steps)."""
    expert = copy.deepcopy(model).to(device)
    opt = torch.optim.Adam(expert.parameters(), lr=p.unlearn_lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(p.unlearn_milestones), 0.1) if p.unlearn_milestones else None
    gen = torch.Generator().manual_seed(p.seed)
    stop = None
    if p.unlearn_early_stop_acc is not None and holdout is not None and len(holdout):
        bound = p.unlearn_early_stop_acc
        per_epoch = math.ceil(len(finetune) / p.unlearn_batch_size) if p.unlearn_early_stop_every == "epoch" else 1
        taken = 0

        def stop() -> bool:
            nonlocal taken
            taken += 1
            if taken % per_epoch:
                return False
            pred = predict_proba(expert, holdout.x, device=device).argmax(1)
            return float((pred == holdout.y).float().mean()) < bound

    steps = fit(
        expert,
        ImageData(finetune.x, shifted_labels(finetune.y, num_classes)),
        opt,
        epochs=p.unlearn_epochs,
        max_steps=p.unlearn_steps,
        batch_size=p.unlearn_batch_size,
        gen=gen,
        augment=augment,
        scheduler=sched,
        stop=stop,
        device=device,
    )
    return expert.eval(), steps


def finetune_auxiliary(
    model: nn.Module, finetune: ImageData, p: BaDExpertParams, *, augment: DatasetInfo | None, device: torch.device
) -> nn.Module:
    """The auxiliary model M': a copy of ``model`` finetuned on correct labels with SGD Nesterov."""
    aux = copy.deepcopy(model).to(device)
    opt = torch.optim.SGD(
        aux.parameters(),
        lr=p.aux_lr,
        momentum=p.aux_momentum,
        weight_decay=p.aux_weight_decay,
        nesterov=p.aux_momentum > 0,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(p.aux_milestones), 0.1)
    gen = torch.Generator().manual_seed(p.seed + 1)
    fit(
        aux,
        finetune,
        opt,
        epochs=p.aux_epochs,
        batch_size=p.aux_batch_size,
        gen=gen,
        augment=augment,
        scheduler=sched,
        device=device,
    )
    return aux.eval()


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------ the family


@register_detector("badexpert")
class BaDExpert(DetectorFamily):
    """Backdoor expert + auxiliary model + ensemble score (white-box finetuning on clean data)."""

    Params = BaDExpertParams
    components = (EXPERT, AUX)
    extra_columns = ("expert_conf", "aux_conf")
    diagnostics = ("expert_clean_acc", "expert_attack_success")
    access = "white-box: finetunes copies of the model on the defender's clean data; 3 forwards per input"
    detects = frozenset({"patch", "blend"})

    def __init__(self, params: DetectorParams) -> None:
        super().__init__(params)
        self.p: BaDExpertParams = params  # type: ignore[assignment]
        self._nets: dict[str, tuple[Fitted, nn.Module]] = {}  # component -> (its state, its network)

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        augment = ctx.info if self.p.augment else None
        if component == EXPERT:
            expert, steps = finetune_expert(
                ctx.model,
                ctx.clean,
                self.p,
                ctx.info.num_classes,
                augment=augment,
                holdout=ctx.holdout,
                device=ctx.device,
            )
            return Fitted(_state(expert), {"expert_steps": steps})
        aux = finetune_auxiliary(ctx.model, ctx.clean, self.p, augment=augment, device=ctx.device)
        return Fitted(_state(aux), {})

    def _network(self, component: str, fitted: Fitted, model: nn.Module, device: torch.device) -> nn.Module:
        """B or M' rebuilt from its state (once per fitted state, not per batch)."""
        held = self._nets.get(component)
        if held is None or held[0] is not fitted:
            net = copy.deepcopy(model)
            net.load_state_dict(fitted.tensors)
            held = (fitted, net.to(device).eval())
            self._nets[component] = held
        return held[1]

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        probs = predict_proba(self._network(component, fitted, model, device), x, device=device)
        return {"expert_probs" if component == EXPERT else "aux_probs": probs}

    def _confidences(self, feats: Mapping[str, Tensor], pred: Tensor) -> tuple[Tensor, Tensor]:
        return _in_pred(feats["expert_probs"], pred), _in_pred(feats["aux_probs"], pred)

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        b, m = self._confidences(feats, pred)
        return badexpert_score(b, m, self.p.score_kind, self.p.ensemble_alpha, self.p.ensemble_beta)

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        b, m = self._confidences(feats, pred)
        return {"expert_conf": b, "aux_conf": m}

    def diagnose(
        self, clean: Mapping[str, Tensor], clean_label: Tensor, triggered: Mapping[str, Tensor], attack_label: Tensor
    ) -> dict[str, float]:
        """B should have forgotten the task (low clean accuracy) and kept the backdoor (high attack
        success)."""

        def hit(probs: Tensor, y: Tensor) -> float:
            return float((probs.argmax(1) == y).float().mean()) if len(y) else float("nan")

        return {
            "expert_clean_acc": hit(clean["expert_probs"], clean_label),
            "expert_attack_success": hit(triggered["expert_probs"], attack_label),
        }

    def plot_panel(self, ax: Axes, samples: Mapping[str, Any], threshold: float) -> bool:
        """The (b, m) plane: clean and triggered inputs with the decision boundary score =
        threshold (inputs on the high-score side, the lower-right corner, are flagged)."""
        for triggered, color, label in ((False, "tab:blue", "clean"), (True, "tab:red", "triggered")):
            sel = samples["triggered"] == triggered
            ax.scatter(samples["expert_conf"][sel], samples["aux_conf"][sel], s=4, alpha=0.5, c=color, label=label)
        grid = torch.linspace(0, 1, 101)
        bb, mm = torch.meshgrid(grid, grid, indexing="xy")
        z = badexpert_score(bb, mm, self.p.score_kind, self.p.ensemble_alpha, self.p.ensemble_beta).numpy()
        if np.isfinite(threshold) and z.min() < threshold < z.max():
            ax.contour(grid.numpy(), grid.numpy(), z, levels=[threshold], colors="k", linewidths=1)
        ax.set_xlabel("expert confidence b")
        ax.set_ylabel("auxiliary confidence m")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        return True
