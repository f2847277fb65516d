"""BaDExpert's maths (score, threshold, metrics, aggregation) on hand-computed cases, and the
guarantee that calibration never sees evaluation data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bdx_study.archs import create_model
from bdx_study.attacks import create_attack
from bdx_study.data import ImageData, Splits, defender_split
from bdx_study.defense import (
    SCORE_EPS,
    BaDExpert,
    DefenseConfig,
    badexpert_score,
    fit_badexpert,
    shifted_labels,
)
from bdx_study.metrics import aggregate, detection_metrics, fit_threshold
from bdx_study.training import fit, predict_proba
from bdx_study.victims import DataConfig

CPU = torch.device("cpu")


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# ------------------------------------------------------------------------------------- score


@pytest.mark.parametrize(
    ("b", "m", "alpha", "beta", "expected"),
    [
        # left = 2*0.1/0.9 = 0.2222, right = 0.1/0.4 = 0.25 -> -0.2222
        (0.9, 0.1, 2.0, 0.5, -0.2 / 0.9),
        # left = 2*0.3/0.99 = 0.606, right = 0.01/0.2 = 0.05 -> -0.05
        (0.99, 0.3, 2.0, 0.5, -0.05),
        # clean-looking input: low b, high m: left = 2*0.9/0.1 = 18, right = 0.9/eps -> -18
        (0.1, 0.9, 2.0, 0.5, -18.0),
        # other weights: left = 5*0.2/0.5 = 2, right = 0.5/0.2 = 2.5 -> -2
        (0.5, 0.2, 5.0, 0.4, -2.0),
    ],
)
def test_ensemble_score_hand_cases(b: float, m: float, alpha: float, beta: float, expected: float) -> None:
    s = badexpert_score(_t(b), _t(m), "ensemble", alpha, beta)
    assert float(s[0]) == pytest.approx(expected, rel=1e-12)


def test_ensemble_eps_clamp_when_beta_below_m() -> None:
    # beta - m = -0.2 <= 0: the right term clamps its denominator to eps (huge), so the left term
    # decides: -(2*0.7/0.2) = -7. Without the clamp, right = 0.8/-0.2 = -4 and the score would be +4.
    s = badexpert_score(_t(0.2), _t(0.7), "ensemble", 2.0, 0.5)
    assert float(s[0]) == pytest.approx(-7.0)
    # beta - m == 0 exactly: no division by zero either
    s = badexpert_score(_t(0.5), _t(0.5), "ensemble", 2.0, 0.5)
    assert float(s[0]) == pytest.approx(-2.0)
    # b = 0: the left term's denominator clamps to eps; right = 1/0.4 = 2.5 decides
    s = badexpert_score(_t(0.0), _t(0.1), "ensemble", 2.0, 0.5)
    assert float(s[0]) == pytest.approx(-2.5)
    # b = 0 and m >= beta: both clamp; min(2*0.6/eps, 1/eps) = 1/eps
    s = badexpert_score(_t(0.0), _t(0.6), "ensemble", 2.0, 0.5)
    assert float(s[0]) == pytest.approx(-1.0 / SCORE_EPS)
    assert torch.isfinite(s).all()


def test_expert_and_auxiliary_scores() -> None:
    b, m = _t(0.1, 0.5, 0.95), _t(0.9, 0.3, 0.05)
    se = badexpert_score(b, m, "expert", 2.0, 0.5)
    assert torch.equal(se, b)
    assert se.data_ptr() != b.data_ptr()  # a copy: callers may not alias the input
    assert torch.equal(badexpert_score(b, m, "auxiliary", 2.0, 0.5), -m)
    with pytest.raises(ValueError, match="unknown score kind 'nope'"):
        badexpert_score(b, m, "nope", 2.0, 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["ensemble", "expert", "auxiliary"])
def test_score_direction(kind: str) -> None:
    """Higher b and lower m (the backdoor corner of the (b, m) plane) => higher score."""
    grid = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
    b, m = torch.meshgrid(grid, grid, indexing="ij")  # b varies along dim 0, m along dim 1
    s = badexpert_score(b, m, kind, 2.0, 0.5)  # type: ignore[arg-type]
    assert bool((s.diff(dim=0) >= 0).all()), "score must not decrease as b grows"
    assert bool((s.diff(dim=1) <= 0).all()), "score must not increase as m grows"
    backdoor = badexpert_score(_t(0.95), _t(0.05), kind, 2.0, 0.5)  # type: ignore[arg-type]
    clean = badexpert_score(_t(0.05), _t(0.95), kind, 2.0, 0.5)  # type: ignore[arg-type]
    assert float(backdoor[0]) > float(clean[0])


def test_shifted_labels() -> None:
    y = torch.arange(10)
    assert shifted_labels(y, 10).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    y = torch.tensor([0, 2, 2, 1])
    out = shifted_labels(y, 3)
    assert out.tolist() == [1, 0, 0, 2]
    assert bool((out != y).all())


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


# ------------------------------------------------------------------------------------- calibration


TINY = DefenseConfig(
    clean_set_size=40,
    unlearn_epochs=1,
    aux_epochs=1,
    aux_milestones=(),
    unlearn_batch_size=16,
    aux_batch_size=16,
    target_fpr=0.1,
    finetune_seed=0,
)


@pytest.fixture(scope="module")
def digits_splits() -> Splits:
    return DataConfig(reserve_size=300).splits("digits")


@pytest.fixture(scope="module")
def model(digits_splits: Splits) -> torch.nn.Module:
    """A small CNN trained for one short epoch (500 images, ~1 s), so that M gets a fair share of the
    calibration images right: the threshold is fitted on those only."""
    info = digits_splits.info
    torch.manual_seed(0)
    net = create_model("small_cnn", info.input_shape, info.num_classes, info.mean, info.std)
    fit(
        net,
        digits_splits.train.take(slice(0, 500)),
        torch.optim.Adam(net.parameters(), lr=3e-3),
        epochs=1,
        batch_size=50,
        gen=torch.Generator().manual_seed(0),
    )
    return net.eval()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_calibration_never_sees_evaluation(digits_splits: Splits, model: torch.nn.Module) -> None:
    before = _state(model)
    det, diag = fit_badexpert(model, digits_splits, TINY, device=CPU)
    assert diag["finetune_size"] == 20 and diag["calibration_size"] == 20
    assert math.isfinite(det.threshold)
    # M itself is never modified
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # evaluation replaced by noise ...
    g = torch.Generator().manual_seed(1)
    ev = digits_splits.evaluation
    noise = dataclasses.replace(
        digits_splits,
        evaluation=ImageData(torch.rand(ev.x.shape, generator=g), torch.randint(0, 10, (len(ev),), generator=g)),
    )
    # ... or by triggered inputs labelled as the attack wants
    attack = create_attack("badnet", {}, digits_splits.info.input_shape, 10, 0)
    poisoned = dataclasses.replace(
        digits_splits, evaluation=ImageData(attack.apply_trigger(ev.x), torch.zeros_like(ev.y))
    )
    # ... or dropped down to one input
    tiny_eval = dataclasses.replace(digits_splits, evaluation=ev.take(slice(0, 1)))
    for other in (noise, poisoned, tiny_eval):
        det2, _ = fit_badexpert(model, other, TINY, device=CPU)
        assert det2.threshold == det.threshold
        for role in ("expert", "auxiliary"):
            s1, s2 = getattr(det, role).state_dict(), getattr(det2, role).state_dict()
            assert all(torch.equal(s1[k], s2[k]) for k in s1), role


def test_calibration_depends_on_calibration_part(digits_splits: Splits, model: torch.nn.Module) -> None:
    det, _ = fit_badexpert(model, digits_splits, TINY, device=CPU)
    res = digits_splits.reserve
    # replace the calibration part of D_c (reserve[20:40]) by other reserved clean images
    x, y = res.x.clone(), res.y.clone()
    x[20:40], y[20:40] = res.x[200:220], res.y[200:220]
    changed = dataclasses.replace(digits_splits, reserve=ImageData(x, y))
    det2, _ = fit_badexpert(model, changed, TINY, device=CPU)
    # the finetuned models are the same (same finetune part) ...
    for role in ("expert", "auxiliary"):
        s1, s2 = getattr(det, role).state_dict(), getattr(det2, role).state_dict()
        assert all(torch.equal(s1[k], s2[k]) for k in s1), role
    # ... but the threshold moves with the calibration data
    assert det2.threshold != det.threshold
    # and it is exactly the quantile of the calibration part's correctly classified scores
    _, cal = defender_split(changed.reserve, TINY.clean_set_size, TINY.calibration_fraction)
    conf = det2.confidences(cal.x, CPU)
    s = det2.scores(conf)[conf.pred == cal.y].numpy()
    assert det2.threshold == fit_threshold(s, TINY.target_fpr)


def test_calibrate_uses_only_correctly_classified(digits_splits: Splits, model: torch.nn.Module) -> None:
    det, _ = fit_badexpert(model, digits_splits, TINY, device=CPU)
    _, cal = defender_split(digits_splits.reserve, TINY.clean_set_size, TINY.calibration_fraction)
    tau = det.threshold
    assert det.calibrate(cal, CPU) == tau
    # extra inputs that M gets wrong (labels set to anything but M's prediction) change nothing
    g = torch.Generator().manual_seed(2)
    extra = torch.rand(30, *cal.x.shape[1:], generator=g)
    wrong = (predict_proba(model, extra).argmax(1) + 1) % 10
    padded = ImageData(torch.cat([cal.x, extra]), torch.cat([cal.y, wrong]))
    assert det.calibrate(padded, CPU) == tau
    # flagging: about target_fpr of the correctly classified calibration inputs lie above tau
    conf = det.confidences(cal.x, CPU)
    s = det.scores(conf)[conf.pred == cal.y]
    assert float((s > tau).float().mean()) <= TINY.target_fpr + 1 / len(s)


def test_scores_follow_config(digits_splits: Splits, model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    info = digits_splits.info
    other = [create_model("small_cnn", info.input_shape, 10, info.mean, info.std).eval() for _ in range(2)]
    x = digits_splits.reserve.x[:16]
    for kind in ("ensemble", "expert", "auxiliary"):
        cfg = TINY.model_copy(update={"score_kind": kind, "ensemble_alpha": 3.0, "ensemble_beta": 0.4})
        det = BaDExpert(model, other[0], other[1], cfg)
        conf = det.confidences(x)
        pred = predict_proba(model, x).argmax(1)
        assert torch.equal(conf.pred, pred)
        b = predict_proba(other[0], x).gather(1, pred[:, None]).squeeze(1)
        m = predict_proba(other[1], x).gather(1, pred[:, None]).squeeze(1)
        torch.testing.assert_close(conf.expert_conf, b)
        torch.testing.assert_close(conf.aux_conf, m)
        torch.testing.assert_close(det.scores(conf), badexpert_score(b, m, kind, 3.0, 0.4))  # type: ignore[arg-type]


def test_defense_config_validation() -> None:
    with pytest.raises(ValueError, match="aux_milestones"):
        DefenseConfig(aux_milestones=(4, 2))
    with pytest.raises(ValueError):
        DefenseConfig(unlearn_lr=0)
    with pytest.raises(ValueError):
        DefenseConfig(target_fpr=1.0)
    with pytest.raises(ValueError):
        DefenseConfig(not_a_field=1)  # type: ignore[call-arg]
