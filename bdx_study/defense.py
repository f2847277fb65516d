"""BaDExpert (Xie et al., ICLR 2024), per ../shared/reference/badexpert.md.

1. Backdoor expert B: a copy of the model M finetuned with Adam on the defender's clean
   finetune part with deliberately wrong labels (y + 1) mod C, so it forgets the task and keeps
   the backdoor; optional early stop once its accuracy on held-out clean data falls below a
   bound. The held-out data is the calibration part of D_c (disjoint from the finetune part and
   from all selection and evaluation data); it then only decides when B stops.
2. Auxiliary model M': a copy of M finetuned with correct labels, aggressively (SGD Nesterov,
   large first lr, x0.1 at milestones), which weakens the backdoor.
3. Score, for y_hat = argmax M(x), b = softmax(B(x))[y_hat], m = softmax(M'(x))[y_hat]
   (higher = more suspicious): ``expert``: b; ``auxiliary``: -m; ``ensemble`` (default):
   -min(alpha * m / max(b, eps), (1 - b) / max(beta - m, eps)).
4. Threshold tau: the (1 - target_fpr) quantile of scores on clean calibration inputs that M
   classifies correctly; flag iff score > tau. Calibration never sees evaluation data.
M itself is never modified.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from bdx_study.attacks import Attack
from bdx_study.data import DatasetInfo, ImageData, Splits, defender_split
from bdx_study.metrics import detection_metrics, fit_threshold
from bdx_study.training import fit, predict_proba

ScoreKind = Literal["ensemble", "expert", "auxiliary"]
SCORE_EPS = 1e-8


class DefenseConfig(BaseModel):
    """BaDExpert's hyperparameters. Field names are the names used in YAML, MLflow and Parquet.
    Defaults: the paper's CIFAR-10 ResNet-18 values, except where noted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clean_set_size: int = Field(300, ge=2, description="|D_c| reserved clean images (paper: 2,000 on CIFAR-10)")
    calibration_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of D_c held out to calibrate the threshold (and to early-stop B)"
    )
    unlearn_lr: float = Field(1e-4, gt=0, description="Adam lr of the backdoor expert (paper: 1e-4 ResNet-18)")
    unlearn_epochs: int = Field(1, ge=1, description="epochs of mislabeled finetuning (paper: 1)")
    unlearn_steps: int | None = Field(
        None, ge=1, description="cap on the expert's optimizer steps (ends finetuning early); null = epochs only"
    )
    unlearn_batch_size: int = Field(128, ge=1, description="batch size of the expert's finetuning (paper: 128)")
    unlearn_early_stop_acc: float | None = Field(
        None, gt=0, le=1, description="stop B once its held-out clean accuracy < this (paper: 0.2); null = off"
    )
    aux_lr: float = Field(0.1, gt=0, description="first SGD lr of the auxiliary model (paper: 0.1, deliberately large)")
    aux_epochs: int = Field(10, ge=1, description="epochs of the auxiliary model's finetuning (paper: 10)")
    aux_milestones: tuple[int, ...] = Field((2, 4, 6, 8), description="epochs at which the auxiliary lr x0.1")
    aux_batch_size: int = Field(64, ge=1, description="batch size of the auxiliary finetuning (paper: 64)")
    aux_momentum: float = Field(0.9, ge=0, lt=1, description="Nesterov momentum of the auxiliary SGD")
    aux_weight_decay: float = Field(1e-4, ge=0, description="weight decay of the auxiliary SGD")
    augment: bool = Field(True, description="training augmentation while finetuning B and M' (paper: on)")
    score_kind: ScoreKind = Field("ensemble", description="which score flags inputs")
    ensemble_alpha: float = Field(2.0, gt=0, description="ensemble weight alpha (paper: 2 for ResNet-18)")
    ensemble_beta: float = Field(0.5, gt=0, le=1, description="ensemble weight beta (paper: 0.5 for ResNet-18)")
    target_fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate the threshold targets (paper: 1%)")
    finetune_seed: int = Field(0, description="seed of the finetuning order and augmentation of B and M'")

    def to_row(self) -> dict[str, Any]:
        """Table cells (Parquet, MLflow params): lists become JSON text, e.g. "[2, 4, 6, 8]"."""
        return {k: json.dumps(list(v)) if isinstance(v, tuple) else v for k, v in self.model_dump().items()}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DefenseConfig:
        """Inverse of :meth:`to_row` for a table row (extra columns ignored; NaN cells = null)."""
        vals: dict[str, Any] = {}
        for k in cls.model_fields:
            if k not in row:
                continue
            v = row[k]
            if hasattr(v, "item"):
                v = v.item()
            if isinstance(v, float) and math.isnan(v):
                v = None
            elif isinstance(v, str) and v.startswith("["):
                v = json.loads(v)
            vals[k] = v
        return cls.model_validate(vals)

    @model_validator(mode="after")
    def _milestones_sorted(self) -> DefenseConfig:
        if list(self.aux_milestones) != sorted(self.aux_milestones) or any(m < 1 for m in self.aux_milestones):
            raise ValueError(f"aux_milestones must be increasing epochs >= 1, got {list(self.aux_milestones)}")
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


