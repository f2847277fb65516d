"""Metrics and the threshold on hand-computed cases: AUROC from continuous scores, each protocol
(correct-only, all-inputs), aggregation across victims."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bdx_study.metrics import (
    DETECTION_METRICS,
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    METRICS,
    detection_metrics,
    fit_threshold,
)
from bdx_study.objective import aggregate, worst

# ------------------------------------------------------------------------------------- threshold


def test_fit_threshold_hand_case() -> None:
    scores = np.arange(100, dtype=np.float64)
    tau = fit_threshold(scores, 0.05)
    assert tau == pytest.approx(94.05)  # position 0.95 * 99 = 94.05, linear interpolation
    assert float((scores > tau).mean()) == pytest.approx(0.05)
    assert fit_threshold(np.array([1.0, 3.0]), 0.5) == pytest.approx(2.0)
    assert fit_threshold(np.array([7.0]), 0.01) == 7.0


def test_fit_threshold_flags_about_fpr() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=1000)
    for fpr in (0.01, 0.05, 0.2):
        tau = fit_threshold(scores, fpr)
        assert float((scores > tau).mean()) == pytest.approx(fpr, abs=1.5 / 1000)
    # float32 inputs (what torch scores give) work too
    assert fit_threshold(scores.astype(np.float32), 0.05) == pytest.approx(fit_threshold(scores, 0.05), abs=1e-6)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_fit_threshold_invalid_fpr(fpr: float) -> None:
    with pytest.raises(ValueError, match="target_fpr"):
        fit_threshold(np.arange(10.0), fpr)


def test_fit_threshold_no_scores() -> None:
    with pytest.raises(ValueError, match="no calibration scores"):
        fit_threshold(np.array([]), 0.05)


# ------------------------------------------------------------------------------------- metrics


def _hand_case() -> dict[str, np.ndarray | float]:
    return dict(
        # clean input 3 is misclassified (pred 3, label 0) and has the highest score
        clean_scores=np.array([0.1, 0.2, 0.3, 0.9, 0.4]),
        clean_pred=np.array([0, 1, 2, 3, 4]),
        clean_label=np.array([0, 1, 2, 0, 4]),
        # poison input 3 did not flip the model (pred 1 != target 7)
        poison_scores=np.array([0.5, 0.8, 0.25, 0.6]),
        poison_pred=np.array([7, 7, 7, 1]),
        poison_attack_label=np.array([7, 7, 7, 7]),
        threshold=0.35,
    )


def test_detection_metrics_hand_case() -> None:
    m = detection_metrics(**_hand_case())  # type: ignore[arg-type]
    assert m["threshold"] == 0.35
    # CA: correct = [T,T,T,F,T] = 4/5; flagged = [F,F,F,T,T] -> correct & not flagged = 3/5
    assert m["clean_acc_before"] == pytest.approx(0.8)
    assert m["clean_acc_after"] == pytest.approx(0.6)
    assert m["clean_acc_drop"] == pytest.approx(0.2)
    # ASR: success = [T,T,T,F] = 3/4; flagged = [T,T,F,T] -> success & not flagged = 1/4
    assert m["attack_success_before"] == pytest.approx(0.75)
    assert m["attack_success_after"] == pytest.approx(0.25)
    # correct-only: neg = [.1,.2,.3,.4], pos = [.5,.8,.25]: pairs won 4 + 4 + 2 = 10 of 12
    assert m["auroc_correct_only"] == pytest.approx(10 / 12)
    # all inputs: neg = [.1,.2,.3,.9,.4], pos = [.5,.8,.25,.6]: 4 + 4 + 2 + 4 = 14 of 20
    assert m["auroc_all_inputs"] == pytest.approx(14 / 20)
    assert m["auroc_correct_only"] != m["auroc_all_inputs"]
    assert m["tpr_at_threshold_correct_only"] == pytest.approx(2 / 3)
    assert m["tpr_at_threshold_all_inputs"] == pytest.approx(3 / 4)
    assert m["fpr_at_threshold_correct_only"] == pytest.approx(1 / 4)
    assert m["fpr_at_threshold_all_inputs"] == pytest.approx(2 / 5)
    # at FPR 0 (<= 1% and <= 5% of 4-5 negatives): correct-only can still catch 0.5 and 0.8 (> 0.4);
    # all-inputs has the misclassified clean 0.9 above every positive
    for name in ("1pct", "5pct"):
        assert m[f"tpr_at_{name}_fpr_correct_only"] == pytest.approx(2 / 3)
        assert m[f"tpr_at_{name}_fpr_all_inputs"] == pytest.approx(0.0)


def test_auroc_uses_continuous_scores() -> None:
    case = _hand_case()
    m = detection_metrics(**case)  # type: ignore[arg-type]
    # AUROC from hard decisions at the threshold would be (TPR + 1 - FPR) / 2
    hard = (m["tpr_at_threshold_correct_only"] + 1 - m["fpr_at_threshold_correct_only"]) / 2
    assert hard == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert m["auroc_correct_only"] != pytest.approx(hard)
    # and it does not move with the threshold
    for tau in (-1.0, 0.22, 0.45, 2.0):
        m2 = detection_metrics(**{**case, "threshold": tau})  # type: ignore[arg-type]
        assert m2["auroc_correct_only"] == m["auroc_correct_only"]
        assert m2["auroc_all_inputs"] == m["auroc_all_inputs"]


def test_detection_metrics_without_poison() -> None:
    case = _hand_case()
    empty = np.array([], dtype=np.int64)
    m = detection_metrics(
        **{**case, "poison_scores": empty.astype(float), "poison_pred": empty, "poison_attack_label": empty}  # type: ignore[arg-type]
    )
    assert m["clean_acc_before"] == pytest.approx(0.8)
    for k in (
        "attack_success_before",
        "attack_success_after",
        "auroc_correct_only",
        "tpr_at_threshold_all_inputs",
        "tpr_at_1pct_fpr_correct_only",
    ):
        assert math.isnan(m[k]), k
    assert m["fpr_at_threshold_all_inputs"] == pytest.approx(2 / 5)


def test_aggregate_worst_and_mean() -> None:
    nan = float("nan")
    per = [
        {
            "auroc_correct_only": 0.9,
            "clean_acc_drop": 0.01,
            "attack_success_after": 0.1,
            "fpr_at_threshold_all_inputs": nan,
        },
        {
            "auroc_correct_only": 0.7,
            "clean_acc_drop": 0.05,
            "attack_success_after": 0.3,
            "fpr_at_threshold_all_inputs": nan,
        },
        {"auroc_correct_only": nan, "clean_acc_drop": 0.02, "unknown_metric": 5.0},
    ]
    out = aggregate(per)
    assert out["mean/auroc_correct_only"] == pytest.approx(0.8)  # nan skipped
    assert out["worst/auroc_correct_only"] == pytest.approx(0.7)  # higher is better: worst = min
    assert out["mean/clean_acc_drop"] == pytest.approx(0.08 / 3)
    assert out["worst/clean_acc_drop"] == pytest.approx(0.05)  # lower is better: worst = max
    assert out["worst/attack_success_after"] == pytest.approx(0.3)
    assert "mean/fpr_at_threshold_all_inputs" not in out  # only nan: no value at all
    assert not any("unknown_metric" in k for k in out)
    assert all(math.isfinite(v) for v in out.values())
    assert aggregate([]) == {}


def test_metric_list_is_the_one_home() -> None:
    """detection_metrics computes exactly the declared list; every goal metric has a direction."""
    case = _hand_case()
    assert set(detection_metrics(**case)) == {m.name for m in DETECTION_METRICS}  # type: ignore[arg-type]
    assert not HIGHER_IS_BETTER & LOWER_IS_BETTER
    for name in HIGHER_IS_BETTER | LOWER_IS_BETTER:
        assert METRICS[name].description
    for m in DETECTION_METRICS:
        if m.name.startswith(("auroc", "tpr", "fpr")):
            assert m.name.endswith(("_correct_only", "_all_inputs")), f"{m.name} must name its protocol"


def test_worst() -> None:
    assert worst([0.9, 0.7, float("nan")], "auroc_correct_only") == 0.7
    assert worst([0.1, 0.3], "attack_success_after") == 0.3
    assert math.isnan(worst([], "auroc_correct_only"))
