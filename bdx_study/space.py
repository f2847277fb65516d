"""Study definitions: the YAML format of search_spaces/*.yaml, validated before any work starts.

A study file has these sections (unknown keys anywhere are errors):

    study:     name, storage (folder for the victim and stage caches, tables, Ray state),
               description, stage_cache, plugins (modules imported before the rest of the file
               is validated, and by every worker: the user's registrations; see bdx_study.plugins)
    tracking:  uri (MLflow tracking URI; null = MLflow's default, sqlite:///mlflow.db in the
               working directory), experiment (default: the study name)
    data:      root, download, reserve_size, eval_size (held-out images: selection + evaluation),
               selection_fraction, train_size, split_seed
    victims:   a grid: datasets x architectures x attacks x poison_rates x seeds x epochs, plus
               the victims' training recipe
    protocol:  the evaluation protocol every detector is judged under (clean_set_size,
               calibration_fraction, target_fpr): a fixed value or a distribution
    detectors: one or several registered families, each mapping its own parameters to a fixed
               value or a distribution {dist: loguniform|uniform|int|choice, ...}; a committee
               (``committee:``) names ``members`` with their own parameters, ``combine``,
               ``weights`` and ``reference_fraction``, flattened to ``members.<family>.<param>``
               and ``weights.<family>`` search keys (:func:`flatten_committee`)
    search:    sampler (tpe | random | grid), num_trials (per family, or {family: n}),
               max_concurrent, seed, objective, constraint, refit, nested_folds, pruning
    resources: cpu and gpu per trial (fractions allowed), max_failures

Values are checked strictly (``true`` is not a number, ``"3"`` is not an integer, infinities and
NaN are refused). Errors name the file, the key and the value, and say what is allowed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from bdx_study._config import StrictModel
from bdx_study._io import special_kind
from bdx_study._registry import Registry
from bdx_study.archs import ARCHITECTURES
from bdx_study.attacks import attack_params
from bdx_study.configs import AttackSpec, DataConfig, GroupColumn, ProtocolConfig, TrainingConfig, VictimConfig
from bdx_study.data import DATASETS
from bdx_study.detectors import DETECTORS, DetectorParams, detector_params
from bdx_study.detectors.committee import CommitteeParams
from bdx_study.metrics import HIGHER_IS_BETTER, LOWER_IS_BETTER, min_calibration
from bdx_study.objective import Aggregate
from bdx_study.plugins import MODULE_NAME, PluginError, load_entry_points, load_plugins

if TYPE_CHECKING:
    import optuna


class SpaceError(ValueError):
    """A study file that cannot be used; the message names file, key and value."""


# ------------------------------------------------------------------------------ distributions


class LogUniform(StrictModel):
    dist: Literal["loguniform"]
    low: float = Field(gt=0, description="lower bound (> 0)")
    high: float = Field(gt=0, description="upper bound")


class Uniform(StrictModel):
    dist: Literal["uniform"]
    low: float
    high: float


class IntRange(StrictModel):
    dist: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False


class Choice(StrictModel):
    dist: Literal["choice"]
    values: list[bool | int | float | str | None] = Field(min_length=1)


def _dist_tag(v: Any) -> str:
    if isinstance(v, dict) and "dist" in v:
        return str(v["dist"]) if v["dist"] in ("loguniform", "uniform", "int", "choice") else "unknown"
    if isinstance(v, BaseModel):
        return str(getattr(v, "dist", "fixed"))
    return "fixed"


class _UnknownDist(StrictModel):
    dist: Literal["loguniform", "uniform", "int", "choice"]  # always fails, with the allowed names


Distribution = Annotated[
    Annotated[LogUniform, Tag("loguniform")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[IntRange, Tag("int")]
    | Annotated[Choice, Tag("choice")]
    | Annotated[_UnknownDist, Tag("unknown")]
    | Annotated[Any, Tag("fixed")],
    Discriminator(_dist_tag),
]
SearchDistribution = LogUniform | Uniform | IntRange | Choice


def to_optuna(d: SearchDistribution) -> optuna.distributions.BaseDistribution:
    import optuna  # only where a search is built: `validate` stays light

    if isinstance(d, LogUniform):
        return optuna.distributions.FloatDistribution(d.low, d.high, log=True)
    if isinstance(d, Uniform):
        return optuna.distributions.FloatDistribution(d.low, d.high)
    if isinstance(d, IntRange):
        return optuna.distributions.IntDistribution(d.low, d.high, step=d.step, log=d.log)
    return optuna.distributions.CategoricalDistribution(d.values)


def grid_values(d: SearchDistribution) -> list[Any]:
    if isinstance(d, Choice):
        return list(d.values)
    if isinstance(d, IntRange) and not d.log:
        return list(range(d.low, d.high + 1, d.step))
    raise ValueError("only choice and int distributions can be enumerated by the grid sampler")


def _extremes(d: SearchDistribution) -> list[tuple[str, Any]]:
    if isinstance(d, Choice):
        return [(f"values[{i}]", v) for i, v in enumerate(d.values)]
    return [("low", d.low), ("high", d.high)]


# ------------------------------------------------------------------------------ sections


class StudySection(StrictModel):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100, description="study id: letters, digits, _ . -"
    )
    storage: str = Field("bdx_runs", description="root folder (or shared path) for caches, tables and state")
    description: str = ""
    stage_cache: bool = Field(
        True, description="reuse fitted detector components across trials (false: every trial refits; for benchmarks)"
    )
    plugins: list[Annotated[str, Field(pattern=MODULE_NAME)]] = Field(
        default_factory=list,
        description="modules imported before the rest of the file is validated, and in every worker: they register "
        "the user's attacks, architectures, datasets and detector families",
    )


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


class TrackingSection(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI; null = MLflow's default")
    experiment: str | None = Field(None, description="MLflow experiment; null = the study name")
    required: bool = Field(
        True, description="refuse to start when the store cannot be reached (false: Parquet only, `sync` later)"
    )

    @field_validator("uri")
    @classmethod
    def _no_file_store(cls, v: str | None) -> str | None:
        if v is None or v == "databricks":
            return v
        if v.startswith("file:") or "://" not in v:
            raise ValueError(
                f"{v!r} is a file-store URI, which MLflow 3 no longer accepts; use sqlite:///PATH.db or http://HOST:PORT"
            )
        scheme = v.split("://", 1)[0].split("+", 1)[0]
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(f"unknown tracking URI scheme {scheme!r}; allowed: {', '.join(TRACKING_SCHEMES)}")
        return v


class AttackEntry(StrictModel):
    """One attack of the grid: a registered name and that attack's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @model_validator(mode="after")
    def _valid_params(self) -> AttackEntry:
        params = attack_params(self.name)  # unknown names list the known ones
        params.model_validate_json(json.dumps(self.model_extra or {}), strict=True)
        return self

    def spec(self, poison_rate: float | None) -> AttackSpec:
        params = dict(self.model_extra or {})
        if poison_rate is not None and "poison_rate" not in params and self.name != "none":
            params["poison_rate"] = poison_rate
        return AttackSpec(name=self.name, params=params)


