"""The shared evaluation protocol, for every family: the defender split, the scored parts, and
the guarantee that fitting and calibration never see selection or evaluation data."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from bdx_study.data import ImageData
from bdx_study.detectors import DETECTORS, create_detector
from bdx_study.metrics import conformal_threshold
from bdx_study.protocol import ProtocolConfig, scoring_parts
from bdx_study.stages import DetectorRun, LoadedVictim, StageStore, run_detector

from .test_detectors import CONTRACT_PARAMS

CPU = torch.device("cpu")
PROTOCOL = ProtocolConfig(clean_set_size=300, calibration_fraction=0.5, target_fpr=0.1)


def _run(planted: dict[str, Any], name: str, splits: Any = None) -> DetectorRun:
    v = planted["patch"]
    return run_detector(
        StageStore(None),
        create_detector(name, CONTRACT_PARAMS.get(name, {})),
        PROTOCOL,
        LoadedVictim(v["config"].key, v["model"], splits or planted["splits"], v["attack"], {}),
        device=CPU,
    )


def test_defender_split_and_parts(planted: dict[str, Any]) -> None:
    splits, attack = planted["splits"], planted["patch"]["attack"]
    finetune, cal = PROTOCOL.defender_split(splits.reserve)
    assert len(finetune) == 150 and len(cal) == 150
    assert torch.equal(cal.x, splits.reserve.x[150:300])
    parts = {p.name: p for p in scoring_parts(splits, attack, PROTOCOL)}
    assert list(parts) == [
        "calibration/clean",
        "selection/clean",
        "selection/triggered",
        "evaluation/clean",
        "evaluation/triggered",
    ]
    assert torch.equal(parts["calibration/clean"].x, cal.x)
    ev = splits.evaluation
    trig = parts["evaluation/triggered"]
    assert torch.equal(trig.sample_index, torch.nonzero(ev.y != 0).squeeze(1))  # target class 0 excluded
    assert torch.equal(trig.x, attack.apply_trigger(ev.x[trig.sample_index]))
    assert (trig.attack_label == 0).all() and (parts["evaluation/clean"].attack_label == -1).all()


@pytest.mark.parametrize("name", DETECTORS.names())
def test_calibration_never_sees_evaluation(name: str, planted: dict[str, Any]) -> None:
    base = _run(planted, name)
    splits = planted["splits"]
    g = torch.Generator().manual_seed(1)
    ev = splits.evaluation
    sel = splits.selection
    noise = ImageData(torch.rand(ev.x.shape, generator=g), torch.randint(0, 10, (len(ev),), generator=g))
    attack = planted["patch"]["attack"]
    variants = [
        dataclasses.replace(splits, evaluation=noise),  # evaluation replaced by noise
        dataclasses.replace(splits, evaluation=ImageData(attack.apply_trigger(ev.x), ev.y)),  # all triggered
        dataclasses.replace(splits, evaluation=ev.take(slice(0, 3)), selection=sel.take(slice(0, 3))),
    ]
    for other in variants:
        run = _run(planted, name, other)
        assert run.evaluation.threshold == base.evaluation.threshold
        for comp, fitted in base.fitted.items():
            for k, t in fitted.tensors.items():
                assert torch.equal(run.fitted[comp].tensors[k], t), (comp, k)


@pytest.mark.parametrize("name", DETECTORS.names())
def test_threshold_comes_from_correct_calibration_scores_only(name: str, planted: dict[str, Any]) -> None:
    splits = planted["splits"]
    res = splits.reserve
    # replace the calibration part of D_c (reserve[150:300]) by other images: the fit stays ...
    x, y = res.x.clone(), res.y.clone()
    x[150:300] = torch.flip(res.x[150:300], dims=[-1])
    changed = dataclasses.replace(splits, reserve=ImageData(x, y))
    a, b = _run(planted, name), _run(planted, name, changed)
    if name != "badexpert" or CONTRACT_PARAMS["badexpert"].get("unlearn_early_stop_acc") is None:
        for comp, fitted in a.fitted.items():
            for k, t in fitted.tensors.items():
                assert torch.equal(b.fitted[comp].tensors[k], t), (comp, k)
    # ... and the threshold is exactly the conformal rank of the new calibration part's correct scores
    s = b.evaluation.samples
    cal = (s["split"] == "calibration") & (s["pred"] == s["label"])
    assert b.evaluation.threshold == conformal_threshold(s["score"][cal], PROTOCOL.target_fpr)
    s_all = s["score"][s["split"] == "calibration"]
    assert not np.array_equal(s_all, a.evaluation.samples["score"][a.evaluation.samples["split"] == "calibration"])


def test_conformal_threshold_keeps_fpr_at_or_below_target_where_the_quantile_exceeds_it() -> None:
    """Exchangeable synthetic clean scores: averaged over many draws of a calibration set, the
    conformal threshold's realized FPR is <= target; the interpolated quantile's is above it."""
    from bdx_study.metrics import fit_threshold

    rng = np.random.default_rng(0)
    for n, fpr in ((100, 0.05), (200, 0.01), (40, 0.1)):
        conformal, quantile = [], []
        for _ in range(3000):
            cal, fresh = rng.normal(size=n), rng.normal(size=1000)
            conformal.append((fresh > conformal_threshold(cal, fpr)).mean())
            quantile.append((fresh > fit_threshold(cal, fpr)).mean())
        assert np.mean(conformal) <= fpr + 0.002, (n, fpr, np.mean(conformal))
        assert np.mean(quantile) > fpr + 0.002, (n, fpr, np.mean(quantile))


def test_too_small_a_calibration_set_is_refused_with_the_numbers() -> None:
    from bdx_study.metrics import min_calibration

    with pytest.raises(ValueError, match=r"18 correctly classified .* target_fpr 0\.05.*at least 19"):
        conformal_threshold(np.arange(18.0), 0.05)
    assert conformal_threshold(np.arange(19.0), 0.05) == 18.0  # k = ceil(20 * 0.95) = 19: the largest
    assert min_calibration(0.01) == 99 and min_calibration(0.1) == 9


def test_separate_calibration_budget_and_clean_set_draws() -> None:
    ids = torch.arange(300, dtype=torch.float32)
    reserve = ImageData(ids.view(-1, 1, 1, 1).expand(-1, 1, 4, 4) / 1000, torch.zeros(300, dtype=torch.long))
    p = ProtocolConfig(clean_set_size=100, calibration_size=80, target_fpr=0.1)
    finetune, cal = p.defender_split(reserve)
    assert len(finetune) == 100 and len(cal) == 80  # the family fits on all of D_c
    assert torch.equal(finetune.x, reserve.x[:100]) and torch.equal(cal.x, reserve.x[100:180])
    drawn = p.model_copy(update={"clean_set_seed": 3})
    f2, c2 = drawn.defender_split(reserve)
    assert not torch.equal(f2.x, finetune.x)
    drawn_ids = torch.cat([f2.x, c2.x])[:, 0, 0, 0]
    assert len(set(drawn_ids.tolist())) == 180  # D_c and calibration are disjoint
    with pytest.raises(ValueError, match="exceed the 300 reserved images"):
        ProtocolConfig(clean_set_size=250, calibration_size=80).defender_split(reserve)
