"""BaDExpert, the first detector family: the score's maths on hand-computed cases, its
parameters, and the family computing exactly the method of badexpert.md through the shared
protocol (expert on (y + 1) mod C, auxiliary model, ensemble score, quantile threshold on the
correctly classified calibration inputs)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from bdx_study.archs import create_model
from bdx_study.data import Splits
from bdx_study.detectors import create_detector
from bdx_study.detectors.badexpert import (
    SCORE_EPS,
    BaDExpertParams,
    badexpert_score,
    finetune_auxiliary,
    finetune_expert,
    shifted_labels,
)
from bdx_study.protocol import ProtocolConfig
from bdx_study.stages import DetectorRun, LoadedVictim, StageStore, run_detector
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


# ------------------------------------------------------------------------------------- the family

TINY = dict(unlearn_epochs=1, aux_epochs=1, aux_milestones=(), unlearn_batch_size=16, aux_batch_size=16)
PROTOCOL = ProtocolConfig(clean_set_size=40, calibration_fraction=0.5, target_fpr=0.1)


@pytest.fixture(scope="module")
def digits_splits() -> Splits:
    return DataConfig(reserve_size=300, eval_size=200).splits("digits")


@pytest.fixture(scope="module")
def model(digits_splits: Splits) -> torch.nn.Module:
    """A small CNN trained for one short epoch (500 images, ~1 s)."""
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


def test_family_computes_the_method(digits_splits: Splits, model: torch.nn.Module) -> None:
    """The family through the protocol gives exactly what the method's steps give by hand."""
    from bdx_study.attacks import create_attack

    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = BaDExpertParams(**TINY, ensemble_alpha=3.0, ensemble_beta=0.4, seed=5)  # type: ignore[arg-type]
    attack = create_attack("badnet", {}, digits_splits.info.input_shape, 10, 0)
    run = run_detector(
        StageStore(None),
        create_detector("badexpert", p),
        PROTOCOL,
        LoadedVictim("v", model, digits_splits, attack, {}),
        device=CPU,
    )
    finetune, cal = PROTOCOL.defender_split(digits_splits.reserve)
    augment = digits_splits.info
    expert, _, _ = finetune_expert(model, finetune, p, 10, augment=augment, holdout=cal, device=CPU)
    aux = finetune_auxiliary(model, finetune, p, augment=augment, device=CPU)

    def score(x: torch.Tensor) -> torch.Tensor:
        pred = predict_proba(model, x).argmax(1)
        b = predict_proba(expert, x).gather(1, pred[:, None]).squeeze(1)
        m = predict_proba(aux, x).gather(1, pred[:, None]).squeeze(1)
        return badexpert_score(b, m, "ensemble", 3.0, 0.4)

    correct = predict_proba(model, cal.x).argmax(1) == cal.y
    cal_scores = np.sort(score(cal.x)[correct].double().numpy())
    k = math.ceil((len(cal_scores) + 1) * (1 - PROTOCOL.target_fpr))  # the conformal rank (the default)
    assert run.evaluation.threshold == cal_scores[k - 1]
    ev = run.evaluation.samples
    sel = (ev["split"] == "evaluation") & ~ev["triggered"]
    np.testing.assert_array_equal(ev["score"][sel], score(digits_splits.evaluation.x).double().numpy())
    for k, v in expert.state_dict().items():
        assert torch.equal(run.fitted["expert"].tensors[k], v), k
    for k, v in aux.state_dict().items():
        assert torch.equal(run.fitted["auxiliary"].tensors[k], v), k
    # M itself is never modified
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_scoring_knobs_do_not_touch_the_fit() -> None:
    a = BaDExpertParams(ensemble_alpha=1.0, ensemble_beta=0.3, score_kind="expert")
    b = BaDExpertParams(ensemble_alpha=5.0, ensemble_beta=0.6)
    for comp in ("expert", "auxiliary"):
        assert a.component_params(comp) == b.component_params(comp)
    assert "unlearn_lr" in a.component_params("expert") and "unlearn_lr" not in a.component_params("auxiliary")
    assert "aux_lr" in a.component_params("auxiliary") and "aux_lr" not in a.component_params("expert")


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="aux_milestones"):
        BaDExpertParams(aux_milestones=(4, 2))
    with pytest.raises(ValueError):
        BaDExpertParams(unlearn_lr=0)
    with pytest.raises(ValueError):
        BaDExpertParams(unlearn_lr=float("inf"))
    with pytest.raises(ValueError):
        BaDExpertParams(not_a_field=1)  # type: ignore[call-arg]


def _run_on_planted(planted: dict[str, Any], p: BaDExpertParams) -> DetectorRun:
    """BaDExpert with ``p`` on the planted BadNet victim, no stage cache."""
    v = planted["patch"]
    return run_detector(
        StageStore(None),
        create_detector("badexpert", p),
        ProtocolConfig(clean_set_size=300, target_fpr=0.1),
        LoadedVictim("v", v["model"], planted["splits"], v["attack"], {}),
        device=CPU,
    )


def test_unlearning_curve_is_recorded(planted: dict[str, Any]) -> None:
    """B's clean accuracy falls while its attack success stays: the paper's unlearning curve,
    recorded on the selection split (a diagnostic) at about 20 points when asked for, and not
    at all by default."""
    p = BaDExpertParams(unlearn_batch_size=32, unlearn_epochs=4, unlearn_lr=5e-4, aux_epochs=1, aux_milestones=())
    assert "curve" not in _run_on_planted(planted, p).fitted["expert"].meta
    p = p.model_copy(update={"unlearn_curve_points": 20})
    run = _run_on_planted(planted, p)
    curve = run.fitted["expert"].meta["curve"]
    steps = curve["step"]
    assert steps[0] == 0 and steps[-1] == run.fitted["expert"].meta["expert_steps"] and 3 <= len(steps) <= 22
    assert steps == sorted(steps)
    assert curve["clean_acc"][0] > 0.8 and curve["clean_acc"][-1] < 0.5  # it forgets the task ...
    assert curve["attack_success"][-1] > 0.8  # ... and keeps the backdoor


def test_self_calibrating_expert_finds_its_own_lr(planted: dict[str, Any]) -> None:
    p = BaDExpertParams(
        unlearn_lr_mode="calibrated",
        unlearn_batch_size=32,
        unlearn_epochs=2,
        aux_epochs=4,
        aux_milestones=(2,),
        aux_lr=0.1,
    )
    run = _run_on_planted(planted, p)
    meta = run.fitted["expert"].meta
    assert meta["calibrated_target_acc"] == pytest.approx(0.2)
    assert meta["calibrated_reached"] and meta["calibrated_holdout_acc"] <= 0.2
    tries = {float(k): a for k, a in meta["calibration_tries"].items()}
    assert 2 <= len(tries) <= 5  # a bisection, not the whole grid of 13
    smaller = [lr for lr in tries if lr < meta["calibrated_lr"]]
    assert all(tries[lr] > 0.2 for lr in smaller)  # the smallest lr that reaches the target
    assert run.evaluation.metrics["auroc_correct_only"] > 0.75
