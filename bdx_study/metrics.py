"""Detection and task metrics: the one list of metric names, and pure functions of scores,
predictions and labels (numpy in, floats out). Every detection metric names its protocol:

- ``correct_only`` (the paper's): negatives are clean inputs the model classifies correctly,
  positives are triggered inputs that actually flip the model to the attack label;
- ``all_inputs``: every clean input is a negative and every triggered input a positive.

Scores are "higher = more suspicious"; an input is flagged iff its score > threshold. AUROC is a
ranking AUROC from the continuous scores (scikit-learn), never from hard decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

PROTOCOLS = ("correct_only", "all_inputs")
FIXED_FPRS = {"1pct": 0.01, "5pct": 0.05}


@dataclass(frozen=True)
class Metric:
    name: str
    better: Literal["higher", "lower"] | None  # None: a description, not a goal (e.g. CA before defense)
    description: str


def _detection_metrics() -> list[Metric]:
    out = [
        Metric("threshold", None, "the calibrated threshold (flag iff score > threshold)"),
        Metric("clean_acc_before", None, "clean accuracy of the model, no defense"),
        Metric("clean_acc_after", "higher", "clean inputs correctly classified and not flagged / clean inputs"),
        Metric("clean_acc_drop", "lower", "clean_acc_before - clean_acc_after"),
        Metric("attack_success_before", None, "triggered inputs classified as the attack label, no defense"),
        Metric("attack_success_after", "lower", "triggered inputs classified as the attack label and not flagged"),
    ]
    for p in PROTOCOLS:
        out += [
            Metric(f"auroc_{p}", "higher", f"ranking AUROC of the continuous scores ({p})"),
            Metric(f"tpr_at_threshold_{p}", "higher", f"triggered inputs flagged at the calibrated threshold ({p})"),
            Metric(f"fpr_at_threshold_{p}", "lower", f"clean inputs flagged at the calibrated threshold ({p})"),
            Metric(f"fpr_at_threshold_low_{p}", None, f"95% Clopper-Pearson interval of fpr_at_threshold, low ({p})"),
            Metric(f"fpr_at_threshold_high_{p}", None, f"95% Clopper-Pearson interval of fpr_at_threshold, high ({p})"),
        ]
        out += [
            Metric(f"tpr_at_{k}_fpr_{p}", "higher", f"best TPR at FPR <= {v:.0%} on this split's own ROC ({p})")
            for k, v in FIXED_FPRS.items()
        ]
    return out


DETECTION_METRICS: tuple[Metric, ...] = tuple(_detection_metrics())
# Cost of scoring, per scored input (computed where the detector's outputs were computed).
COST_METRICS: tuple[Metric, ...] = (
    Metric(
        "forward_passes_per_input",
        "lower",
        "forward passes of victim-architecture networks per scored input, as served (M's own counted once)",
    ),
    Metric("backward_passes_per_input", "lower", "backward passes of victim-architecture networks per input"),
    Metric("score_seconds_per_input", "lower", "scoring wall time per input (model and detector outputs, score)"),
    Metric("fit_seconds", "lower", "wall time of fitting the detector's components on this victim"),
)
METRICS: dict[str, Metric] = {m.name: m for m in (*DETECTION_METRICS, *COST_METRICS)}
HIGHER_IS_BETTER = frozenset(m.name for m in METRICS.values() if m.better == "higher")
LOWER_IS_BETTER = frozenset(m.name for m in METRICS.values() if m.better == "lower")
# The per-victim figures shown in reports, logged per victim to MLflow and printed by export.
HEADLINE = (
    "auroc_correct_only",
    "auroc_all_inputs",
    "tpr_at_threshold_correct_only",
    "fpr_at_threshold_correct_only",
    "tpr_at_1pct_fpr_correct_only",
    "clean_acc_before",
    "clean_acc_drop",
    "attack_success_before",
    "attack_success_after",
)


def fit_threshold(calibration_scores: np.ndarray, target_fpr: float) -> float:
    """tau = the (1 - target_fpr) quantile (linear interpolation) of clean calibration scores;
    flagging ``s > tau`` then flags about ``target_fpr`` of clean calibration inputs."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if len(calibration_scores) == 0:
        raise ValueError("no calibration scores to fit a threshold on")
    return float(np.quantile(np.asarray(calibration_scores, dtype=np.float64), 1.0 - target_fpr, method="linear"))