# ------------------------------------------------------------------------------------ finetuning


def finetune_expert(
    model: nn.Module,
    finetune: ImageData,
    cfg: DefenseConfig,
    num_classes: int,
    *,
    augment: DatasetInfo | None,
    holdout: ImageData | None,
    device: torch.device,
) -> tuple[nn.Module, int]:
    """The backdoor expert B: a copy of ``model`` finetuned towards (y + 1) mod C. Returns (B, steps)."""
    expert = copy.deepcopy(model).to(device)
    opt = torch.optim.Adam(expert.parameters(), lr=cfg.unlearn_lr)
    gen = torch.Generator().manual_seed(cfg.finetune_seed)
    stop = None
    if cfg.unlearn_early_stop_acc is not None and holdout is not None and len(holdout):
        bound = cfg.unlearn_early_stop_acc

        def stop() -> bool:
            pred = predict_proba(expert, holdout.x, device=device).argmax(1)
            return float((pred == holdout.y).float().mean()) < bound

    steps = fit(
        expert,
        ImageData(finetune.x, shifted_labels(finetune.y, num_classes)),
        opt,
        epochs=cfg.unlearn_epochs,
        max_steps=cfg.unlearn_steps,
        batch_size=cfg.unlearn_batch_size,
        gen=gen,
        augment=augment,
        stop=stop,
        device=device,
    )
    return expert.eval(), steps


def finetune_auxiliary(
    model: nn.Module, finetune: ImageData, cfg: DefenseConfig, *, augment: DatasetInfo | None, device: torch.device
) -> nn.Module:
    """The auxiliary model M': a copy of ``model`` finetuned on correct labels with SGD Nesterov."""
    aux = copy.deepcopy(model).to(device)
    opt = torch.optim.SGD(
        aux.parameters(),
        lr=cfg.aux_lr,
        momentum=cfg.aux_momentum,
        weight_decay=cfg.aux_weight_decay,
        nesterov=cfg.aux_momentum > 0,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.aux_milestones), 0.1)
    gen = torch.Generator().manual_seed(cfg.finetune_seed + 1)
    fit(
        aux,
        finetune,
        opt,
        epochs=cfg.aux_epochs,
        batch_size=cfg.aux_batch_size,
        gen=gen,
        augment=augment,
        scheduler=sched,
        device=device,
    )
    return aux.eval()


# ------------------------------------------------------------------------------------ detector


@dataclass
class Confidences:
    """Per-input quantities the score is made of (CPU tensors)."""

    pred: Tensor  # argmax M(x)
    expert_conf: Tensor  # b = softmax(B(x))[pred]
    aux_conf: Tensor  # m = softmax(M'(x))[pred]
    expert_pred: Tensor  # argmax B(x), for the expert's own diagnostics


@dataclass
class BaDExpert:
    """A fitted detector: the original model, expert, auxiliary model and calibrated threshold."""

    model: nn.Module
    expert: nn.Module
    auxiliary: nn.Module
    cfg: DefenseConfig
    threshold: float = float("nan")

    @torch.no_grad()
    def confidences(self, x: Tensor, device: torch.device | None = None) -> Confidences:
        pred = predict_proba(self.model, x, device=device).argmax(1)
        pb = predict_proba(self.expert, x, device=device)
        m = predict_proba(self.auxiliary, x, device=device).gather(1, pred[:, None]).squeeze(1)
        return Confidences(pred, pb.gather(1, pred[:, None]).squeeze(1), m, pb.argmax(1))

    def scores(self, conf: Confidences) -> Tensor:
        c = self.cfg
        return badexpert_score(conf.expert_conf, conf.aux_conf, c.score_kind, c.ensemble_alpha, c.ensemble_beta)

    def calibrate(self, calibration: ImageData, device: torch.device | None = None) -> float:
        """Fit tau on clean calibration inputs that M classifies correctly."""
        conf = self.confidences(calibration.x, device)
        s = self.scores(conf)
        correct = conf.pred == calibration.y
        self.threshold = fit_threshold(s[correct].numpy(), self.cfg.target_fpr)
        return self.threshold


