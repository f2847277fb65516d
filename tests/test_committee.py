"""The committee family: its clean scale and rules (pure maths), a committee catching what each
member misses, the threshold's FPR guarantee on exchangeable clean inputs, sharing fits with its
members through the stage cache, its bundle, and how a study file declares one."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from bdx_study.detector import BundleError, Detector, save_bundle
from bdx_study.detectors import DETECTORS, DetectorParams, create_detector, fit_param, register_detector
from bdx_study.detectors._base import DetectorFamily, FitContext, Fitted
from bdx_study.detectors.committee import combine, log_tail
from bdx_study.protocol import Part, ProtocolConfig, evaluate
from bdx_study.space import SpaceError, parse_space
from bdx_study.stages import LoadedVictim, StageStore, count_passes, run_detector

from .conftest import tiny_study

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------------ the scale


def test_log_tail_is_a_continuous_decreasing_rank_against_clean_scores() -> None:
    rng = np.random.default_rng(0)
    ref = torch.from_numpy(rng.normal(size=200))
    grid = torch.linspace(-6, 12, 5001, dtype=torch.float64)
    lp = log_tail(ref, grid)
    assert torch.isfinite(lp).all()
    assert (lp.diff() < 0).all()  # strictly decreasing: a monotone map of the member's score
    p = lp.exp()
    assert p.diff().abs().max() < 2 / 201  # no jumps: at most about one reference score per grid step
    r = ref.sort().values
    for edge in (r[0], r[-1]):  # continuous where the interpolation meets the tails
        near = log_tail(ref, torch.stack([edge - 1e-9, edge, edge + 1e-9])).exp()
        assert float(near.max() - near.min()) < 1e-6
    assert float(p.max()) < 1 and float(p.min()) > 0
    # at the reference scores: (#{r >= s}) / (m + 1), the conformal count
    for i in (0, 50, 150, 199):
        assert math.isclose(float(log_tail(ref, r[i : i + 1]).exp()), (200 - i) / 201, rel_tol=1e-9)
    # far beyond the largest reference score: small, never zero in log space
    assert float(log_tail(ref, torch.tensor([1e6], dtype=torch.float64))) < -1e3


def test_log_tail_with_tied_reference_scores() -> None:
    ref = torch.tensor([0.0] * 30 + [1.0] * 30 + [2.0] * 5, dtype=torch.float64)  # a saturating score
    s = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    lp = log_tail(ref, s)
    assert (lp.diff() < 0).all()
    assert math.isclose(float(lp[1].exp()), 65 / 66) and math.isclose(float(lp[3].exp()), 35 / 66)
    with pytest.raises(ValueError, match="at least 2"):
        log_tail(torch.tensor([1.0]), s)


def test_combination_rules() -> None:
    lp = {"a": torch.log(torch.tensor([0.5, 1e-6, 0.5])), "b": torch.log(torch.tensor([0.5, 0.5, 1e-6]))}
    w = {"a": 0.5, "b": 0.5}
    score, terms = combine(lp, w, "min_p")
    assert torch.equal(score, torch.maximum(terms["a"], terms["b"]))
    assert score[1] > score[0] and score[2] > score[0] and torch.isclose(score[1], score[2])
    fisher, _ = combine(lp, w, "fisher")
    assert torch.allclose(fisher, 0.5 * -(lp["a"] + lp["b"]))
    stouffer, _ = combine(lp, w, "stouffer")
    assert stouffer[1] > stouffer[0]
    only_a, terms = combine(lp, {"a": 1.0, "b": 0.0}, "min_p")  # weight 0: left out
    assert set(terms) == {"a"} and torch.allclose(only_a, -lp["a"])
    with pytest.raises(ValueError, match="positive weight"):
        combine(lp, {"a": 0.0, "b": 0.0}, "fisher")
    with pytest.raises(ValueError, match="known: min_p"):
        combine(lp, w, "vote")


# ------------------------------------------------------------------------------------ probe members


class ProbeParams(DetectorParams):
    probe: str = fit_param("main", "patch", description="which planted trigger's pattern the probe correlates with")


PATTERNS: dict[str, Tensor] = {}  # filled by the fixture from the planted victims' own triggers


class Probe(DetectorFamily[ProbeParams]):
    """A member that sees exactly one trigger: the correlation of an input's deviation from the
    mean clean image with that trigger's pixel pattern (an oracle; blind to any other trigger)."""

    Params = ProbeParams
    access = "test only: knows one trigger's pattern"

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        return Fitted({"mean": ctx.clean.x.mean(0)})

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        pattern = PATTERNS[self.params.probe]
        return {"corr": ((x - fitted.tensors["mean"]) * pattern).flatten(1).sum(1)}

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return feats["corr"]