class VictimGrid(StrictModel):
    datasets: list[str] = Field(min_length=1)
    architectures: list[str] = Field(min_length=1)
    attacks: list[AttackEntry] = Field(min_length=1)
    poison_rates: list[float] | None = Field(
        None, description="grid over poison rates for attacks that do not set their own"
    )
    seeds: list[int] = Field([0], min_length=1)
    epochs: list[int] | None = Field(None, description="grid over training epochs; null = training.epochs")
    training: TrainingConfig = TrainingConfig()

    @field_validator("attacks", mode="before")
    @classmethod
    def _names_to_entries(cls, v: Any) -> Any:
        return [{"name": a} if isinstance(a, str) else a for a in v] if isinstance(v, list) else v

    @field_validator("datasets", "architectures")
    @classmethod
    def _registered(cls, v: list[str], info: ValidationInfo) -> list[str]:
        registry: Registry[Any] = DATASETS if info.field_name == "datasets" else ARCHITECTURES
        for name in v:
            registry.require(name)  # unknown names fail, listing the known ones
        return v

    @field_validator("poison_rates")
    @classmethod
    def _rates(cls, v: list[float] | None) -> list[float] | None:
        for r in v or []:
            if not 0 < r < 1:
                raise ValueError(f"poison rate {r} must be in (0, 1)")
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: list[int] | None) -> list[int] | None:
        for e in v or []:
            if e < 1:
                raise ValueError(f"epochs {e} must be >= 1")
        return v


class Objective(StrictModel):
    metric: str = Field("auroc_correct_only", description="a per-victim metric name")
    aggregate: Aggregate = Field("worst", description="across victims")

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        known = HIGHER_IS_BETTER | LOWER_IS_BETTER
        if v not in known:
            raise ValueError(f"unknown metric {v!r}; known: {', '.join(sorted(known))}")
        return v

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.metric in HIGHER_IS_BETTER else "min"

    @property
    def key(self) -> str:
        """The reported aggregate (evaluation split), e.g. worst/auroc_correct_only."""
        return f"{self.aggregate}/{self.metric}"

    @property
    def selection_key(self) -> str:
        """What the search optimizes (selection split), e.g. worst/selection_auroc_correct_only."""
        return f"{self.aggregate}/selection_{self.metric}"


class Constraint(StrictModel):
    max_clean_acc_drop: float | None = Field(
        None, ge=0, le=1, description="worst-case clean-accuracy drop allowed (CA before - CA after defense)"
    )


class Refit(StrictModel):
    """Refit uncertainty: the best configs are fitted again with fresh seeds and fresh draws of D_c."""

    top_k: int = Field(0, ge=0, le=100, description="best configs of each family refitted after the search (0 = none)")
    repeats: int = Field(3, ge=1, le=100, description="refits per config, each with a fresh seed and D_c draw")


class ExactPruning(StrictModel):
    """Stop a trial once its running worst case cannot put it among the configs that matter
    (the selection rule's best ``k``): never changes the chosen defaults (:mod:`bdx_study.pruning`)."""

    kind: Literal["exact"]


