"""Study files: the shipped ones validate; bad ones fail fast, before any work, naming file and key."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from bdx_study.archs import ARCHITECTURES
from bdx_study.attacks import ATTACKS
from bdx_study.data import DATASETS
from bdx_study.detectors import DETECTORS
from bdx_study.detectors.badexpert import BaDExpertParams
from bdx_study.protocol import ProtocolConfig
from bdx_study.space import (
    SpaceError,
    StudySpec,
    builtin_space,
    flatten_committee,
    is_committee,
    load_space,
    parse_space,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


# A pinned study (the tests below know its values); the shipped files are checked generically.
PINNED = """
study: {name: pinned, storage: bdx_runs}
tracking: {uri: null, experiment: bdx-pinned}
data: {reserve_size: 300, eval_size: null}
victims:
  datasets: [digits]
  architectures: [small_cnn]
  attacks:
    - {name: badnet}
    - {name: blend, alpha: 0.2}
  poison_rates: [0.05]
  seeds: [0, 1]
  training: {optimizer: adam, lr: 1.0e-3, epochs: 40, batch_size: 64}
protocol:
  clean_set_size: 300
  calibration_fraction: 0.5
  target_fpr: 0.05
detectors:
  badexpert:
    unlearn_lr: {dist: loguniform, low: 1.0e-4, high: 2.0e-3}
    unlearn_epochs: {dist: int, low: 1, high: 3}
    unlearn_batch_size: 32
    aux_lr: {dist: loguniform, low: 0.01, high: 0.2}
    ensemble_alpha: {dist: uniform, low: 1.0, high: 4.0}
    ensemble_beta: {dist: uniform, low: 0.3, high: 0.7}
search:
  sampler: tpe
  num_trials: 16
  max_concurrent: 2
  seed: 0
  objective: {metric: auroc_correct_only, aggregate: worst}
  constraint: {max_clean_acc_drop: 0.1}