@pytest.fixture(scope="module")
def probes(planted: dict[str, Any]) -> Iterator[None]:
    """Two registered member families, ``probe_patch`` and ``probe_blend``, each seeing one of the
    planted triggers (the BadNet patch, the noise Blend)."""
    grey = torch.full((1, *planted["splits"].info.input_shape), 0.5)
    for kind in ("patch", "blend"):  # what each trigger does to a grey image: its pattern, 0 where it writes nothing
        PATTERNS[kind] = planted[kind]["attack"].apply_trigger(grey)[0] - 0.5
    names = []
    for kind in ("patch", "blend"):
        cls = type(f"Probe_{kind}", (Probe,), {})
        register_detector(f"probe_{kind}")(cls)
        names.append(f"probe_{kind}")
    try:
        yield None
    finally:
        for n in names:
            DETECTORS._entries.pop(n, None)  # the registry has no unregister: tests only


PROTOCOL = ProtocolConfig(clean_set_size=300, calibration_fraction=0.5, target_fpr=0.1)


def _run(planted: dict[str, Any], family: DetectorFamily, kind: str, store: StageStore | None = None) -> Any:
    v = planted[kind]
    return run_detector(
        store or StageStore(None),
        family,
        PROTOCOL,
        LoadedVictim(v["config"].key, v["model"], planted["splits"], v["attack"], planted["data"].layout()),
        device=CPU,
    )


def test_two_members_each_miss_a_trigger_and_the_committee_catches_both(planted: dict[str, Any], probes: None) -> None:
    members = {"probe_patch": {"probe": "patch"}, "probe_blend": {"probe": "blend"}}
    alone = {
        (m, kind): _run(planted, create_detector(m, p), kind).evaluation.metrics["auroc_correct_only"]
        for m, p in members.items()
        for kind in ("patch", "blend")
    }
    # each member sees its own trigger and misses the other
    assert alone[("probe_patch", "patch")] > 0.95 and alone[("probe_blend", "blend")] > 0.95, alone
    assert alone[("probe_patch", "blend")] < 0.8 and alone[("probe_blend", "patch")] < 0.8, alone
    for rule in ("min_p", "fisher"):
        committee = create_detector("committee", {"members": members, "combine": rule})
        for kind in ("patch", "blend"):
            m = _run(planted, committee, kind).evaluation.metrics
            assert m["auroc_correct_only"] > 0.95, (rule, kind, m["auroc_correct_only"], alone)
            if rule == "min_p":  # the member that sees the trigger decides, at the calibrated threshold too
                assert m["tpr_at_threshold_correct_only"] > 0.9, (kind, m)


def test_one_member_with_all_the_weight_ranks_as_that_member(planted: dict[str, Any], probes: None) -> None:
    members = {"probe_patch": {"probe": "patch"}, "probe_blend": {"probe": "blend"}}
    alone = _run(planted, create_detector("probe_patch", {"probe": "patch"}), "patch").evaluation.samples
    committee = create_detector("committee", {"members": members, "weights": {"probe_blend": 0.0}})
    both = _run(planted, committee, "patch").evaluation.samples
    ev = alone["split"] == "evaluation"
    assert np.array_equal(both["split"] == "evaluation", ev)
    # a monotone map of the member's score: the same order of every evaluation input
    assert np.array_equal(np.argsort(alone["score"][ev], kind="stable"), np.argsort(both["score"][ev], kind="stable"))
    assert np.isnan(both["evidence_probe_blend"]).all() and np.isfinite(both["evidence_probe_patch"]).all()


# ------------------------------------------------------------------------------------ the FPR guarantee