class SuccessiveHalvingPruning(StrictModel):
    """Optuna's SuccessiveHalvingPruner (asynchronous successive halving), victims as the resource."""

    kind: Literal["successive_halving"]
    min_resource: int = Field(1, ge=1, description="victims a trial evaluates before its first rung")
    reduction_factor: int = Field(3, ge=2, description="1/reduction_factor of the trials at a rung go on")
    min_early_stopping_rate: int = Field(0, ge=0)
    bootstrap_count: int = Field(0, ge=0, description="trials a rung needs before it stops any")


class MedianPruning(StrictModel):
    """Optuna's MedianPruner: stop a trial whose running objective is worse than the median of
    earlier trials' at the same number of victims."""

    kind: Literal["median"]
    n_startup_trials: int = Field(5, ge=0, description="finished trials before any is stopped")
    n_warmup_steps: int = Field(0, ge=0, description="victims a trial always evaluates")
    interval_steps: int = Field(1, ge=1)
    n_min_trials: int = Field(1, ge=1)


class NoPruning(StrictModel):
    kind: Literal["none"]


def _pruning_tag(v: Any) -> str:
    kind = v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)
    return str(kind) if kind in PRUNING_KINDS else "unknown"


PruningKind = Literal["exact", "successive_halving", "median", "none"]
PRUNING_KINDS: tuple[str, ...] = get_args(PruningKind)


class _UnknownPruning(StrictModel):
    kind: PruningKind  # always fails, with the allowed names


Pruning = Annotated[
    Annotated[ExactPruning, Tag("exact")]
    | Annotated[SuccessiveHalvingPruning, Tag("successive_halving")]
    | Annotated[MedianPruning, Tag("median")]
    | Annotated[NoPruning, Tag("none")]
    | Annotated[_UnknownPruning, Tag("unknown")],
    Discriminator(_pruning_tag),
]
ResolvedPruning = ExactPruning | SuccessiveHalvingPruning | MedianPruning | NoPruning


class SearchSection(StrictModel):
    sampler: Literal["tpe", "random", "grid", "nsga2"] = "tpe"
    num_trials: int | dict[str, int] | None = Field(
        16, description="trials per detector family, or {family: trials}; null = the whole grid (grid sampler)"
    )
    max_concurrent: int = Field(2, ge=1, description="trials at once (also keeps TPE from degrading to random)")
    seed: int = 0
    objective: Objective = Objective()
    objectives: list[Objective] = Field(
        default_factory=list,
        description="nsga2 only: the objectives searched jointly (e.g. AUROC, clean-accuracy drop, fit seconds); "
        "`objective` still picks the robust defaults",
    )
    constraint: Constraint = Constraint()
    refit: Refit = Refit()
    nested_folds: list[GroupColumn] = Field(
        default_factory=list,
        description="group columns whose every value gets its own search without it (strictly held out)",
    )
    pruning: Pruning | None = Field(
        None,
        description="stop hopeless trials early, victims as the resource: {kind: exact | successive_halving | "
        "median | none, ...}; default exact for a worst-case objective, none otherwise",
    )

    @field_validator("num_trials")
    @classmethod
    def _positive(cls, v: int | dict[str, int] | None) -> int | dict[str, int] | None:
        for n in v.values() if isinstance(v, dict) else [v] if v is not None else []:
            if not 1 <= n <= 100_000:
                raise ValueError(f"trials per family must be in [1, 100000], got {n}")
        return v


class ResourcesSection(StrictModel):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (fractions allowed)")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; fractions (e.g. 0.25) pack trials on one GPU")
    max_failures: int = Field(2, ge=-1, description="retries of a failed trial (-1 = unlimited)")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"gpu {v}: more than one GPU per trial must be a whole number")
        return v


PROTOCOL_FIELDS = tuple(ProtocolConfig.model_fields)


