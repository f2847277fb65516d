"""Contract tests over the detector registry: every registered family gets the same checks.

- its parameters are typed, each with a reason, and its components are declared;
- finite scores, one per input (an empty batch too);
- the direction: on a tiny model with a planted trigger of a kind the literature says the family
  detects, triggered inputs score higher than clean ones;
- determinism under a seed;
- a bundle round trip gives identical scores, and scoring-only knobs never change a fit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bdx_study.detector import Detector, save_bundle
from bdx_study.detectors import DETECTORS, DetectorFamily, create_detector
from bdx_study.protocol import SAMPLE_COLUMNS, ProtocolConfig
from bdx_study.stages import DetectorRun, LoadedVictim, StageStore, run_detector

CPU = torch.device("cpu")
PROTOCOL = ProtocolConfig(clean_set_size=300, calibration_fraction=0.5, target_fpr=0.1)
# Settings sized for the tiny planted models (150 clean images to fit on); families not listed
# run with their defaults.
CONTRACT_PARAMS: dict[str, dict[str, Any]] = {
    "badexpert": {
        "unlearn_batch_size": 32,
        "unlearn_epochs": 2,
        "unlearn_lr": 5e-4,
        "aux_epochs": 4,
        "aux_milestones": [2],
        "aux_lr": 0.1,
    },
    # The paper's 100 steps cost 100 forward+backward passes per input; 3 larger steps keep the
    # contract fast. gamma 0.05 on 16x16 inputs weighs the mask's L1 per pixel about as the
    # paper's 0.01 does on 32x32 ones (x4 fewer pixels).
    "cognitive_distillation": {"cd_steps": 3, "cd_lr": 0.5, "cd_gamma": 0.05},
    "frequency": {"freq_epochs": 6, "freq_width": 8},
    "sentinet": {"sentinet_num_images": 3, "sentinet_fit_size": 60},
    "strip": {"num_images": 16},
    # one corruption per ImageNet-C category (noise, blur, digital): at most 15 forwards per input, not 75
    "teco": {"teco_corruptions": ["gaussian_noise", "defocus_blur", "pixelate"]},
}
# The committee of the contract: BaDExpert (as above) and TED, combined by the default rule.
CONTRACT_PARAMS["committee"] = {"members": {"badexpert": CONTRACT_PARAMS["badexpert"], "ted": {}}}
FAMILIES = DETECTORS.names()


def _family(name: str, **overrides: Any) -> DetectorFamily:
    return create_detector(name, {**CONTRACT_PARAMS.get(name, {}), **overrides})


def _params(name: str) -> Any:
    """The family's Params at its defaults (a committee: the contract's members)."""
    return DETECTORS.get(name).Params.model_validate(CONTRACT_PARAMS[name] if name == "committee" else {})


def _detects(name: str) -> frozenset[str]:
    """Planted triggers the family is expected to catch: a committee catches what its members do."""
    family = _family(name)
    members = getattr(family, "members", None)
    return frozenset().union(*(m.detects for m in members.values())) if members else family.detects


def _scorer(family: DetectorFamily, run: DetectorRun) -> DetectorFamily:
    """The family as it scores (against the run's clean reference, if it needs one)."""
    return family.with_reference(run.reference) if run.reference is not None else family


def _run(planted: dict[str, Any], family: DetectorFamily, kind: str = "patch") -> DetectorRun:
    v = planted[kind]
    return run_detector(
        StageStore(None),
        family,
        PROTOCOL,
        LoadedVictim(v["config"].key, v["model"], planted["splits"], v["attack"], planted["data"].layout()),
        device=CPU,
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_params_typed_with_reasons(name: str) -> None:
    cls = DETECTORS.get(name)
    assert cls.name == name
    params = _params(name)
    assert isinstance(params.seed, int)
    for field, info in cls.Params.model_fields.items():
        assert info.description, f"{name}.{field} needs a reason"
    with pytest.raises(ValueError):
        cls.Params.model_validate({"no_such_param": 1})
    family = cls(params)
    assert family.fitted_components()
    for comp in family.fitted_components():
        owner, component, _ = family.stage_of(comp)
        assert "seed" in owner.Params.component_fields(component)
    assert set(cls.Params.model_fields).isdisjoint(ProtocolConfig.model_fields)
    assert cls.access, "say what the defender needs"
    # the table round trip: to_row / from_row and the exact JSON
    assert cls.Params.from_row(params.to_row()) == params
    assert cls.Params.model_validate_json(params.to_json()) == params


@pytest.mark.parametrize("name", FAMILIES)
def test_finite_scores_one_per_input(name: str, planted: dict[str, Any]) -> None:
    family = _family(name)
    run = _run(planted, family)
    samples = run.evaluation.samples
    assert len(samples["score"]) == sum(len(v) for k, v in samples.items() if k == "split")
    assert np.isfinite(samples["score"]).all()
    for col in family.extra_columns:
        assert len(samples[col]) == len(samples["score"])
    declared = {c for n in FAMILIES for c in DETECTORS.get(n).schema_columns()}
    assert set(samples) - set(SAMPLE_COLUMNS) <= declared  # every extra has a column in the Parquet schema
    scorer = _scorer(family, run)
    # a bare batch through the fitted components, an empty one too
    model = planted["patch"]["model"]
    for n in (5, 0):
        x = torch.rand(n, *planted["splits"].info.input_shape, generator=torch.Generator().manual_seed(n))
        pred = model(x).argmax(1) if n else torch.zeros(0, dtype=torch.long)
        feats: dict[str, torch.Tensor] = {}
        for comp, fitted in run.fitted.items():
            feats.update(family.features(comp, fitted, model, x, pred, CPU))
        s = scorer.score(feats, pred)
        assert s.shape == (n,)
        assert torch.isfinite(s).all()
    assert run.costs["forward_passes_per_input"] >= 1  # M's own forward at least
    assert run.costs["score_seconds_per_input"] > 0


@pytest.mark.parametrize(
    ("name", "kind"),
    [(n, k) for n in FAMILIES for k in ("patch", "blend") if k in _detects(n)],
)
def test_direction_on_planted_trigger(name: str, kind: str, planted: dict[str, Any]) -> None:
    """Triggered inputs score higher than clean ones (AUROC well above chance, both protocols)."""
    assert planted[kind]["metrics"]["attack_success"] > 0.9  # the trigger is planted
    m = _run(planted, _family(name), kind).evaluation.metrics
    assert m["auroc_correct_only"] > 0.75, m
    assert m["auroc_all_inputs"] > 0.75, m


@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic_under_a_seed(name: str, planted: dict[str, Any]) -> None:
    a = _run(planted, _family(name, seed=3)).evaluation
    b = _run(planted, _family(name, seed=3)).evaluation
    np.testing.assert_array_equal(a.samples["score"], b.samples["score"])
    assert a.threshold == b.threshold


@pytest.mark.parametrize("name", FAMILIES)
def test_bundle_round_trip_identical_scores(name: str, planted: dict[str, Any], tmp_path: Path) -> None:
    family = _family(name)
    run = _run(planted, family)
    splits = planted["splits"]
    model = planted["patch"]["model"]
    bundle = save_bundle(
        tmp_path / "b",
        family,
        run.fitted,
        copy.deepcopy(model),
        threshold=run.evaluation.threshold,
        target_fpr=PROTOCOL.target_fpr,
        protocol=PROTOCOL.model_dump(mode="json"),
        architecture="small_cnn",
        info=splits.info,
        metrics=run.evaluation.metrics,
        provenance={"test": True},
        reference=run.reference,
    )
    det = Detector.load(bundle)
    assert det.family.name == name and det.family.params == family.params
    x = splits.evaluation.x
    d = det.detect(x.numpy())
    samples = run.evaluation.samples
    sel = (samples["split"] == "evaluation") & ~samples["triggered"]
    np.testing.assert_array_equal(d.score.astype(np.float64), samples["score"][sel])
    np.testing.assert_array_equal(d.flagged, samples["flagged"][sel])
    for col in set(samples) & set(d.extras):
        np.testing.assert_allclose(d.extras[col], samples[col][sel])


def _changed(params: Any, field: str) -> Any:
    """``params`` with ``field`` set to another valid value (None if none is found)."""
    import typing

    info = type(params).model_fields[field]
    current = getattr(params, field)
    candidates: list[Any] = []
    args = typing.get_args(info.annotation)
    if typing.get_origin(info.annotation) is typing.Literal:
        candidates = [a for a in args if a != current]
    elif isinstance(current, bool):
        candidates = [not current]
    elif isinstance(current, int):
        candidates = [current + 1, current - 1]
    elif isinstance(current, float):
        candidates = [current * 0.5, current * 0.9, current + 1, current * 2]
    elif current is None:
        candidates = [0.5, 1, 10]
    elif isinstance(current, tuple):
        candidates = [current[:-1], (*current, current[-1] * 2 if current else 1)]
    for c in candidates:
        try:
            other = type(params).model_validate({**params.model_dump(), field: c})
        except ValueError:
            continue
        if getattr(other, field) != current:
            return other
    return None


@pytest.mark.parametrize("name", FAMILIES)
def test_components_depend_on_exactly_their_params(name: str) -> None:
    """Changing a parameter changes the key of exactly the components that declare it: a
    scoring-only knob never causes a refit."""
    cls = DETECTORS.get(name)
    base = _params(name)

    def keys(params: Any) -> dict[str, str]:
        family = cls(params)
        return {c: StageStore.component_key(*family.stage_of(c)[:2], "v", PROTOCOL) for c in family.fitted_components()}

    before = keys(base)
    for field in cls.Params.model_fields:
        other = _changed(base, field)
        if other is None:
            continue
        after = keys(other)
        for comp in before:
            moved = after[comp] != before[comp]
            assert moved == (field in cls.Params.component_fields(comp)), (field, comp)
