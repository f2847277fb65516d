"""Study definitions: the YAML format of search_spaces/*.yaml, validated before any work starts.

A study file has these sections (unknown keys anywhere are errors):

    study:     name, storage (folder for the victim cache, tables, Ray and Optuna state), description
    tracking:  uri (MLflow tracking URI; null = MLflow's default, sqlite:///mlflow.db in the
               working directory), experiment (default: the study name)
    data:      root, download, reserve_size, eval_size (held-out images: selection + evaluation),
               selection_fraction, train_size, split_seed
    victims:   a grid: datasets x architectures x attacks x poison_rates x seeds x epochs, plus
               the victims' training recipe
    defense:   BaDExpert hyperparameters (DefenseConfig field names): a fixed value, or a
               distribution {dist: loguniform|uniform|int|choice, ...}
    search:    sampler (tpe | random | grid), num_trials, max_concurrent, seed, objective,
               constraint
    resources: cpu and gpu per trial (fractions allowed), max_failures

Errors name the file, the key and the value, and say what is allowed.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import optuna
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
from bdx_study._registry import Registry
from bdx_study.archs import ARCHITECTURES
from bdx_study.attacks import ATTACKS
from bdx_study.data import DATASETS
from bdx_study.defense import DefenseConfig
from bdx_study.metrics import HIGHER_IS_BETTER, LOWER_IS_BETTER
from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimConfig


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
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="study id: letters, digits, _ . -")
    storage: str = Field("bdx_runs", description="root folder (or shared path) for caches, tables and state")
    description: str = ""


class TrackingSection(StrictModel):
    uri: str | None = Field(None, description="MLflow tracking URI; null = MLflow's default")
    experiment: str | None = Field(None, description="MLflow experiment; null = the study name")

    @field_validator("uri")
    @classmethod
    def _no_file_store(cls, v: str | None) -> str | None:
        if v is not None and (v.startswith("file:") or "://" not in v and not v.startswith("databricks")):
            raise ValueError(
                f"{v!r} is a file-store URI, which MLflow 3 no longer accepts; use sqlite:///PATH.db or http://HOST:PORT"
            )
        return v


class AttackEntry(StrictModel):
    """One attack of the grid: a registered name and that attack's parameters."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    @model_validator(mode="after")
    def _valid_params(self) -> AttackEntry:
        cls = ATTACKS.get(self.name)  # unknown names list the known ones
        cls.Params.model_validate(self.model_extra or {})
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
            registry.get(name)  # unknown names fail, listing the known ones
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
    aggregate: Literal["worst", "mean"] = Field("worst", description="across victims")

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


class SearchSection(StrictModel):
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    num_trials: int | None = Field(16, ge=1, description="trials to run; for grid, null = the whole grid")
    max_concurrent: int = Field(2, ge=1, description="trials at once (also keeps TPE from degrading to random)")
    seed: int = 0
    objective: Objective = Objective()
    constraint: Constraint = Constraint()


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


class StudySpec(StrictModel):
    """A whole study file."""

    study: StudySection
    tracking: TrackingSection = TrackingSection()
    data: DataConfig = DataConfig()
    victims: VictimGrid
    defense: dict[str, Distribution] = Field(default_factory=dict)
    search: SearchSection = SearchSection()
    resources: ResourcesSection = ResourcesSection()

    @field_validator("defense")
    @classmethod
    def _defense_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        known = DefenseConfig.model_fields
        for key in v:
            if key not in known:
                raise ValueError(f"unknown defense hyperparameter {key!r}; known: {', '.join(known)}")
        return v

    # -- derived views ------------------------------------------------------------------------

    @property
    def searched(self) -> dict[str, SearchDistribution]:
        return {k: d for k, d in self.defense.items() if isinstance(d, LogUniform | Uniform | IntRange | Choice)}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: d for k, d in self.defense.items() if k not in self.searched}

    def defense_config(self, sampled: dict[str, Any]) -> DefenseConfig:
        return DefenseConfig.model_validate({**self.fixed, **sampled})

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

    def optuna_space(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {k: to_optuna(d) for k, d in self.searched.items()}

    def grid(self) -> dict[str, list[Any]]:
        return {k: grid_values(d) for k, d in self.searched.items()}

    @property
    def num_trials(self) -> int:
        if self.search.num_trials is not None:
            return self.search.num_trials
        return math.prod(len(v) for v in self.grid().values())

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


# ------------------------------------------------------------------------------ loading


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in ("loguniform", "uniform", "int", "choice", "fixed", "unknown") or str(p).startswith("function-"):
            continue  # discriminator tags, not keys
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def _validation_message(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{source}: {_format_loc(tuple(e['loc']))}: {msg}{shown}")
    return "\n".join(lines)


def _check_defense_values(spec: StudySpec, source: str) -> None:
    """Each fixed value and each bound or choice of a distribution must be a valid DefenseConfig
    value (e.g. lr > 0), and the clean set must fit in the reserved pool."""
    problems: list[str] = []
    searched = spec.searched
    for key, d in spec.defense.items():
        cases = _extremes(searched[key]) if key in searched else [("", d)]
        for where, value in cases:
            try:
                DefenseConfig.model_validate({key: value})
            except ValidationError as e:
                msg = e.errors()[0]["msg"].removeprefix("Value error, ")
                problems.append(f"{source}: defense.{key}{'.' + where if where else ''}: {msg} (got {value!r})")
        if isinstance(d, LogUniform | Uniform | IntRange) and d.low > d.high:
            problems.append(f"{source}: defense.{key}: low {d.low} > high {d.high}")
    if spec.search.sampler == "grid":
        for key, d in spec.searched.items():
            if not isinstance(d, Choice) and not (isinstance(d, IntRange) and not d.log):
                problems.append(f"{source}: defense.{key}: the grid sampler needs choice or int distributions")
    if not problems:

        def values(key: str) -> list[Any]:
            if key in searched:
                return [v for _, v in _extremes(searched[key])]
            return [spec.fixed.get(key, DefenseConfig.model_fields[key].default)]

        for n in values("clean_set_size"):
            if n > spec.data.reserve_size:
                problems.append(
                    f"{source}: defense.clean_set_size: {n} exceeds data.reserve_size {spec.data.reserve_size} "
                    "(the clean data reserved for the defender)"
                )
            for f in values("calibration_fraction"):
                n_cal = round(n * f)
                if not 1 <= n_cal < n:
                    problems.append(
                        f"{source}: defense.calibration_fraction: {f} of clean_set_size {n} leaves {n_cal} "
                        "image(s) to calibrate on; at least 1 and fewer than the clean set are needed"
                    )
    if problems:
        raise SpaceError("\n".join(problems))


def parse_space(raw: Any, source: str = "<study>") -> StudySpec:
    """Validate a loaded YAML document; raise SpaceError naming ``source``, key and value."""
    if not isinstance(raw, dict):
        raise SpaceError(f"{source}: a study file must be a mapping of sections, got {type(raw).__name__}")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as e:
        raise SpaceError(_validation_message(source, e)) from None
    _check_defense_values(spec, source)
    try:
        for v in spec.victim_configs():
            v.build_attack()
    except (ValueError, ValidationError) as e:
        raise SpaceError(f"{source}: victims.attacks: {e}") from None
    return spec


def load_space(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a study file."""
    p = Path(path)
    if not p.is_file():
        raise SpaceError(f"{p}: no such study file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{p}: not valid YAML: {e}") from None
    spec = parse_space(raw, str(p))
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