resources: {cpu: 1, gpu: 0}
"""


def _raw() -> dict[str, Any]:
    return yaml.safe_load(PINNED)


def _write(tmp_path: Path, raw: Any, name: str = "study.yaml") -> Path:
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return p


# ------------------------------------------------------------------------------------- shipped files


def test_pinned_validates() -> None:
    spec = parse_space(_raw(), "pinned")
    assert isinstance(spec, StudySpec)
    assert spec.study.name == "pinned"
    assert spec.experiment_name == "bdx-pinned"
    assert spec.num_trials == 16
    assert spec.search.objective.key == "worst/auroc_correct_only"
    assert spec.search.objective.mode == "max"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_study_validates(path: Path) -> None:
    spec = load_space(path)
    raw = yaml.safe_load(path.read_text())
    assert spec.study.name == raw["study"]["name"]
    assert spec.victim_configs()
    assert spec.num_trials >= 1
    assert spec.families == list(raw["detectors"])
    for family, entries in raw["detectors"].items():
        if is_committee(family):  # searched as flat keys: members.<member>.<param>, weights.<member>
            entries = flatten_committee(entries)
        searched = {k for k, v in {**raw.get("protocol", {}), **(entries or {})}.items() if isinstance(v, dict)}
        assert set(spec.optuna_space(family)) == searched
        # every fixed value and every bound makes a valid config
        name, params, protocol = spec.trial_config({"detector": family})
        assert name == family and isinstance(params, DETECTORS.get(family).Params)
        assert isinstance(protocol, ProtocolConfig)
    # the packaged copy is the same file
    assert load_space(builtin_space(path.stem)) == spec


# ------------------------------------------------------------------------------------- bad files


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    keys = path.split(".")

    def mutate(raw: dict[str, Any]) -> None:
        d = raw
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value

    return mutate


def _both(*mutations: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        for m in mutations:
            m(raw)

    return mutate


# (id, mutation, substrings the message must contain besides the file name)
BAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    ("unknown_top_level_key", _set("serach", {"sampler": "tpe"}), ["serach"]),
    ("unknown_section_key", _set("study.nmae", "x"), ["study.nmae"]),
    (
        "unknown_family_parameter",
        _set("detectors.badexpert.unlearn_rate", 0.1),
        ["detectors.badexpert.unlearn_rate", "unknown parameter", "unlearn_lr"],
    ),
    (
        "distribution_on_a_parameter_the_family_lacks",
        _set("detectors.strip.unlearn_lr", {"dist": "loguniform", "low": 1.0e-4, "high": 1.0e-3}),
        ["detectors.strip.unlearn_lr", "unknown parameter", "num_images"],
    ),
    ("unknown_family", _set("detectors.neural_cleanse", {}), ["detectors.neural_cleanse", "badexpert", "strip"]),
    ("protocol_setting_under_a_family", _set("detectors.badexpert.target_fpr", 0.1), ["protocol:"]),
    ("unknown_protocol_setting", _set("protocol.clean_size", 10), ["protocol.clean_size", "clean_set_size"]),
    ("no_detectors", _set("detectors", {}), ["detectors"]),
    ("old_defense_section", _set("defense", {"unlearn_lr": 1e-4}), ["defense", "detectors: {badexpert"]),
    ("bool_for_a_float", _set("detectors.badexpert.unlearn_lr", True), ["detectors.badexpert.unlearn_lr", "True"]),
    ("string_for_an_int", _set("data.reserve_size", "300"), ["data.reserve_size", "'300'"]),
    ("infinite_lr", _set("detectors.badexpert.unlearn_lr", float("inf")), ["detectors.badexpert.unlearn_lr", "inf"]),
    (
        "infinite_bound",
        _set("detectors.badexpert.aux_lr", {"dist": "loguniform", "low": 0.01, "high": float("inf")}),
        ["detectors.badexpert.aux_lr", "inf"],
    ),
    ("huge_lr", _set("detectors.badexpert.unlearn_lr", 1e308), ["detectors.badexpert.unlearn_lr", "1e+308"]),
    ("infinite_victim_lr", _set("victims.training.lr", float("inf")), ["victims.training.lr", "inf"]),
    ("unknown_uri_scheme", _set("tracking.uri", "garbage://x"), ["tracking.uri", "garbage", "sqlite"]),
    ("num_trials_for_unknown_family", _set("search.num_trials", {"strip": 3}), ["search.num_trials", "strip"]),
    ("wrong_type_num_trials", _set("search.num_trials", "many"), ["search.num_trials", "many"]),
    ("wrong_type_reserve", _set("data.reserve_size", [1, 2]), ["data.reserve_size"]),
    ("unknown_sampler", _set("search.sampler", "bayes"), ["search.sampler", "bayes"]),
    ("unknown_objective_metric", _set("search.objective.metric", "accuracy"), ["search.objective.metric", "accuracy"]),
    ("fixed_lr_zero", _set("detectors.badexpert.aux_lr", 0), ["detectors.badexpert.aux_lr", "greater than 0"]),
    ("fixed_lr_negative", _set("detectors.badexpert.unlearn_lr", -0.001), ["detectors.badexpert.unlearn_lr", "-0.001"]),
    (
        "loguniform_lr_low_nonpositive",
        _set("detectors.badexpert.unlearn_lr", {"dist": "loguniform", "low": 0.0, "high": 0.1}),
        ["detectors.badexpert.unlearn_lr", "low"],
    ),
    (
        "uniform_lr_low_negative",
        _set("detectors.badexpert.unlearn_lr", {"dist": "uniform", "low": -1.0, "high": 0.1}),
        ["detectors.badexpert.unlearn_lr.low", "-1.0"],
    ),
    (
        "choice_lr_negative",
        _set("detectors.badexpert.aux_lr", {"dist": "choice", "values": [0.1, -0.1]}),
        ["detectors.badexpert.aux_lr.values[1]"],
    ),
    (
        "low_above_high",
        _set("detectors.badexpert.ensemble_alpha", {"dist": "uniform", "low": 4.0, "high": 1.0}),
        ["detectors.badexpert.ensemble_alpha", "low 4.0 > high 1.0"],
    ),
    (
        "unknown_dist",
        _set("detectors.badexpert.aux_lr", {"dist": "gaussian", "low": 0.1, "high": 0.2}),
        ["detectors.badexpert.aux_lr", "loguniform"],
    ),
    (
        "clean_set_beyond_reserve",
        _set("protocol.clean_set_size", 301),
        ["protocol.clean_set_size", "301", "data.reserve_size"],
    ),
    (
        "searched_clean_set_beyond_reserve",
        _set("protocol.clean_set_size", {"dist": "choice", "values": [100, 500]}),
        ["protocol.clean_set_size", "500"],
    ),
    (
        "reserve_smaller_than_clean_set",
        _set("data.reserve_size", 200),
        ["protocol.clean_set_size", "data.reserve_size 200"],
    ),
    ("target_fpr_one", _set("protocol.target_fpr", 1.0), ["protocol.target_fpr"]),
    ("target_fpr_zero", _set("protocol.target_fpr", 0.0), ["protocol.target_fpr"]),
    (
        "target_fpr_bound",
        _set("protocol.target_fpr", {"dist": "uniform", "low": 0.01, "high": 1.2}),
        ["protocol.target_fpr.high"],
    ),
    ("file_store_uri", _set("tracking.uri", "file:///tmp/mlruns"), ["tracking.uri", "file-store"]),
    ("bare_path_uri", _set("tracking.uri", "./mlruns"), ["tracking.uri", "file-store"]),
    ("unknown_attack_param", _set("victims.attacks", [{"name": "badnet", "patch": 4}]), ["victims.attacks", "patch"]),
    (
        "attack_target_out_of_range",
        _set("victims.attacks", [{"name": "badnet", "target": 10}]),
        ["victims.attacks", "target"],
    ),
    ("poison_rate_out_of_range", _set("victims.poison_rates", [1.5]), ["victims.poison_rates", "1.5"]),
    ("bad_study_name", _set("study.name", "my study!"), ["study.name"]),
    ("grid_with_continuous", _set("search.sampler", "grid"), ["grid sampler", "detectors.badexpert.unlearn_lr"]),
    ("missing_victims", lambda raw: raw.pop("victims"), ["victims"]),
    ("bad_milestones", _set("detectors.badexpert.aux_milestones", [4, 2]), ["detectors.badexpert.aux_milestones"]),
    ("pruning_unknown_kind", _set("search.pruning", {"kind": "asha"}), ["search.pruning.kind", "'median'", "asha"]),
    ("pruning_unknown_setting", _set("search.pruning", {"kind": "median", "patience": 2}), ["search.pruning.patience"]),
    (
        "pruning_exact_of_a_mean",
        _both(_set("search.objective", {"aggregate": "mean"}), _set("search.pruning", {"kind": "exact"})),
        ["search.pruning.kind", "aggregate: worst", "can rise again"],
    ),
    (
        "pruning_a_grid",
        _both(_set("search.sampler", "grid"), _set("search.pruning", {"kind": "successive_halving"})),
        ["search.pruning.kind", "grid sampler would leave cells of the ablation unmeasured"],
    ),
    (
        "pruning_multi_objective",
        _both(
            _set("search.sampler", "nsga2"),
            _set("search.objectives", [{"metric": "auroc_correct_only"}, {"metric": "clean_acc_drop"}]),
            _set("search.pruning", {"kind": "median"}),
        ),
        ["search.pruning.kind", "multi-objective"],
    ),
]


def _assert_fails_fast(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SpaceError:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    t0 = time.perf_counter()
    with pytest.raises(SpaceError) as ei:
        load_space(path)
    assert time.perf_counter() - t0 < 5.0
    # nothing else happened: no storage folder, no MLflow database (that Ray does not start is
    # checked through the CLI in test_cli.py: here a session cluster may already be up)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    msg = str(ei.value)
    assert str(path) in msg
    return ei.value


@pytest.mark.parametrize(("mutate", "needles"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_study_fails_fast_naming_file_and_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mutate: Callable[[dict[str, Any]], None], needles: list[str]
) -> None:
    raw = _raw()
    raw["study"]["storage"] = str(tmp_path / "runs")
    mutate(raw)
    path = _write(tmp_path, raw)
    msg = str(_assert_fails_fast(path, monkeypatch, tmp_path))
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_malformed_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "study: {name: x\nvictims: [unclosed\n")
    msg = str(_assert_fails_fast(path, monkeypatch, tmp_path))
    assert "not valid YAML" in msg


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_not_a_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    msg = str(_assert_fails_fast(_write(tmp_path, text), monkeypatch, tmp_path))
    assert "mapping" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="no such study file"):
        load_space(tmp_path / "nope.yaml")


def test_parse_space_names_source() -> None:
    raw = _raw()
    raw["search"]["num_trials"] = "many"
    with pytest.raises(SpaceError, match=r"^my-source: search\.num_trials"):
        parse_space(raw, "my-source")


# Unknown registry names: a SpaceError naming the file and the key, listing the known names.


@pytest.mark.parametrize(
    ("key", "value", "known"),
    [
        ("attacks", [{"name": "trojan_horse"}], ATTACKS.names()),
        ("attacks", ["trojan_horse"], ATTACKS.names()),
        ("datasets", ["svhn"], DATASETS.names()),
        ("architectures", ["vgg16"], ARCHITECTURES.names()),
    ],
)
def test_unknown_registry_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: Any, known: list[str]
) -> None:
    raw = _raw()
    raw["study"]["storage"] = str(tmp_path / "runs")
    raw["victims"][key] = value
    path = _write(tmp_path, raw)
    msg = str(_assert_fails_fast(path, monkeypatch, tmp_path))
    assert f"victims.{key}" in msg
    bad = value[0]["name"] if isinstance(value[0], dict) else value[0]
    assert repr(bad) in msg
    for k in known:
        assert k in msg


def test_attack_given_by_name_string() -> None:
    raw = _raw()
    raw["victims"]["attacks"] = ["badnet", "none"]
    spec = parse_space(raw)
    assert {v.attack.name for v in spec.victim_configs()} == {"badnet", "none"}


def test_sqlite_and_http_uris_accepted() -> None:
    for uri in ("sqlite:///mlflow.db", "http://127.0.0.1:5000", "databricks"):
        raw = _raw()
        raw["tracking"]["uri"] = uri
        assert parse_space(raw).tracking.uri == uri


# ------------------------------------------------------------------------------------- derived views


def test_victim_configs_enumerate_grid() -> None:
    spec = parse_space(_raw())
    victims = spec.victim_configs()
    # digits x small_cnn x {badnet, blend} x {0.05} x seeds {0, 1}
    assert len(victims) == 4
    assert len({v.key for v in victims}) == 4
    assert {(v.attack.name, v.seed) for v in victims} == {("badnet", 0), ("badnet", 1), ("blend", 0), ("blend", 1)}
    for v in victims:
        assert v.dataset == "digits" and v.architecture == "small_cnn"
        assert v.attack.params["poison_rate"] == 0.05
        assert v.training.epochs == 40 and v.training.optimizer == "adam"
        assert v.data == spec.data
        if v.attack.name == "blend":
            assert v.attack.params["alpha"] == 0.2


def test_victim_grid_product_and_none_collapse() -> None:
    raw = _raw()
    raw["victims"].update(
        attacks=[{"name": "badnet"}, {"name": "blend", "poison_rate": 0.2}, "none"],
        poison_rates=[0.05, 0.1],
        seeds=[0],
        epochs=[1, 2],
    )
    victims = parse_space(raw).victim_configs()
    # badnet: 2 rates x 2 epochs; blend sets its own rate: 1 x 2 epochs; none ignores rates: 2 epochs
    assert len(victims) == 4 + 2 + 2
    assert len({v.key for v in victims}) == len(victims)
    by_attack: dict[str, set[tuple[Any, int]]] = {}
    for v in victims:
        by_attack.setdefault(v.attack.name, set()).add((v.attack.params.get("poison_rate"), v.training.epochs))
    assert by_attack["badnet"] == {(0.05, 1), (0.05, 2), (0.1, 1), (0.1, 2)}
    assert by_attack["blend"] == {(0.2, 1), (0.2, 2)}
    assert by_attack["none"] == {(None, 1), (None, 2)}


def test_optuna_space_distributions() -> None:
    spec = parse_space(_raw())
    space = spec.optuna_space("badexpert")
    assert set(space) == {"unlearn_lr", "unlearn_epochs", "aux_lr", "ensemble_alpha", "ensemble_beta"}
    assert space["unlearn_lr"] == optuna.distributions.FloatDistribution(1e-4, 2e-3, log=True)
    assert space["aux_lr"] == optuna.distributions.FloatDistribution(0.01, 0.2, log=True)
    assert space["unlearn_epochs"] == optuna.distributions.IntDistribution(1, 3)
    assert space["ensemble_alpha"] == optuna.distributions.FloatDistribution(1.0, 4.0)
    assert space["ensemble_beta"] == optuna.distributions.FloatDistribution(0.3, 0.7)
    assert spec.fixed("badexpert") == {
        "unlearn_batch_size": 32,
        "clean_set_size": 300,
        "calibration_fraction": 0.5,
        "target_fpr": 0.05,
    }
    name, cfg, protocol = spec.trial_config(
        {
            "detector": "badexpert",
            "unlearn_lr": 1e-3,
            "unlearn_epochs": 2,
            "aux_lr": 0.05,
            "ensemble_alpha": 2.0,
            "ensemble_beta": 0.5,
        }
    )
    assert name == "badexpert" and isinstance(cfg, BaDExpertParams)
    assert cfg.unlearn_batch_size == 32 and cfg.unlearn_epochs == 2 and protocol.target_fpr == 0.05


def test_optuna_choice_and_int_step() -> None:
    raw = _raw()
    raw["detectors"]["badexpert"] = {
        "score_kind": {"dist": "choice", "values": ["ensemble", "expert"]},
        "augment": {"dist": "choice", "values": [True, False]},
        "aux_epochs": {"dist": "int", "low": 2, "high": 8, "step": 2},
        "unlearn_lr": {"dist": "int", "low": 1, "high": 4, "log": True},
    }
    space = parse_space(raw).optuna_space("badexpert")
    assert space["score_kind"] == optuna.distributions.CategoricalDistribution(["ensemble", "expert"])
    assert space["augment"] == optuna.distributions.CategoricalDistribution([True, False])
    assert space["aux_epochs"] == optuna.distributions.IntDistribution(2, 8, step=2)
    assert space["unlearn_lr"] == optuna.distributions.IntDistribution(1, 4, log=True)


def test_grid_sampler_needs_choice_or_int() -> None:
    raw = _raw()
    raw["search"].update(sampler="grid", num_trials=None)
    raw["detectors"]["badexpert"] = {
        "aux_lr": {"dist": "choice", "values": [0.01, 0.1]},
        "unlearn_epochs": {"dist": "int", "low": 1, "high": 3},
        "ensemble_alpha": 2.0,
    }
    spec = parse_space(raw)
    assert spec.grid("badexpert") == {"aux_lr": [0.01, 0.1], "unlearn_epochs": [1, 2, 3]}
    assert spec.num_trials == 6  # the whole grid
    raw["detectors"]["badexpert"]["unlearn_epochs"] = {"dist": "int", "low": 1, "high": 3, "log": True}
    with pytest.raises(SpaceError, match="grid sampler needs choice or int"):
        parse_space(raw)
    raw["detectors"]["badexpert"]["unlearn_epochs"] = {"dist": "uniform", "low": 1.0, "high": 3.0}
    with pytest.raises(SpaceError, match=r"detectors\.badexpert\.unlearn_epochs"):
        parse_space(raw)


def test_spec_is_frozen_and_parse_does_not_mutate_input() -> None:
    raw = _raw()
    snapshot = copy.deepcopy(raw)
    spec = parse_space(raw)
    assert raw == snapshot
    with pytest.raises(ValueError):
        spec.study.name = "other"  # type: ignore[misc]


def test_storage_root_relative_to_base(tmp_path: Path) -> None:
    spec = parse_space(_raw())
    assert spec.storage_root(tmp_path) == (tmp_path / "bdx_runs").resolve()
    assert not (tmp_path / "bdx_runs").exists()  # computing the path creates nothing


def test_calibration_share_rounding_to_zero_rejected() -> None:
    raw = _raw()
    raw["protocol"].update(clean_set_size=3, calibration_fraction=0.1)  # round(0.3) = 0 images to calibrate on
    try:
        parse_space(raw, "f.yaml")
    except SpaceError as e:
        assert "calibration_fraction" in str(e)
    else:
        raise AssertionError("accepted a clean set with no calibration images")


# ------------------------------------------------------------------------------------- families


def test_several_families_each_with_its_space() -> None:
    raw = _raw()
    raw["protocol"]["target_fpr"] = {"dist": "choice", "values": [0.01, 0.05]}
    raw["detectors"]["strip"] = {"num_images": {"dist": "int", "low": 8, "high": 32}}
    raw["detectors"]["scale_up"] = None  # the family's defaults
    raw["search"]["num_trials"] = {"badexpert": 6, "strip": 3}
    with pytest.raises(SpaceError, match=r"search\.num_trials.*missing: \['scale_up'\]"):
        parse_space(raw)  # scale_up searches the protocol's target_fpr: it needs a budget too
    raw["search"]["num_trials"]["scale_up"] = 2
    spec = parse_space(raw)
    assert spec.families == ["badexpert", "strip", "scale_up"]
    assert set(spec.optuna_space("strip")) == {"num_images", "target_fpr"}  # the protocol's search too
    assert set(spec.optuna_space("scale_up")) == {"target_fpr"}
    assert "target_fpr" in spec.optuna_space("badexpert")
    assert [spec.trials_for(f) for f in spec.families] == [6, 3, 2]
    assert spec.num_trials == 11
    name, params, protocol = spec.trial_config({"detector": "strip", "num_images": 9, "target_fpr": 0.01})
    assert (name, params.num_images, protocol.target_fpr, protocol.clean_set_size) == ("strip", 9, 0.01, 300)


def test_a_family_with_nothing_searched_runs_once() -> None:
    raw = _raw()
    raw["detectors"] = {"strip": {"num_images": 8}, "scale_up": {}}
    spec = parse_space(raw)
    assert [spec.trials_for(f) for f in spec.families] == [1, 1]
    assert spec.optuna_space("strip") == {}


# ------------------------------------------------------------------------------------- YAML hazards


def test_duplicate_keys_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = PINNED.replace("search:\n", "search:\n  seed: 1\n", 1)  # search.seed twice
    msg = str(_assert_fails_fast(_write(tmp_path, text), monkeypatch, tmp_path))
    assert "duplicate key 'seed'" in msg


def test_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    text = PINNED.replace("{dist: loguniform, low: 1.0e-4, high: 2.0e-3}", "{dist: loguniform, low: 1e-4, high: 2e-3}")
    spec = load_space(_write(tmp_path, text))
    assert spec.optuna_space("badexpert")["unlearn_lr"] == optuna.distributions.FloatDistribution(1e-4, 2e-3, log=True)


def test_alias_bomb_refused_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    path = _write(tmp_path, bomb + PINNED)
    assert len(bomb) < 600  # 9**9 values once expanded
    msg = str(_assert_fails_fast(path, monkeypatch, tmp_path))
    assert "anchors and aliases" in msg and len(msg) < 500


def test_binary_garbage_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "study.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    msg = str(_assert_fails_fast(path, monkeypatch, tmp_path))
    assert "not a UTF-8 text file" in msg


def test_oversized_file_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, PINNED + "#" + "x" * (2 << 20) + "\n")
    assert "at most" in str(_assert_fails_fast(path, monkeypatch, tmp_path))
