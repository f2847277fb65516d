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
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from bdx_study._config import Precision
from bdx_study._lazy import LazyModule

from ._base import PROBE_INPUTS, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import register_detector

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from torch import Tensor, nn

    from bdx_study.data import DatasetInfo, ImageData
else:
    torch = LazyModule("torch")


EXPERT, AUX = "expert", "auxiliary"
ScoreKind = Literal["ensemble", "expert", "auxiliary"]


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
    unlearn_lr_mode: Literal["fixed", "calibrated"] = fit_param(
        EXPERT,
        "fixed",
        description="fixed: unlearn_lr; calibrated: the smallest lr in unlearn_lr_range whose B falls to "
        "unlearn_target_acc on held-out clean data (a line search, no per-architecture lr)",
    )
    unlearn_lr_range: tuple[float, float] = fit_param(
        EXPERT, (1e-5, 1e-2), description="calibrated mode: the lrs searched (13 log-spaced points, bisected)"
    )
    unlearn_target_acc: float | None = fit_param(
        EXPERT,
        None,
        gt=0,
        le=1,
        description="calibrated mode: held-out clean accuracy B must fall to; null = 2 / classes (0.2 on 10: the "
        "paper's early-stop bound)",
    )
    unlearn_curve_points: int = fit_param(
        EXPERT,
        0,
        keyed_if_set=True,
        ge=0,
        le=1000,
        description=f"B's unlearning curve, a diagnostic: its clean accuracy and attack success on {PROBE_INPUTS} "
        f"clean and {PROBE_INPUTS} triggered selection inputs at the start, the end and every 1/N of its steps "
        "(logged per trial, plotted by analyze); 0 = off (on, it costs about a fifth of B's fit on the quickstart)",
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
    # How the finetuning arithmetic of B and the auxiliary model runs (see TrainingConfig: two independent knobs).
    # Both change the fitted weights, so they key both components' stages, but only when set:
    # stages cached before these parameters existed were fitted in fp32, contiguous layout.
    precision: Precision = fit_param(
        (EXPERT, AUX),
        "fp32",
        keyed_if_set=True,
        description="finetuning of B and M': fp32, or bf16 (forward pass and loss under bf16 autocast)",
    )
    channels_last: bool = fit_param(
        (EXPERT, AUX),
        False,
        keyed_if_set=True,
        description="finetuning of B and M': weights and batches in channels_last layout",
    )
    score_kind: ScoreKind = Field("ensemble", description="which score flags inputs (paper: ensemble)")
    ensemble_alpha: float = Field(2.0, gt=0, le=1e6, description="ensemble weight alpha (paper: 2 for ResNet-18)")
    ensemble_beta: float = Field(0.5, gt=0, le=1, description="ensemble weight beta (paper: 0.5 for ResNet-18)")

    @model_validator(mode="after")
    def _lr_range(self) -> BaDExpertParams:
        lo, hi = self.unlearn_lr_range
        if not 0 < lo < hi <= 10:
            raise ValueError(f"unlearn_lr_range must be 0 < low < high <= 10, got {list(self.unlearn_lr_range)}")
        return self

    @model_validator(mode="after")
    def _milestones_sorted(self) -> BaDExpertParams:
        for name in ("aux_milestones", "unlearn_milestones"):
            m = list(getattr(self, name))
            if m != sorted(set(m)) or any(e < 1 for e in m):
                raise ValueError(f"{name} must be increasing epochs >= 1, got {m}")
        return self


SCORE_EPS = 1e-8


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


CALIBRATION_GRID = 13  # lrs of the self-calibrating expert's range (x1.78 apart over 3 decades): ~4 fits


def _accuracy(net: nn.Module, data: ImageData, device: torch.device) -> float:
    """Share of ``data`` that ``net`` classifies as labelled (nan when empty)."""
    from bdx_study.training import predict_proba

    if not len(data):
        return float("nan")
    return float((predict_proba(net, data.x, device=device).argmax(1) == data.y).float().mean())


class _UnlearningCurve:
    """B's accuracy on the clean and triggered probe inputs at the steps it is recorded at (a
    diagnostic only; nothing recorded without a probe)."""

    def __init__(self, expert: nn.Module, probe: tuple[ImageData, ImageData] | None, device: torch.device) -> None:
        self.expert, self.probe, self.device = expert, probe, device
        self.points: dict[str, list[float]] = {"step": [], "clean_acc": [], "attack_success": []}

    def record(self, step: int) -> None:
        from bdx_study.training import predict_proba

        if self.probe is None:
            return
        clean, triggered = self.probe  # both parts in one forward pass
        x, y = torch.cat([clean.x, triggered.x]), torch.cat([clean.y, triggered.y])
        right = predict_proba(self.expert, x, device=self.device).argmax(1) == y
        self.points["step"].append(float(step))
        for name, r in (("clean_acc", right[: len(clean)]), ("attack_success", right[len(clean) :])):
            self.points[name].append(float(r.float().mean()) if len(r) else float("nan"))


def _early_stop(
    expert: nn.Module, p: BaDExpertParams, holdout: ImageData | None, device: torch.device, per_epoch: int
) -> Callable[[int], bool]:
    """After ``taken`` steps: whether B's held-out clean accuracy is below ``unlearn_early_stop_acc``,
    checked every step or at the end of every epoch (never without a bound or held-out data)."""
    bound = p.unlearn_early_stop_acc
    if bound is None or holdout is None or not len(holdout):
        return lambda taken: False
    check_every = per_epoch if p.unlearn_early_stop_every == "epoch" else 1
    return lambda taken: taken % check_every == 0 and _accuracy(expert, holdout, device) < bound


def finetune_expert(
    model: nn.Module,
    finetune: ImageData,
    p: BaDExpertParams,
    num_classes: int,
    *,
    augment: DatasetInfo | None,
    holdout: ImageData | None,
    device: torch.device,
    probe: tuple[ImageData, ImageData] | None = None,
    lr: float | None = None,
) -> tuple[nn.Module, int, dict[str, list[float]]]:
    """The backdoor expert B: a copy of ``model`` finetuned towards (y + 1) mod C with Adam at
    ``lr`` (default: unlearn_lr). Returns (B, steps, its unlearning curve). The curve records B's
    accuracy on the clean and triggered ``probe`` inputs (a diagnostic only) at up to
    ``unlearn_curve_points`` steps (none when 0); it never decides anything."""
    from bdx_study.data import ImageData
    from bdx_study.training import fit

    expert = copy.deepcopy(model).to(device)
    opt = torch.optim.Adam(expert.parameters(), lr=p.unlearn_lr if lr is None else lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(p.unlearn_milestones), 0.1) if p.unlearn_milestones else None
    per_epoch = math.ceil(len(finetune) / p.unlearn_batch_size)
    total = min(p.unlearn_epochs * per_epoch, p.unlearn_steps or 10**12)
    every = max(1, math.ceil(total / max(1, p.unlearn_curve_points)))
    curve = _UnlearningCurve(expert, probe if p.unlearn_curve_points else None, device)
    stop_after = _early_stop(expert, p, holdout, device, per_epoch)
    taken = 0

    def after_step() -> bool:
        nonlocal taken
        taken += 1
        if taken % every == 0 or taken == total:
            curve.record(taken)
        return stop_after(taken)

    curve.record(0)
    steps = fit(
        expert,
        ImageData(finetune.x, shifted_labels(finetune.y, num_classes)),
        opt,
        epochs=p.unlearn_epochs,
        max_steps=p.unlearn_steps,
        batch_size=p.unlearn_batch_size,
        gen=torch.Generator().manual_seed(p.seed),
        augment=augment,
        scheduler=sched,
        stop=after_step,
        device=device,
        precision=p.precision,
        channels_last=p.channels_last,
    )
    if curve.points["step"] and curve.points["step"][-1] != steps:
        curve.record(steps)
    return expert.eval(), steps, curve.points


def calibrated_expert(
    model: nn.Module,
    finetune: ImageData,
    p: BaDExpertParams,
    num_classes: int,
    *,
    augment: DatasetInfo | None,
    holdout: ImageData,
    device: torch.device,
    probe: tuple[ImageData, ImageData] | None = None,
) -> tuple[nn.Module, int, dict[str, list[float]], dict[str, Any]]:
    """The self-calibrating expert: bisect 13 log-spaced lrs of ``unlearn_lr_range`` for the
    smallest whose B's clean accuracy on ``holdout`` (defender data, disjoint from everything
    scored) falls to the target; the largest when none does. Assumes accuracy falls as lr grows."""
    if not len(holdout):
        raise ValueError("the calibrated expert needs held-out clean data (the calibration part is empty)")
    target = p.unlearn_target_acc if p.unlearn_target_acc is not None else 2.0 / num_classes
    lo, hi = p.unlearn_lr_range
    grid = [float(v) for v in torch.logspace(math.log10(lo), math.log10(hi), CALIBRATION_GRID, dtype=torch.float64)]
    tried: dict[int, tuple[nn.Module, int, dict[str, list[float]], float]] = {}

    def run(i: int) -> float:
        if i not in tried:
            b, steps, curve = finetune_expert(
                model, finetune, p, num_classes, augment=augment, holdout=None, device=device, probe=probe, lr=grid[i]
            )
            tried[i] = (b, steps, curve, _accuracy(b, holdout, device))
        return tried[i][3]

    left, right = 0, len(grid) - 1
    if run(right) > target:
        chosen = right  # even the largest lr leaves B accurate: take it, and say so
    else:
        while left < right:  # the smallest i with acc(i) <= target
            mid = (left + right) // 2
            if run(mid) <= target:
                right = mid
            else:
                left = mid + 1
        chosen = left
    b, steps, curve, acc = tried[chosen]
    meta = {
        "calibrated_lr": grid[chosen],
        "calibrated_holdout_acc": acc,
        "calibrated_target_acc": target,
        "calibrated_reached": acc <= target,
        "calibration_tries": {f"{grid[i]:.3g}": tried[i][3] for i in sorted(tried)},
    }
    return b, steps, curve, meta


def finetune_auxiliary(
    model: nn.Module, finetune: ImageData, p: BaDExpertParams, *, augment: DatasetInfo | None, device: torch.device
) -> nn.Module:
    """The auxiliary model M': a copy of ``model`` finetuned on correct labels with SGD Nesterov."""
    from bdx_study.training import fit

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
        precision=p.precision,
        channels_last=p.channels_last,
    )
    return aux.eval()


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------ the family