class ValueParams(DetectorParams):
    column: str = fit_param("main", "a", description="which synthetic score column this member reads")


class Value(DetectorFamily[ValueParams]):
    """A member whose score is a given feature column (synthetic scores for the protocol)."""

    Params = ValueParams
    access = "test only"

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        return Fitted()

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        raise NotImplementedError  # the test hands evaluate() the features directly

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return feats[self.params.column]


@pytest.fixture(scope="module")
def value_members() -> Iterator[None]:
    for n in ("value_a", "value_b"):
        register_detector(n)(type(f"Value_{n}", (Value,), {}))
    try:
        yield None
    finally:
        for n in ("value_a", "value_b"):
            DETECTORS._entries.pop(n, None)


def _clean_scores(rng: np.random.Generator, n: int) -> dict[str, Tensor]:
    """Exchangeable clean inputs seen by two dependent members on unrelated scales: a Gaussian
    one and a heavy-tailed one sharing part of its signal."""
    z = rng.normal(size=n)
    a = z + 0.5 * rng.normal(size=n)
    b = np.exp(2.0 * (0.6 * z + 0.8 * rng.normal(size=n)))
    return {"a": torch.from_numpy(a), "b": torch.from_numpy(b)}


def _realized_fpr(family: DetectorFamily, rng: np.random.Generator, protocol: ProtocolConfig) -> float:
    """One clean draw through the protocol's evaluate(): 120 calibration images (half of them
    reference the members' scales) and the FPR at the calibrated threshold on 5,000 fresh clean
    inputs."""
    parts, feats, preds = [], {}, {}
    for split, triggered, n in (
        ("calibration", False, 120),
        ("selection", False, 10),
        ("selection", True, 10),
        ("evaluation", False, 5000),
        ("evaluation", True, 10),
    ):
        label = torch.zeros(n, dtype=torch.long)
        p = Part(split, triggered, torch.zeros(n, 1, 1, 1), label, label if triggered else label - 1, torch.arange(n))
        parts.append(p)
        raw = _clean_scores(rng, n)
        if triggered:
            raw = {k: v + 100 for k, v in raw.items()}
        feats[p.name] = {"value_a/a": raw["a"], "value_b/b": raw["b"]}
        preds[p.name] = label
    return evaluate(family, parts, preds, feats, protocol).metrics["fpr_at_threshold_correct_only"]


def _mean_fpr_within_target(family: DetectorFamily, protocol: ProtocolConfig, seed: int) -> tuple[bool, float]:
    """The statistical test: over 300 independent draws (seeded), is the mean realized FPR at most
    the target plus 3 standard errors of that mean? (The conformal guarantee is on the expectation.)"""
    rng = np.random.default_rng(seed)
    fprs = np.array([_realized_fpr(family, rng, protocol) for _ in range(300)])
    return bool(fprs.mean() <= protocol.target_fpr + 3 * fprs.std(ddof=1) / math.sqrt(len(fprs))), float(fprs.mean())


@pytest.mark.parametrize("rule", ["min_p", "fisher"])
def test_the_threshold_keeps_its_fpr_guarantee_on_exchangeable_clean_inputs(value_members: None, rule: str) -> None:
    """Two dependent members on unrelated scales (one heavy-tailed), exchangeable clean inputs:
    the committee's conformal threshold holds the target FPR in expectation (tolerance: 3
    standard errors of the mean over 300 draws). The same test rejects the paper's interpolated
    quantile, whose realized FPR exceeds the target at this calibration size: it can fail."""
    family = create_detector(
        "committee", {"members": {"value_a": {"column": "a"}, "value_b": {"column": "b"}}, "combine": rule}
    )
    protocol = ProtocolConfig(clean_set_size=300, calibration_fraction=0.4, target_fpr=0.05)
    holds, mean = _mean_fpr_within_target(family, protocol, seed=12345)
    assert holds, mean
    assert mean > 0.025  # and the threshold is not needlessly strict
    quantile = protocol.model_copy(update={"threshold_rule": "quantile"})
    holds, mean = _mean_fpr_within_target(family, quantile, seed=12345)
    assert not holds, mean


# ------------------------------------------------------------------------------------ the stage cache


