"""The recipe: what ``bdx-study analyze`` prescribes, per detector family, and on what evidence.

One typed model, built here from a study's robust defaults (:meth:`Recipe.of`), written as
``recipe.yaml`` (:meth:`Recipe.write`) and read back, strictly, by ``export`` and ``fit``
(:meth:`Recipe.load`). The file holds, in this order:

- ``study``, ``study_dir``, ``made_from`` (the stored results it was made from: ``export``
  refuses it once the study's tables hold more), ``default_detector`` and how it was chosen;
- ``domain``: the datasets, architectures, attacks, input shapes and class counts of the
  victims it was validated on (:mod:`.domain` warns outside them);
- ``detectors``: per family its ``defaults`` (exact parameters), ``protocol``, ``seed_policy``
  (the refit whose seed and clean-set draw ``export`` uses), ``selection`` (the rule and the
  chosen trial) and ``evidence`` (evaluation-split figures, uncertainty, held-out folds).

Figures named after the study's objective (``evaluation_worst_auroc_correct_only``, ...) are
carried as written; what the readers use is typed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from bdx_study._io import write_text_atomic
from bdx_study.detectors import DETECTORS
from bdx_study.metrics import HEADLINE
from bdx_study.protocol import ProtocolConfig
from bdx_study.space import SpaceError, StudySpec, detector_params, read_study_yaml, validation_message

if TYPE_CHECKING:
    from .robust import RobustDefaults

MAX_RECIPE_BYTES = 8 << 20  # a recipe carries per-victim evidence: larger than a study file, still a page set


def _clean(v: Any) -> Any:
    """A value as the recipe stores it: floats rounded to 6 digits, NaN as null, numpy scalars
    as Python ones; lists and tuples element by element."""
    if isinstance(v, list | tuple):
        return [_clean(x) for x in v]
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


class _Open(BaseModel):
    """A part of the recipe whose named fields are typed; other keys are carried as written."""

    model_config = ConfigDict(extra="allow")


class SeedPolicy(_Open):
    rule: str | None = None
    fit: str | None = None  # the fit (trial or refit) whose seed and D_c draw export uses
    seed: int | None = None
    clean_set_seed: int | None = None


class RecipeSelection(_Open):
    """The rule and its pick; the pick's selection-split figures follow, named by the objective."""

    rule: str | None = None
    chosen_trial: str | None = None


class HeldOutFold(_Open):
    """One held-out group: its name (``attack=blend``), whether strictly held out, and figures
    named ``held_out_<aggregate>_<metric>``."""

    held_out: str | None = None
    strictly_held_out: bool | None = None

    def figure(self) -> tuple[str, float] | None:
        """(``<aggregate>_<metric>``, value) of the held-out figure, if it is a finite number."""
        not_figures = ("held_out_ci95", "held_out_victims", "held_out_worst_clean_acc_drop")
        extra = self.model_extra or {}
        key = next((k for k in extra if k.startswith("held_out_") and k not in not_figures), None)
        value = extra.get(key) if key is not None else None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return None
        return key.removeprefix("held_out_"), float(value)  # type: ignore[union-attr]


class HeldOut(_Open):
    note: str | None = None
    folds: list[HeldOutFold] | None = None


