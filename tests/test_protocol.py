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
from bdx_study.metrics import fit_threshold
from bdx_study.protocol import ProtocolConfig, scoring_parts
from bdx_study.stages import DetectorRun, StageStore, run_detector

from .test_detectors import CONTRACT_PARAMS

CPU = torch.device("cpu")
PROTOCOL = ProtocolConfig(clean_set_size=300, calibration_fraction=0.5, target_fpr=0.1)


def _run(planted: dict[str, Any], name: str, splits: Any = None) -> DetectorRun:
    v = planted["patch"]
    return run_detector(
        StageStore(None),
        create_detector(name, CONTRACT_PARAMS.get(name, {})),
        PROTOCOL,
        victim_key=v["config"].key,
        model=v["model"],
        splits=splits or planted["splits"],
        attack=v["attack"],
        layout={},
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
def test_threshold_is_the_quantile_of_correct_calibration_scores(name: str, planted: dict[str, Any]) -> None:
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
    # ... and the threshold is exactly the quantile of the new calibration part's correct scores
    s = b.evaluation.samples
    cal = (s["split"] == "calibration") & (s["pred"] == s["label"])
    assert b.evaluation.threshold == fit_threshold(s["score"][cal], PROTOCOL.target_fpr)
    s_all = s["score"][s["split"] == "calibration"]
    assert not np.array_equal(s_all, a.evaluation.samples["score"][a.evaluation.samples["split"] == "calibration"])