COMMITTEE_PARAMS = {
    "members": {
        "badexpert": {"unlearn_batch_size": 32, "unlearn_epochs": 1, "aux_epochs": 2, "aux_milestones": [1]},
        "ted": {},
    }
}


def test_a_committee_refits_nothing_its_members_fitted(planted: dict[str, Any], tmp_path: Path) -> None:
    store = StageStore(tmp_path / "stages")
    be = _run(planted, create_detector("badexpert", COMMITTEE_PARAMS["members"]["badexpert"]), "patch", store)
    ted = _run(planted, create_detector("ted", {}), "patch", store)
    fits = store.fits
    committee = _run(planted, create_detector("committee", COMMITTEE_PARAMS), "patch", store)
    assert store.fits == fits and committee.fitted_now == 0  # every member component came from the cache
    assert committee.stage_keys == {
        **{f"badexpert.{c}": k for c, k in be.stage_keys.items()},
        **{f"ted.{c}": k for c, k in ted.stage_keys.items()},
    }
    # the combination alone: tensor arithmetic, no fit
    other = {**COMMITTEE_PARAMS, "combine": "fisher", "weights": {"ted": 2.0}, "reference_fraction": 0.3}
    _run(planted, create_detector("committee", other), "patch", store)
    assert store.fits == fits
    # a member's fit parameter: that member's component refits, nothing else
    moved = copy.deepcopy(COMMITTEE_PARAMS)
    moved["members"]["badexpert"]["unlearn_lr"] = 3e-4
    again = _run(planted, create_detector("committee", moved), "patch", store)
    assert store.fits == fits + 1
    assert {c for c in again.stage_keys if again.stage_keys[c] != committee.stage_keys[c]} == {"badexpert.expert"}
    # and the committee's seed is every member's
    reseeded = _run(planted, create_detector("committee", {**COMMITTEE_PARAMS, "seed": 1}), "patch", StageStore(None))
    assert all(reseeded.stage_keys[c] != committee.stage_keys[c] for c in committee.stage_keys)


def test_committee_bundle_round_trip_and_flagged_by(planted: dict[str, Any], tmp_path: Path) -> None:
    family = create_detector("committee", COMMITTEE_PARAMS)
    run = _run(planted, family, "patch")
    splits = planted["splits"]

    def bundle(path: Path, **kw: Any) -> Path:
        return save_bundle(
            path,
            family,
            run.fitted,
            copy.deepcopy(planted["patch"]["model"]),
            threshold=run.evaluation.threshold,
            target_fpr=PROTOCOL.target_fpr,
            protocol=PROTOCOL.model_dump(mode="json"),
            architecture="small_cnn",
            info=splits.info,
            metrics=run.evaluation.metrics,
            provenance={},
            **kw,
        )

    path = bundle(tmp_path / "b", reference=run.reference)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [
            "manifest.json",
            "model.safetensors",
            "reference.safetensors",
            "badexpert.expert.safetensors",
            "badexpert.auxiliary.safetensors",
            "ted.main.safetensors",
        ]
    )
    det = Detector.load(path)
    x = planted["patch"]["attack"].apply_trigger(splits.evaluation.x)
    d = det.detect(x)
    either = d.extras["flagged_by_badexpert"] | d.extras["flagged_by_ted"]
    assert np.array_equal(either, d.flagged)  # min_p: flagged exactly when a member flags it alone
    assert d.flagged.mean() > 0.5
    samples = run.evaluation.samples
    sel = (samples["split"] == "evaluation") & ~samples["triggered"]
    np.testing.assert_array_equal(det.detect(splits.evaluation.x).score, samples["score"][sel])
    # served, M runs once per input: TED reads its activations from the prediction's own forward
    with count_passes() as cost:
        det.detect(x)
    assert cost.forward == 3 * len(x)  # M, B and M' (TED's pool activations were computed at the first call)
    assert run.costs["forward_passes_per_input"] < 3.5  # and the study counts the cost as served

    with pytest.raises(BundleError, match="none was given"):
        bundle(tmp_path / "no-ref")
    # a reference changed after export: its hash no longer matches
    ref = path / "reference.safetensors"
    data = bytearray(ref.read_bytes())
    data[-1] ^= 1
    ref.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 does not match"):
        Detector.load(path)