class Evidence(_Open):
    """The figures behind a family's defaults; its headline figures (``evaluation_<aggregate>_
    <metric>``, named by the objective) are written first, after the protocol note."""

    protocol_note: str | None = None
    uncertainty: dict[str, Any] | None = None
    tuned_victims: dict[str, Any] | None = None
    held_out: HeldOut | None = None

    @model_serializer(mode="wrap")
    def _headline_first(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        first = [k for k in data if k == "protocol_note"] + [k for k in data if k.startswith("evaluation_")]
        return {k: data[k] for k in [*first, *(k for k in data if k not in first)]}


class FamilyRecipe(BaseModel):
    """One family's entry: what it prescribes and the evidence for it."""

    model_config = ConfigDict(extra="allow")
    defaults: dict[str, Any]
    protocol: dict[str, Any]
    seed_policy: SeedPolicy | None = None
    selection: RecipeSelection | None = None
    evidence: Evidence | None = None

    @property
    def chosen_trial(self) -> str | None:
        return self.selection.chosen_trial if self.selection is not None else None

    @property
    def held_out_folds(self) -> list[HeldOutFold]:
        held = self.evidence.held_out if self.evidence is not None else None
        return (held.folds if held is not None else None) or []

    def config(self) -> tuple[dict[str, Any], ProtocolConfig]:
        """(family parameters, protocol) the entry prescribes: its defaults and protocol, with the
        seed policy's seed and clean-set draw applied (the refit the policy chose, so that an
        export does not reproduce a lucky fit)."""
        params = dict(self.defaults)
        protocol = dict(self.protocol)
        policy = self.seed_policy or SeedPolicy()
        if policy.seed is not None:
            params["seed"] = policy.seed
        if policy.clean_set_seed is not None:
            protocol["clean_set_seed"] = policy.clean_set_seed
        return params, ProtocolConfig.model_validate(protocol)

    @classmethod
    def of(cls, rd: RobustDefaults) -> FamilyRecipe:
        return cls.model_validate(
            {
                "defaults": dict(rd.params),  # exact values: export uses this very config ...
                "protocol": dict(rd.protocol),
                # ... with this seed and D_c draw
                "seed_policy": {k: v for k, v in rd.seed_policy.items() if k != "fit_kind"},
                "selection": _selection(rd),
                "evidence": _evidence(rd),
            }
        )


class Domain(_Open):
    """What the recipe was validated on: outside it, ``export`` and ``fit`` warn."""

    datasets: list[str] | None = None
    architectures: list[str] | None = None
    attacks: list[str] | None = None
    input_shapes: list[list[int]] | None = None
    num_classes: list[int] | None = None
    note: str | None = None

    @classmethod
    def of(cls, spec: StudySpec) -> Domain:
        from bdx_study.data import dataset_info

        victims = spec.victim_configs()
        return cls(
            datasets=sorted({v.dataset for v in victims}),
            architectures=sorted({v.architecture for v in victims}),
            attacks=sorted({v.attack.name for v in victims}),
            input_shapes=[list(s) for s in sorted({tuple(dataset_info(v.dataset).input_shape) for v in victims})],
            num_classes=sorted({dataset_info(v.dataset).num_classes for v in victims}),
            note="the settings were chosen and checked on these victims only; see evidence.held_out for how they "
            "transfer to an attack or seed they were not tuned on",
        )


class Recipe(BaseModel):
    """A recipe file, typed. :meth:`load` reads one as strictly as a study file."""

    model_config = ConfigDict(extra="allow")
    study: str | None = None
    study_dir: str | None = None
    made_from: dict[str, int] | None = None
    default_detector: str | None = None
    default_detector_chosen_by: dict[str, Any] | None = None
    domain: Domain | None = None
    detectors: dict[str, FamilyRecipe]
    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        """The file it was read from or written to (None for one only built in memory)."""
        return self._path

    def family(self, detector: str | None = None) -> tuple[str, FamilyRecipe]:
        """(family, its entry): ``detector``'s, or the recipe's default detector's."""
        family = detector or self.default_detector
        if detector is None and family not in self.detectors:
            raise ValueError(
                f"{self.path or 'recipe'}: default_detector: {family!r} has no robust defaults under detectors (it "
                f"has: {', '.join(self.detectors)}); pass --detector with one of them"
            )
        if family not in self.detectors:
            raise ValueError(
                f"{self.path or 'recipe'}: no robust defaults for detector {family!r}; the recipe has: "
                f"{', '.join(self.detectors)}"
            )
        return str(family), self.detectors[family]

    @classmethod
    def of(
        cls, per_family: dict[str, RobustDefaults], spec: StudySpec, study_dir: Path, made_from: dict[str, int]
    ) -> Recipe:
        """The recipe of a study's robust defaults: per family, the chosen parameters and protocol,
        the rule that chose them and the per-victim evidence. ``default_detector`` is what
        ``export`` and ``fit`` use unless told otherwise: the family the selection rule favours
        across families (:func:`~.robust.family_board`). ``made_from`` counts the stored results
        (trials, refits, held-out evaluations) it was made from."""
        from .robust import family_board

        board = family_board(per_family)
        obj = spec.search.objective
        return cls(
            study=spec.study.name,
            study_dir=str(study_dir),
            made_from=dict(made_from),
            default_detector=str(board["detector"].iloc[0]),
            default_detector_chosen_by={
                "rule": "the selection rule across families: feasible first, then the best "
                f"{obj.aggregate}-case {obj.metric} on the selection split (averaged over the refits of the chosen "
                "config, where it was refitted), then the best mean; evaluation-split figures play no part",
                "board": [{k: _clean(v) for k, v in r.items()} for r in board.to_dict(orient="records")],
            },
            domain=Domain.of(spec),
            detectors={family: FamilyRecipe.of(rd) for family, rd in per_family.items()},
        )

    def write(self, path: Path) -> Path:
        """Write the recipe as YAML (the fields it was given, in the model's order)."""
        data = self.model_dump(mode="python", exclude_unset=True)
        write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
        self._path = path
        return path

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """Read a recipe as strictly as a study file: the same YAML guards (a regular file of
        bounded size, no duplicate keys, no alias bombs), typed validation without coercion (a
        string is no number), and every family's defaults and protocol checked by that family's
        own models. One error naming the file and key."""
        if not path.exists():
            raise FileNotFoundError(f"{path}: no recipe; run `bdx-study analyze` first")
        raw = read_study_yaml(path, "a recipe", MAX_RECIPE_BYTES)
        if raw is None:
            raise SpaceError(f"{path}: an empty file, not a recipe; `bdx-study analyze` writes one (recipe.yaml)")
        if isinstance(raw, dict) and "victims" in raw:
            raise SpaceError(
                f"{path}: a study file, not a recipe; run `bdx-study analyze --space {path}` (after its launch) to "
                "write its recipe.yaml"
            )
        if isinstance(raw, dict) and str(raw.get("format", "")).startswith("bdx-study/"):
            raise SpaceError(f"{path}: a detector bundle's manifest, not a recipe; give the recipe.yaml analyze wrote")
        if not isinstance(raw, dict) or "detectors" not in raw:
            raise SpaceError(
                f"{path}: not a recipe of this bdx-study version (no `detectors:`); run `bdx-study analyze`"
            )
        recipe = cls._validated(path, raw, cls, "")
        if not recipe.detectors:
            raise SpaceError(f"{path}: detectors: empty; a recipe holds the defaults of at least one family")
        for family, entry in recipe.detectors.items():
            if family not in DETECTORS:
                raise SpaceError(
                    f"{path}: detectors.{family}: not a detector family of this installation; known: "
                    f"{', '.join(DETECTORS.names())}"
                )
            cls._validated(path, entry.defaults, detector_params(family), f"detectors.{family}.defaults.")
            cls._validated(path, entry.protocol, ProtocolConfig, f"detectors.{family}.protocol.")
        recipe._path = path
        return recipe

    @staticmethod
    def _validated(path: Path, data: Any, model: Any, where: str) -> Any:
        """``data`` validated strictly by ``model`` (through JSON, as YAML gives it); the first
        error on one line."""
        try:
            return model.model_validate_json(json.dumps(data, default=str), strict=True)
        except ValidationError as e:
            raise SpaceError(_first(validation_message(str(path), e, prefix=where))) from None


def _first(message: str) -> str:
    """The first of several validation errors, on one line, saying how many more there are."""
    lines = message.splitlines()
    return lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


# ------------------------------------------------------------------------------------ a family's entry


def _selection(rd: RobustDefaults) -> dict[str, Any]:
    return {
        "rule": f"best {rd.aggregate}-case {rd.objective} across victims on the selection split, among "
        f"trials whose worst-case clean_acc_drop <= {rd.max_clean_acc_drop}; ties -> better mean",
        "chosen_trial": rd.chosen.trial_id,
        f"selection_{rd.aggregate}_{rd.objective}": _clean(rd.chosen.score),
        f"selection_mean_{rd.objective}": _clean(rd.chosen.mean),
        "feasible": rd.chosen.feasible,
        "trials_considered": int(len(rd.leaderboard)),
    }


def _evidence(rd: RobustDefaults) -> dict[str, Any]:
    summary = rd.evaluation_summary
    per_victim = [
        {
            "victim": r["victim_name"],
            "victim_id": r["victim_id"],
            "attack": r["attack"],
            **{m: _clean(r[m]) for m in HEADLINE if m in r},
        }
        for _, r in rd.per_victim.iterrows()
    ]
    return {
        "protocol_note": "metrics on each victim's evaluation split, disjoint from the defender's clean "
        "finetune and calibration data and from the selection split the search optimized on; "
        "*_correct_only = the paper's protocol, *_all_inputs = every input",
        f"evaluation_worst_{rd.objective}": _clean(summary["worst"]),
        f"evaluation_mean_{rd.objective}": _clean(summary["mean"]),
        "uncertainty": _uncertainty(rd),
        "tuned_victims": {
            "note": "unseen inputs, but the defaults were tuned on these victims",
            "per_victim": per_victim,
        },
        "held_out": {
            "note": "for each group, defaults picked without that group's victims, measured on their evaluation "
            "split; strictly_held_out says whether the pick could have been influenced by them (why says how); "
            "held_out_ci95 is a bootstrap interval over the held-out victims' evaluation inputs; "
            "transfer_gap = held-out figure - the same figure on the victims the pick was tuned on",
            "folds": [{k: _clean(v) for k, v in f.items()} for f in rd.held_out],
        },
    }


def _uncertainty(rd: RobustDefaults) -> dict[str, Any]:
    spread = rd.refit
    return {
        "chosen_by": rd.chosen_by,
        f"{rd.aggregate}_{rd.objective}_bootstrap_95ci_over_evaluation_inputs": [
            _clean(rd.bootstrap[0]),
            _clean(rd.bootstrap[1]),
        ],
        f"{rd.aggregate}_{rd.objective}_over_fits": {
            "fits": int(spread.get("fits", 0)),
            "mean": _clean(spread.get("mean", math.nan)),
            "std": _clean(spread.get("std", math.nan)),
            "ci95_of_mean": [_clean(spread.get("ci_low", math.nan)), _clean(spread.get("ci_high", math.nan))],
            "min": _clean(spread.get("min", math.nan)),
            "max": _clean(spread.get("max", math.nan)),
        },
        "fits": [{k: _clean(v) for k, v in r.items() if k != "kind"} for r in rd.fits.to_dict(orient="records")],
    }