def fit_badexpert(
    model: nn.Module, splits: Splits, cfg: DefenseConfig, *, device: torch.device
) -> tuple[BaDExpert, dict[str, float]]:
    """Steps 1-4 on the defender's clean set only. Returns the detector and fitting diagnostics."""
    finetune, calibration = defender_split(splits.reserve, cfg.clean_set_size, cfg.calibration_fraction)
    info = splits.info
    augment = info if cfg.augment else None
    t0 = time.perf_counter()
    model = model.to(device).eval()
    expert, steps = finetune_expert(
        model, finetune, cfg, info.num_classes, augment=augment, holdout=calibration, device=device
    )
    aux = finetune_auxiliary(model, finetune, cfg, augment=augment, device=device)
    det = BaDExpert(model, expert, aux, cfg)
    det.calibrate(calibration, device)
    diag = {
        "expert_steps": float(steps),
        "fit_seconds": time.perf_counter() - t0,
        "finetune_size": float(len(finetune)),
        "calibration_size": float(len(calibration)),
    }
    return det, diag


@dataclass
class Evaluation:
    """Per-sample arrays for one victim and the metrics computed from them."""

    metrics: dict[str, float]  # on the evaluation split: every reported figure
    selection_metrics: dict[str, float]  # on the selection split: what the search optimizes
    samples: dict[str, np.ndarray]  # equal-length columns, one row per scored input


SAMPLE_COLUMNS = (
    "split",  # calibration | selection | evaluation
    "triggered",  # the attack's test-time trigger was applied
    "sample_index",  # index within the split
    "label",  # true class
    "attack_label",  # class that counts as attack success (-1 for untriggered rows)
    "pred",  # argmax M(x)
    "expert_conf",  # b
    "aux_conf",  # m
    "score",  # higher = more suspicious
    "flagged",  # score > threshold
)


def evaluate_badexpert(det: BaDExpert, splits: Splits, attack: Attack, *, device: torch.device) -> Evaluation:
    """Score the calibration inputs (for the record) and, on the selection and evaluation splits,
    every clean input and the triggered version of every input that counts toward attack success;
    compute the metrics of each split from its own rows only."""
    cfg = det.cfg
    _, calibration = defender_split(splits.reserve, cfg.clean_set_size, cfg.calibration_fraction)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in SAMPLE_COLUMNS}
    results: dict[str, dict[str, float]] = {}
    for split, data in (
        ("calibration", calibration),
        ("selection", splits.selection),
        ("evaluation", splits.evaluation),
    ):
        idx = torch.nonzero(attack.counts_toward_asr(data.y)).squeeze(1)
        parts = [(False, data.x, data.y, data.y, torch.arange(len(data)))]
        if split != "calibration":
            parts.append((True, attack.apply_trigger(data.x[idx]), data.y[idx], attack.attack_label(data.y[idx]), idx))
        per: dict[bool, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        expert_hits: dict[bool, float] = {}
        for triggered, x, y, y_target, sample_index in parts:
            empty = torch.empty(0, dtype=torch.long)
            conf = det.confidences(x, device) if len(x) else Confidences(empty, empty.float(), empty.float(), empty)
            s = det.scores(conf).numpy()
            per[triggered] = (s.astype(np.float64), conf.pred.numpy(), y_target.numpy())
            expert_hits[triggered] = float((conf.expert_pred == y_target).float().mean()) if len(x) else float("nan")
            n = len(x)
            cols["split"].append(np.array([split] * n, dtype=object))
            cols["triggered"].append(np.full(n, triggered))
            cols["sample_index"].append(sample_index.numpy())
            cols["label"].append(y.numpy())
            cols["attack_label"].append(y_target.numpy() if triggered else np.full(n, -1))
            cols["pred"].append(conf.pred.numpy())
            cols["expert_conf"].append(conf.expert_conf.numpy())
            cols["aux_conf"].append(conf.aux_conf.numpy())
            cols["score"].append(s)
            cols["flagged"].append(s > det.threshold)
        if split == "calibration":
            continue
        m = detection_metrics(
            clean_scores=per[False][0],
            clean_pred=per[False][1],
            clean_label=per[False][2],
            poison_scores=per[True][0],
            poison_pred=per[True][1],
            poison_attack_label=per[True][2],
            threshold=det.threshold,
        )
        # Diagnostics of step 1: the expert should have forgotten the task (low clean accuracy)
        # while keeping the backdoor (high attack success).
        m["expert_clean_acc"] = expert_hits[False]
        m["expert_attack_success"] = expert_hits[True]
        results[split] = m
    samples = {k: np.concatenate(v) for k, v in cols.items()}
    return Evaluation(results["evaluation"], results["selection"], samples)