def conformal_threshold(calibration_scores: np.ndarray, target_fpr: float) -> float:
    """tau = the k-th smallest of n clean calibration scores, k = ceil((n + 1)(1 - target_fpr)).
    For a clean input exchangeable with the calibration inputs, P(score > tau) <= target_fpr
    (split-conformal guarantee; ties only lower it). Needs n >= ceil(1 / target_fpr) - 1."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64))
    n = len(s)
    k = math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)
    if k > n:
        raise ValueError(
            f"{n} correctly classified clean calibration input(s) cannot support target_fpr {target_fpr}: the "
            f"conformal threshold needs at least {min_calibration(target_fpr)}; give more calibration images or a "
            "larger target_fpr"
        )
    return float(s[k - 1])


def min_calibration(target_fpr: float) -> int:
    """The fewest calibration scores a conformal threshold at ``target_fpr`` can use."""
    return max(1, math.ceil(1.0 / target_fpr - 1e-9) - 1)


def proportion_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a rate; (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def _rate(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else math.nan


def tpr_at_fpr(negatives: np.ndarray, positives: np.ndarray, fpr: float) -> float:
    """The highest TPR on the ROC curve whose FPR is <= ``fpr`` (an oracle threshold on the
    evaluation data itself: a property of the scores, not of the calibrated detector)."""
    if negatives.size == 0 or positives.size == 0:
        return math.nan
    from sklearn.metrics import roc_curve  # imported where used: `validate` stays light

    y = np.r_[np.zeros(negatives.size), np.ones(positives.size)]
    f, t, _ = roc_curve(y, np.r_[negatives, positives])
    return float(t[f <= fpr + 1e-12].max())


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    if negatives.size == 0 or positives.size == 0:
        return math.nan
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(negatives.size), np.ones(positives.size)]
    return float(roc_auc_score(y, np.r_[negatives, positives]))


def detection_metrics(
    *,
    clean_scores: np.ndarray,
    clean_pred: np.ndarray,
    clean_label: np.ndarray,
    poison_scores: np.ndarray,
    poison_pred: np.ndarray,
    poison_attack_label: np.ndarray,
    threshold: float,
) -> dict[str, float]:
    """Every metric of :data:`DETECTION_METRICS` for one detector on one victim and split.

    Clean arrays cover every clean input; poison arrays cover every triggered input that counts
    toward attack success. CA/ASR share the no-defense denominators: CA after defense =
    #{clean: correct and not flagged} / #{clean}; ASR after = #{poison: attack label and not
    flagged} / #{poison}.
    """
    clean_flag = clean_scores > threshold
    poison_flag = poison_scores > threshold
    correct = clean_pred == clean_label
    success = poison_pred == poison_attack_label
    out: dict[str, float] = {
        "threshold": float(threshold),
        "clean_acc_before": _rate(correct),
        "clean_acc_after": _rate(correct & ~clean_flag),
        "attack_success_before": _rate(success),
        "attack_success_after": _rate(success & ~poison_flag),
    }
    out["clean_acc_drop"] = out["clean_acc_before"] - out["clean_acc_after"]
    groups = {
        "correct_only": (clean_scores[correct], poison_scores[success]),
        "all_inputs": (clean_scores, poison_scores),
    }
    for proto, (neg, pos) in groups.items():
        out[f"auroc_{proto}"] = auroc(neg, pos)
        out[f"tpr_at_threshold_{proto}"] = _rate(pos > threshold)
        out[f"fpr_at_threshold_{proto}"] = _rate(neg > threshold)
        lo, hi = proportion_interval(int((neg > threshold).sum()), int(neg.size))
        out[f"fpr_at_threshold_low_{proto}"], out[f"fpr_at_threshold_high_{proto}"] = lo, hi
        for name, fpr in FIXED_FPRS.items():
            out[f"tpr_at_{name}_fpr_{proto}"] = tpr_at_fpr(neg, pos, fpr)
    return out