class StudySpec(StrictModel):
    """A whole study file."""

    study: StudySection
    tracking: TrackingSection = TrackingSection()
    data: DataConfig = DataConfig()
    victims: VictimGrid
    protocol: dict[str, Distribution] = Field(default_factory=dict)
    detectors: dict[str, dict[str, Distribution]] = Field(min_length=1)
    search: SearchSection = SearchSection()
    resources: ResourcesSection = ResourcesSection()

    # -- derived views ------------------------------------------------------------------------

    @property
    def families(self) -> list[str]:
        """The detector families of the study, in file order."""
        return list(self.detectors)

    def searched(self, family: str) -> dict[str, SearchDistribution]:
        """The distributions a family's trials sample: its own and the protocol's."""
        both = {**self.protocol, **self.detectors[family]}
        return {k: d for k, d in both.items() if isinstance(d, LogUniform | Uniform | IntRange | Choice)}

    def fixed(self, family: str) -> dict[str, Any]:
        searched = self.searched(family)
        return {k: d for k, d in {**self.protocol, **self.detectors[family]}.items() if k not in searched}

    def optuna_space(self, family: str) -> dict[str, optuna.distributions.BaseDistribution]:
        return {k: to_optuna(d) for k, d in self.searched(family).items()}

    def grid(self, family: str) -> dict[str, list[Any]]:
        return {k: grid_values(d) for k, d in self.searched(family).items()}

    def trials_for(self, family: str) -> int:
        """Trials of ``family``: the whole grid (grid sampler without num_trials), the family's
        entry of num_trials, or 1 when nothing of it is searched (every trial would be the same)."""
        if not self.searched(family):
            return 1
        n = self.search.num_trials
        if isinstance(n, dict):
            return n[family]
        if n is not None:
            return n
        return math.prod(len(v) for v in self.grid(family).values())

    @property
    def num_trials(self) -> int:
        return sum(self.trials_for(f) for f in self.families)

    @property
    def pruning(self) -> ResolvedPruning:
        """``search.pruning``, or its default: exact pruning where it is exact (one worst-case
        objective, a sampler that is not the grid's), none elsewhere."""
        p = self.search.pruning
        if p is not None:
            assert not isinstance(p, _UnknownPruning)
            return p
        s = self.search
        if s.objective.aggregate == "worst" and s.sampler in ("tpe", "random"):
            return ExactPruning(kind="exact")
        return NoPruning(kind="none")

    def trial_config(self, config: dict[str, Any]) -> tuple[str, DetectorParams, ProtocolConfig]:
        """(family, its parameters, the protocol) of a trial whose sampled values are ``config``
        (with its family under the key ``detector``)."""
        family = config["detector"]
        values = {**self.fixed(family), **{k: v for k, v in config.items() if k != "detector"}}
        protocol = ProtocolConfig.model_validate({k: v for k, v in values.items() if k in PROTOCOL_FIELDS})
        own = {k: v for k, v in values.items() if k not in PROTOCOL_FIELDS}
        if is_committee(family):
            own = nest_committee(own)
        params = detector_params(family).model_validate(own)
        return family, params, protocol

    def victim_configs(self) -> list[VictimConfig]:
        g = self.victims
        rates: list[float | None] = list(g.poison_rates) if g.poison_rates else [None]
        epochs = g.epochs or [g.training.epochs]
        out: dict[str, VictimConfig] = {}
        for ds, arch, att, rate, seed, ep in itertools.product(
            g.datasets, g.architectures, g.attacks, rates, g.seeds, epochs
        ):
            cfg = VictimConfig(
                dataset=ds,
                architecture=arch,
                attack=att.spec(rate),
                seed=seed,
                training=g.training.model_copy(update={"epochs": ep}),
                data=self.data,
            )
            out[cfg.key] = cfg  # 'none' x several poison rates collapses to one victim
        return list(out.values())

    def group_values(self, column: GroupColumn) -> list[Any]:
        """The values of a group column among the study's victims, sorted (a nested fold per
        value when there are 2+; see :mod:`bdx_study.folds`)."""
        return sorted({v.group_value(column) for v in self.victim_configs()}, key=str)

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.study.name

    @property
    def study_dir(self) -> Path:
        """Where this study's tables, Ray and Optuna state live: <storage>/studies/<name>."""
        return self.storage_root() / "studies" / self.study.name

    def storage_root(self, base: Path | None = None) -> Path:
        p = Path(os.path.expandvars(self.study.storage)).expanduser()
        return (p if p.is_absolute() else (base or Path.cwd()) / p).resolve()


# ------------------------------------------------------------------------------ committees


def is_committee(family: str) -> bool:
    """Whether ``family`` is a committee of families (its parameters are its members')."""
    return family in DETECTORS and issubclass(detector_params(family), CommitteeParams)


def flatten_committee(entry: Any) -> Any:
    """A committee's entry as flat search-space keys: ``members`` (the member names, in file
    order), ``members.<member>.<param>`` and ``weights.<member>`` (each a value or a
    distribution), and its own settings as they are. Anything malformed is left for the checks,
    which name it."""
    if not isinstance(entry, dict):
        return entry
    out = {k: v for k, v in entry.items() if k not in ("members", "weights")}
    members = entry.get("members")
    if isinstance(members, dict):
        out["members"] = list(members)
        for m, params in members.items():
            if isinstance(params, dict):
                out.update({f"members.{m}.{k}": v for k, v in params.items()})
            elif params is not None:
                out[f"members.{m}"] = params  # refused by the checks
    elif members is not None:
        out["members"] = members
    weights = entry.get("weights")
    if isinstance(weights, dict):
        out.update({f"weights.{m}": w for m, w in weights.items()})
    elif weights is not None:
        out["weights"] = weights
    return out