# ------------------------------------------------------------------------------------ study files


def _spec(tmp_path: Path, committee: Any, **protocol: Any) -> Any:
    doc = tiny_study(tmp_path, detectors={"committee": committee})
    doc["protocol"].update(protocol)
    return parse_space(doc, "study.yaml")


def test_a_committee_in_a_study_file_searches_member_and_combination_params(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        {
            "members": {
                "badexpert": {"unlearn_lr": {"dist": "loguniform", "low": 1e-4, "high": 1e-3}, "aux_epochs": 2},
                "ted": None,
            },
            "combine": {"dist": "choice", "values": ["min_p", "fisher"]},
            "weights": {"ted": {"dist": "uniform", "low": 0.5, "high": 2.0}},
        },
    )
    assert set(spec.searched("committee")) == {"members.badexpert.unlearn_lr", "combine", "weights.ted"}
    name, params, _ = spec.trial_config(
        {"detector": "committee", "members.badexpert.unlearn_lr": 2e-4, "combine": "fisher", "weights.ted": 1.5}
    )
    assert name == "committee" and params.combine == "fisher" and params.weights == {"ted": 1.5}
    assert params.members["badexpert"]["unlearn_lr"] == 2e-4 and params.members["badexpert"]["aux_epochs"] == 2
    assert params.members["ted"]["ted_pool_per_class"] == 20  # defaults filled in
    flat = params.to_params()
    assert flat["members.badexpert.unlearn_lr"] == 2e-4 and flat["weights.ted"] == 1.5
    listed = _spec(tmp_path, {"members": ["strip", "ted"]})
    assert listed.trial_config({"detector": "committee"})[1].members.keys() == {"strip", "ted"}


@pytest.mark.parametrize(
    ("committee", "message"),
    [
        ({"members": {"badexpert": {}, "tedd": {}}}, "detectors.committee.members.tedd: unknown detector family"),
        ({"members": {"ted": {}, "committee": {}}}, "members.committee: a committee cannot be a member"),
        ({"members": ["ted", "strip", "ted"]}, "members: ted listed twice"),
        ({"members": {"ted": {}}}, "at least two member families"),
        ({"members": ["ted", "strip"], "weights": {"ted": -1.0}}, "weights.ted: Input should be greater than"),
        ({"members": ["ted", "strip"], "weights": {"ted": 0, "strip": 0.0}}, "every member's weight is 0"),
        ({"members": ["ted", "strip"], "weights": {"scale_up": 1.0}}, "weights.scale_up: not a member"),
        ({"members": {"ted": {"seed": 3}, "strip": {}}}, "members.ted.seed: set `seed` on the committee"),
        ({"members": {"ted": {"ted_pool": 3}, "strip": {}}}, "members.ted.ted_pool: unknown parameter"),
        ({"members": {"ted": {"ted_pool_per_class": "3"}, "strip": {}}}, "members.ted.ted_pool_per_class: Input"),
        ({"members": ["ted", "strip"], "combine": "vote"}, "detectors.committee.combine: Input should be"),
        ({"members": "ted"}, "members: a mapping {family: {param: value}} or a list"),
        ({"combine": "min_p"}, "members: missing"),
        ({"members": ["ted", "strip"], "reference_fraction": 0.05}, "reference_fraction: 0.05 of the 50"),
    ],
)
def test_bad_committees_fail_before_any_work_naming_the_key(tmp_path: Path, committee: Any, message: str) -> None:
    with pytest.raises(SpaceError) as e:
        _spec(tmp_path, committee)
    assert message in str(e.value), str(e.value)
    assert str(e.value).startswith("study.yaml: detectors.committee")


def test_a_committee_leaves_the_threshold_enough_calibration_images(tmp_path: Path) -> None:
    # 50 calibration images (100 x 0.5); the committee keeps 25 to reference, 25 for the threshold
    with pytest.raises(SpaceError, match="leaves 25 for the threshold; target_fpr 0.02 needs at least 49"):
        _spec(tmp_path, {"members": ["ted", "strip"]}, target_fpr=0.02)