@register_detector("badexpert")
class BaDExpert(DetectorFamily[BaDExpertParams]):
    """Backdoor expert + auxiliary model + ensemble score (white-box finetuning on clean data)."""

    Params = BaDExpertParams
    components = (EXPERT, AUX)
    extra_columns = ("expert_conf", "aux_conf")
    diagnostics = ("expert_clean_acc", "expert_attack_success")
    access = "white-box: finetunes copies of the model on the defender's clean data; 3 forwards per input"
    detects = frozenset({"patch", "blend"})

    def __init__(self, params: DetectorParams) -> None:
        super().__init__(params)
        self._nets: dict[str, tuple[Fitted, nn.Module]] = {}  # component -> (its state, its network)

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        augment = ctx.info if self.params.augment else None
        if component == EXPERT:
            args = (ctx.model, ctx.clean, self.params, ctx.info.num_classes)
            if self.params.unlearn_lr_mode == "calibrated":
                expert, steps, curve, meta = calibrated_expert(
                    *args, augment=augment, holdout=ctx.holdout, device=ctx.device, probe=ctx.probe
                )
            else:
                expert, steps, curve = finetune_expert(
                    *args, augment=augment, holdout=ctx.holdout, device=ctx.device, probe=ctx.probe
                )
                meta = {}
            return Fitted(
                _state(expert), {"expert_steps": steps, **meta, **({"curve": curve} if curve["step"] else {})}
            )
        aux = finetune_auxiliary(ctx.model, ctx.clean, self.params, augment=augment, device=ctx.device)
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
        from bdx_study.training import predict_proba

        probs = predict_proba(self._network(component, fitted, model, device), x, device=device)
        return {"expert_probs" if component == EXPERT else "aux_probs": probs}

    def _confidences(self, feats: Mapping[str, Tensor], pred: Tensor) -> tuple[Tensor, Tensor]:
        return _in_pred(feats["expert_probs"], pred), _in_pred(feats["aux_probs"], pred)

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        b, m = self._confidences(feats, pred)
        return badexpert_score(b, m, self.params.score_kind, self.params.ensemble_alpha, self.params.ensemble_beta)

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
        z = badexpert_score(
            bb, mm, self.params.score_kind, self.params.ensemble_alpha, self.params.ensemble_beta
        ).numpy()
        if np.isfinite(threshold) and z.min() < threshold < z.max():
            ax.contour(grid.numpy(), grid.numpy(), z, levels=[threshold], colors="k", linewidths=1)
        ax.set_xlabel("expert confidence b")
        ax.set_ylabel("auxiliary confidence m")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        return True