def nest_committee(values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_committee` on a trial's values (every key a value)."""
    out: dict[str, Any] = {}
    members: dict[str, dict[str, Any]] = {m: {} for m in values.get("members") or []}
    weights: dict[str, Any] = {}
    for k, v in values.items():
        head, _, rest = k.partition(".")
        if head == "members" and rest:
            m, _, param = rest.partition(".")
            members.setdefault(m, {})[param] = v
        elif head == "weights" and rest:
            weights[rest] = v
        elif k != "members":
            out[k] = v
    out["members"] = members
    if weights:
        out["weights"] = weights
    return out


class _Weight(StrictModel):
    w: float = Field(ge=0, description="a member's weight")


def _check_committee(source: str, family: str, entries: dict[str, Any]) -> list[str]:
    """A committee's flat entry (:func:`flatten_committee`): its members (known, not committees,
    each once, two at least), each member's parameters against that family's own, its weights
    (members only, >= 0, not all zero) and its own settings."""
    where = f"{source}: detectors.{family}"
    names = entries.get("members")
    if names is None:
        example = "members: {badexpert: {}, ted: {}}"
        return [f"{where}.members: missing; name two or more member families, e.g. {example}"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        form = "a mapping {family: {param: value}} or a list of family names"
        return [f"{where}.members: {form} (got {_short(names)})"]
    problems, good = _committee_members(where, names)
    member_keys, weights, own = _committee_keys(where, entries, good, problems)
    for m, params in member_keys.items():
        if "seed" in params:
            problems.append(f"{where}.members.{m}.seed: set `seed` on the committee; every member takes its seed")
            params = {k: v for k, v in params.items() if k != "seed"}
        model = detector_params(m)
        allowed = tuple(k for k in model.model_fields if k != "seed")
        problems += _check_section(source, f"detectors.{family}.members.{m}", model, params, allowed)
    problems += _committee_weights(where, names, weights)
    if len(good) >= 2 and len(good) == len(set(names)):  # the committee's own settings, beside valid members
        params_model = detector_params(family)
        allowed = tuple(k for k in params_model.model_fields if k not in ("members", "weights"))
        base: dict[str, Any] = {"members": {m: {} for m in good}}
        problems += _check_section(source, f"detectors.{family}", params_model, own, allowed, base)
    return problems


def _committee_members(where: str, names: list[str]) -> tuple[list[str], list[str]]:
    """(problems, the members that are known families and may be members) of a member list."""
    problems: list[str] = []
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"{where}.members: {', '.join(repeated)} listed twice; a committee has each family once")
    if len(set(names)) < 2:
        problems.append(f"{where}.members: a committee needs at least two member families (got {names})")
    good = []
    for m in dict.fromkeys(names):
        if m not in DETECTORS:
            known = ", ".join(DETECTORS.names())
            problems.append(f"{where}.members.{m}: unknown detector family {m!r}; known: {known}")
        elif is_committee(m):
            problems.append(f"{where}.members.{m}: a committee cannot be a member of a committee")
        elif "." in m or "/" in m:
            problems.append(f"{where}.members.{m}: a member's family name cannot contain '.' or '/'")
        else:
            good.append(m)
    return problems, good


def _committee_keys(
    where: str, entries: dict[str, Any], good: list[str], problems: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """A committee's flat keys sorted into (each good member's parameters, weights, the
    committee's own settings); malformed ones are added to ``problems``."""
    member_keys: dict[str, dict[str, Any]] = {m: {} for m in good}
    weights: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for key, value in entries.items():
        head, _, rest = key.partition(".")
        if key == "members":
            continue
        if head == "members":
            m, _, param = rest.partition(".")
            if not param:
                problems.append(f"{where}.members.{m}: a member's parameters are a mapping (got {_short(value)})")
            elif m in member_keys:
                member_keys[m][param] = value
        elif head == "weights" and rest:
            weights[rest] = value
        elif key == "weights":
            problems.append(f"{where}.weights: a mapping {{member: weight}} (got {_short(value)})")
        else:
            own[key] = value
    return member_keys, weights, own


def _committee_weights(where: str, names: list[str], weights: dict[str, Any]) -> list[str]:
    """Weights of members only, each >= 0, not all zero (a member without one weighs 1)."""
    problems: list[str] = []
    for m, w in weights.items():
        if m not in names:
            problems.append(f"{where}.weights.{m}: not a member; members: {', '.join(names)}")
        else:
            problems += _check_value(f"{where}.weights.{m}", _Weight, "w", w)
    largest = [_largest(weights.get(m, 1.0)) for m in dict.fromkeys(names)]
    if names and all(w is not None and w <= 0 for w in largest):
        problems.append(f"{where}.weights: every member's weight is 0; at least one needs a positive weight")
    return problems


def _is_dist(d: Any) -> bool:
    return isinstance(d, LogUniform | Uniform | IntRange | Choice)


def _largest(w: Any) -> float | None:
    """The largest number a weight (a value or a distribution) can take; None if not a number."""
    values = [v for _, v in _extremes(w)] if _is_dist(w) else [w]
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return max(nums) if nums else None


# ------------------------------------------------------------------------------ checks


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("loguniform", "uniform", "int", "choice", "fixed", "unknown", *PRUNING_KINDS) or _UNION_TAG.match(
            str(p)
        ):
            continue  # discriminator tags and union members (`dict[str,int]`), not keys
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


_UNION_TAG = re.compile(r"^(function-|(dict|list|tuple|set|frozenset)\[|(str|float|bool|none)$)")
MAX_PROBLEMS_SHOWN = 5  # a refusal is one line: the first problems, then how many more


def validation_message(source: str, err: ValidationError, prefix: str = "") -> str:
    """A pydantic error as lines ``<source>: <key>: <what> (got <value>)``, one per key (a value
    that fits no member of a union is reported once, for its first member)."""
    lines: dict[str, str] = {}
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {_short(got)})"
        loc = _format_loc(tuple(e["loc"]))
        lines.setdefault(loc, f"{source}: {prefix}{loc}: {msg}{shown}")
    return "\n".join(lines.values())


def one_line(source: str, problems: list[str]) -> str:
    """Several problems of one file as one line: the file named once, the problems (each
    ``<source>: <key>: ...``) joined by '; ', at most :data:`MAX_PROBLEMS_SHOWN` of them."""
    problems = list(dict.fromkeys(p for p in problems if p))
    head = f"{source}: "
    shown = [p.removeprefix(head) for p in problems[:MAX_PROBLEMS_SHOWN]]
    more = len(problems) - len(shown)
    return head + "; ".join(" ".join(p.split()) for p in shown) + (f" (and {more} more)" if more else "")


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _strict(model: type[BaseModel], values: dict[str, Any]) -> None:
    """Validate ``values`` against ``model`` strictly (JSON rules: no bool for numbers, no
    strings for numbers, lists for tuples)."""
    model.model_validate_json(json.dumps(values), strict=True)


def _check_section(
    source: str,
    where: str,
    model: type[BaseModel],
    entries: dict[str, Any],
    allowed: tuple[str, ...],
    base: dict[str, Any] | None = None,
) -> list[str]:
    """Every key of ``entries`` must be a field of ``model`` (and in ``allowed``); each fixed value,
    each bound and each choice must be a valid value of it (validated beside ``base``: valid
    values of the model's required fields)."""
    problems: list[str] = []
    for key, d in entries.items():
        if key not in allowed:
            problems.append(f"{source}: {where}.{key}: unknown parameter; allowed: {', '.join(allowed)}")
            continue
        problems += _check_value(f"{source}: {where}.{key}", model, key, d, base)
    return problems


def _check_value(loc: str, model: type[BaseModel], field: str, d: Any, base: dict[str, Any] | None = None) -> list[str]:
    """Problems of a value or distribution ``d`` of ``model``'s ``field`` (at ``loc``)."""
    problems = []
    if _is_dist(d):
        cases = _extremes(d)
        if isinstance(d, LogUniform | Uniform | IntRange) and d.low > d.high:
            problems.append(f"{loc}: low {d.low} > high {d.high}")
    else:
        cases = [("", d)]
    for sub, value in cases:
        try:
            _strict(model, {**(base or {}), field: value})
        except ValidationError as e:
            msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            problems.append(f"{loc}{'.' + sub if sub else ''}: {msg} (got {_short(value)})")
    return problems


def _check_values(spec: StudySpec, source: str) -> None:
    """Families, parameters and values, before any work starts; every problem at once."""
    problems = _check_section(source, "protocol", ProtocolConfig, spec.protocol, PROTOCOL_FIELDS)
    for family, entries in spec.detectors.items():
        if family not in DETECTORS:
            problems.append(
                f"{source}: detectors.{family}: unknown detector family {family!r}; known: "
                f"{', '.join(DETECTORS.names())}"
            )
            continue
        params = detector_params(family)
        allowed = tuple(k for k in params.model_fields)
        clash = [k for k in entries if k in PROTOCOL_FIELDS]
        for k in clash:
            problems.append(f"{source}: detectors.{family}.{k}: a protocol setting; put it under `protocol:`")
        rest = {k: v for k, v in entries.items() if k not in clash}
        if is_committee(family):
            problems += _check_committee(source, family, rest)
        else:
            problems += _check_section(source, f"detectors.{family}", params, rest, allowed)
    if problems:
        raise SpaceError(one_line(source, problems))

    n = spec.search.num_trials
    if isinstance(n, dict):
        unknown = set(n) - set(spec.families)
        missing = [f for f in spec.families if f not in n and spec.searched(f)]
        if unknown or missing:
            raise SpaceError(
                f"{source}: search.num_trials: give trials for each searched family "
                f"({', '.join(spec.families)}); unknown: {sorted(unknown) or 'none'}, missing: {missing or 'none'}"
            )
    for family in spec.families:
        for key, d in spec.searched(family).items():
            if spec.search.sampler == "grid" and not (isinstance(d, Choice) or isinstance(d, IntRange) and not d.log):
                where = "protocol" if key in PROTOCOL_FIELDS else f"detectors.{family}"
                problems.append(f"{source}: {where}.{key}: the grid sampler needs choice or int distributions")
        if spec.search.sampler != "grid" and n is None and spec.searched(family):
            problems.append(f"{source}: search.num_trials: null (the whole grid) needs sampler: grid")
    problems += _check_clean_set(spec, source)
    if spec.search.sampler == "nsga2" and len(spec.search.objectives) < 2:
        problems.append(f"{source}: search.objectives: the nsga2 sampler searches 2 or more objectives jointly")
    if spec.search.objectives and spec.search.sampler != "nsga2":
        problems.append(f"{source}: search.objectives: only the nsga2 sampler searches several objectives")
    problems += _check_pruning(spec, source)
    for column in spec.search.nested_folds:
        values = spec.group_values(column)
        if len(values) < 2:
            problems.append(
                f"{source}: search.nested_folds: {column} has one value among the victims ({values[0]}); nothing to "
                "hold out"
            )
    if problems:
        raise SpaceError(one_line(source, problems))


def _check_pruning(spec: StudySpec, source: str) -> list[str]:
    """Pruning that cannot apply: exact pruning of a mean (it can rise again), any pruning of a
    grid (every cell of an ablation is wanted) or of a multi-objective search."""
    p, s = spec.search.pruning, spec.search
    if p is None or p.kind == "none":
        return []
    if s.sampler == "grid":
        return [
            f"{source}: search.pruning.kind: {p.kind} with the grid sampler would leave cells of the ablation "
            "unmeasured; use kind: none (or sampler: tpe | random)"
        ]
    if s.sampler == "nsga2":
        return [f"{source}: search.pruning.kind: {p.kind}: a multi-objective (nsga2) search cannot prune; use none"]
    if p.kind == "exact" and s.objective.aggregate != "worst":
        return [
            f"{source}: search.pruning.kind: exact needs search.objective.aggregate: worst (a running "
            f"{s.objective.aggregate} can rise again, so stopping would not be exact); use successive_halving, median "
            "or none"
        ]
    return []


def _check_clean_set(spec: StudySpec, source: str) -> list[str]:
    """D_c (and a separate calibration budget) must fit in the reserved pool and leave images both
    to finetune and to calibrate on; a conformal threshold needs enough calibration images for
    the target FPR."""

    def values(key: str) -> list[Any]:
        d = spec.protocol.get(key, ProtocolConfig.model_fields[key].default)
        return [v for _, v in _extremes(d)] if isinstance(d, LogUniform | Uniform | IntRange | Choice) else [d]

    problems = []
    reserve = spec.data.reserve_size
    default_share = CommitteeParams.model_fields["reference_fraction"].default
    shares = {
        f: [v for _, v in _extremes(d)] if _is_dist(d) else [d]
        for f in spec.families
        if is_committee(f)
        for d in [spec.detectors[f].get("reference_fraction", default_share)]
    }
    for n, f, c, fpr, rule in itertools.product(
        values("clean_set_size"),
        values("calibration_fraction"),
        values("calibration_size"),
        values("target_fpr"),
        values("threshold_rule"),
    ):
        if n + (c or 0) > reserve:
            what = f"clean_set_size {n}" + (f" + calibration_size {c}" if c else "")
            key = "protocol.clean_set_size" if not c else "protocol.calibration_size"
            problems.append(
                f"{source}: {key}: {what} exceeds data.reserve_size {reserve} (the clean data reserved for the "
                "defender)"
            )
        n_cal = c if c is not None else round(n * f)
        if c is None and not 1 <= n_cal < n:
            problems.append(
                f"{source}: protocol.calibration_fraction: {f} of clean_set_size {n} leaves {n_cal} "
                "image(s) to calibrate on; at least 1 and fewer than the clean set are needed"
            )
        elif rule == "conformal" and n_cal < min_calibration(fpr):
            problems.append(
                f"{source}: protocol.target_fpr: {fpr} needs at least {min_calibration(fpr)} calibration images for a "
                f"conformal threshold, but the protocol calibrates on {n_cal}; calibrate on more images "
                "(calibration_fraction / calibration_size) or raise target_fpr"
            )
        else:
            for family, fractions in shares.items():
                for f_ref in fractions:
                    problems += _committee_split(source, family, n_cal, f_ref, fpr, rule)
    return problems


def _committee_split(source: str, family: str, n_cal: int, share: float, fpr: float, rule: str) -> list[str]:
    """A committee splits the calibration images: ``share`` reference its members' scales (at
    least MIN_REFERENCE of them), the rest calibrate the threshold (as many as the rule needs)."""
    from bdx_study.detectors.committee import MIN_REFERENCE

    ref = round(n_cal * share)
    where = f"{source}: detectors.{family}.reference_fraction"
    if ref < MIN_REFERENCE:
        return [
            f"{where}: {share} of the {n_cal} calibration images leaves {ref} to put the members on their clean "
            f"scales; at least {MIN_REFERENCE} are needed (raise it, or calibrate on more images)"
        ]
    if rule == "conformal" and n_cal - ref < min_calibration(fpr):
        return [
            f"{where}: {share} of the {n_cal} calibration images leaves {n_cal - ref} for the threshold; "
            f"target_fpr {fpr} needs at least {min_calibration(fpr)} (lower it, or calibrate on more images)"
        ]
    return []


def _load_plugins(raw: dict[str, Any], source: str) -> None:
    """Import the installed plugins (entry points) and the file's ``study.plugins``: their
    registrations are what the rest of the file is checked against."""
    try:
        load_entry_points()
    except PluginError as e:
        raise SpaceError(f"{source}: {e}") from None
    study = raw.get("study")
    modules = study.get("plugins", []) if isinstance(study, dict) else []
    if not isinstance(modules, list) or not all(isinstance(m, str) and re.match(MODULE_NAME, m) for m in modules):
        raise SpaceError(
            f"{source}: study.plugins: a list of module names (e.g. [my_pkg.my_attacks]), got {_short(modules)}"
        )
    try:
        load_plugins(modules)
    except PluginError as e:
        raise SpaceError(f"{source}: study.plugins: {e}") from None


def _kind_of(raw: Any) -> str:
    """What a YAML document is, in words (for a refusal)."""
    if raw is None:
        return "an empty file"
    if isinstance(raw, list):
        return f"a list of {len(raw)} item(s)"
    if isinstance(raw, str):
        return f"the text {_short(raw, 60)}"
    return f"a single value {_short(raw, 60)}"


def _other_kind_of_file(raw: dict[str, Any]) -> str | None:
    """The other bdx-study files a user may hand in by mistake where a study file is asked for."""
    if "victims" in raw or ("study" in raw and isinstance(raw["study"], dict)):
        return None
    if isinstance(raw.get("detectors"), dict) and ("default_detector" in raw or "domain" in raw):
        return "a recipe (written by `bdx-study analyze`; `fit --recipe` and `export --recipe` read it)"
    if str(raw.get("format", "")).startswith("bdx-study/"):
        return "a detector bundle's manifest (`detect --detector` takes the bundle's folder)"
    return None


def parse_space(raw: Any, source: str = "<study>") -> StudySpec:
    """Validate a loaded YAML document; raise SpaceError naming ``source``, key and value."""
    if not isinstance(raw, dict):
        raise SpaceError(
            f"{source}: a study file must be a mapping of sections (study:, victims:, detectors:, ...), got "
            f"{_kind_of(raw)}"
        )
    other = _other_kind_of_file(raw)
    if other:
        raise SpaceError(f"{source}: {other}, not a study file; give the study file (YAML with study:, victims:, ...)")
    if "defense" in raw:
        raise SpaceError(
            f"{source}: defense: the `defense:` section was replaced by `detectors:` and `protocol:`; put "
            "BaDExpert's hyperparameters under `detectors: {badexpert: {...}}` and clean_set_size, "
            "calibration_fraction and target_fpr under `protocol:`"
        )
    _load_plugins(raw, source)
    if isinstance(raw.get("detectors"), dict):  # `strip:` with nothing after it = the family's defaults
        detectors = {k: {} if v is None else v for k, v in raw["detectors"].items()}
        # a committee's nested members and weights become flat search-space keys (members.<m>.<param>)
        detectors = {k: flatten_committee(v) if is_committee(k) else v for k, v in detectors.items()}
        raw = {**raw, "detectors": detectors}
    try:
        text = json.dumps(raw)
    except (TypeError, ValueError) as e:  # e.g. YAML dates or sets, which no field takes
        raise SpaceError(f"{source}: a value that is not plain data ({e})") from None
    try:
        spec = StudySpec.model_validate_json(text, strict=True)
    except ValidationError as e:
        raise SpaceError(one_line(source, validation_message(source, e).splitlines())) from None
    _check_values(spec, source)
    try:
        victims = spec.victim_configs()
    except (ValueError, ValidationError) as e:
        raise SpaceError(f"{source}: victims.attacks: {e}") from None
    for v in victims:
        try:
            v.check_attack()
        except (ValueError, ValidationError) as e:
            raise SpaceError(f"{source}: victims.attacks: {e}") from None
        try:
            v.check_architecture()
        except ValueError as e:
            raise SpaceError(f"{source}: victims.architectures: {e} (dataset {v.dataset!r})") from None
    return spec


# ------------------------------------------------------------------------------ loading YAML

MAX_STUDY_BYTES = 1 << 20  # a study file is a page of YAML, not a data set
MAX_EXPANDED_NODES = 100_000  # after anchors and aliases are expanded


class _StudyLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys and reads 1e-3 as a number (YAML 1.1
    would make it a string)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_StudyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _expanded_size(value: Any, budget: int) -> int:
    """Nodes in ``value`` with aliases expanded, counting no further than ``budget``."""
    count, stack = 0, [value]
    while stack:
        v = stack.pop()
        count += 1
        if count > budget:
            break
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return count


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: what is wrong and where (line and column, 1-based)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return " ".join(str(e).split())
    mark = e.problem_mark or e.context_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    what = " ".join(p for p in (e.context, e.problem) if p)
    return f"{what}{where}"


def read_study_yaml(path: Path, what: str = "a study file", limit: int = MAX_STUDY_BYTES) -> Any:
    """Parse a study file (or another YAML file a user hands in, ``what``: a recipe) safely: a
    regular file of bounded size, UTF-8, no duplicate keys, no alias bombs."""
    kind = special_kind(path)
    if kind is not None or path.is_dir():
        raise SpaceError(f"{path}: {kind or 'a folder'}, not a regular file; {what} is read from a regular file")
    size = path.stat().st_size
    if size > limit:
        raise SpaceError(f"{path}: {size} bytes; {what} may have at most {limit}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpaceError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    try:
        raw = yaml.load(text, Loader=_StudyLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if _expanded_size(raw, MAX_EXPANDED_NODES) > MAX_EXPANDED_NODES:
        raise SpaceError(
            f"{path}: expands to more than {MAX_EXPANDED_NODES} values once YAML anchors and aliases are resolved"
        )
    return raw


def load_space(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study file."""
    p = Path(path)
    if not p.exists():
        raise SpaceError(f"{p}: no such study file")
    spec = parse_space(read_study_yaml(p), str(p))
    # Relative paths are taken from where the user runs the command (trials run elsewhere).
    root = spec.data.root
    if root is not None:
        resolved = str(Path(os.path.expandvars(root)).expanduser().resolve())
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"root": resolved})})
    return spec


def builtin_space(name: str = "quickstart") -> Path:
    """Path of a study file shipped with the package (search_spaces/<name>.yaml)."""
    from importlib import resources

    return Path(str(resources.files("bdx_study.search_spaces").joinpath(f"{name}.yaml")))
