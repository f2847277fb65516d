"""Export a study's detector: one family with its robust defaults, fitted on one victim model and
written as a bundle (safetensors + manifest), also logged to MLflow as a pyfunc model.

The fitted components come from the study's stage cache when the chosen trial left them there,
so the bundle holds the very expert (or pool, or statistics) the trial was scored with;
otherwise they are fitted now with the same parameters and seed."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from bdx_study._io import interrupts_deferred
from bdx_study.detector import save_bundle, update_provenance
from bdx_study.detectors import DETECTORS, create_detector
from bdx_study.protocol import ProtocolConfig
from bdx_study.space import SpaceError, StudySpec, detector_params, read_study_yaml, validation_message
from bdx_study.stages import StageStore, run_detector
from bdx_study.tables import StudyTables
from bdx_study.training import pick_device
from bdx_study.victims import VictimCache, VictimConfig

from .domain import check_domain, render_warnings, unseen_triggers


def pick_victim(spec: StudySpec, which: str | None) -> VictimConfig:
    """The victim named (by name, id or id prefix) or, by default, the first backdoored one."""
    victims = spec.victim_configs()
    if which is None:
        backdoored = [v for v in victims if v.attack.name != "none"]
        return (backdoored or victims)[0]
    for v in victims:
        if which in (v.name, v.key) or v.key.startswith(which):
            return v
    raise ValueError(f"no victim {which!r} in study {spec.study.name!r}; known: {', '.join(v.name for v in victims)}")


MAX_RECIPE_BYTES = 8 << 20  # a recipe carries per-victim evidence: larger than a study file, still a page set


class _SeedPolicy(BaseModel):
    model_config = ConfigDict(extra="allow")
    seed: int | None = None
    clean_set_seed: int | None = None


class _HeldOutFold(BaseModel):
    model_config = ConfigDict(extra="allow")
    held_out: str | None = None
    strictly_held_out: bool | None = None


class _HeldOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    folds: list[_HeldOutFold] | None = None


class _Evidence(BaseModel):
    model_config = ConfigDict(extra="allow")
    held_out: _HeldOut | None = None


class _RecipeEntry(BaseModel):
    """What a family's entry prescribes, and the parts of its evidence that fit and export read
    (the rest is carried as written)."""

    model_config = ConfigDict(extra="allow")
    defaults: dict[str, Any]
    protocol: dict[str, Any]
    seed_policy: _SeedPolicy | None = None
    selection: dict[str, Any] | None = None
    evidence: _Evidence | None = None


class _Domain(BaseModel):
    model_config = ConfigDict(extra="allow")
    datasets: list[str] | None = None
    architectures: list[str] | None = None
    attacks: list[str] | None = None
    input_shapes: list[list[int]] | None = None
    num_classes: list[int] | None = None


class _Recipe(BaseModel):
    model_config = ConfigDict(extra="allow")
    study: str | None = None
    default_detector: str | None = None
    detectors: dict[str, _RecipeEntry]
    domain: _Domain | None = None
    made_from: dict[str, int] | None = None


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a recipe as strictly as a study file: the same YAML guards (a regular file of bounded
    size, no duplicate keys, no alias bombs), typed validation without coercion (a string is no
    number) of what it prescribes, and every family's defaults and protocol checked by that
    family's own models. One error naming the file and key."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no recipe; run `bdx-study analyze` first")
    raw = read_study_yaml(path, "a recipe", MAX_RECIPE_BYTES)
    if not isinstance(raw, dict) or "detectors" not in raw:
        raise SpaceError(f"{path}: not a recipe of this bdx-study version (no `detectors:`); run `bdx-study analyze`")
    try:
        _Recipe.model_validate_json(json.dumps(raw, default=str), strict=True)
    except ValidationError as e:
        raise SpaceError(_first(validation_message(str(path), e))) from None
    if not raw["detectors"]:
        raise SpaceError(f"{path}: detectors: empty; a recipe holds the defaults of at least one family")
    for family, entry in raw["detectors"].items():
        if family not in DETECTORS:
            raise SpaceError(
                f"{path}: detectors.{family}: not a detector family of this installation; known: "
                f"{', '.join(DETECTORS.names())}"
            )
        for key, model in (("defaults", detector_params(family)), ("protocol", ProtocolConfig)):
            try:
                model.model_validate_json(json.dumps(entry[key], default=str), strict=True)
            except ValidationError as e:
                where = f"detectors.{family}.{key}."
                raise SpaceError(_first(validation_message(str(path), e, prefix=where))) from None
    return raw


def _first(message: str) -> str:
    """The first of several validation errors, on one line, saying how many more there are."""
    lines = message.splitlines()
    return lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


def read_recipe(path: Path, detector: str | None) -> tuple[str, dict[str, Any]]:
    """(family, its entry) of a recipe written by ``bdx-study analyze``."""
    return recipe_entry(load_recipe(path), path, detector)


def recipe_entry(recipe: dict[str, Any], path: Path, detector: str | None) -> tuple[str, dict[str, Any]]:
    """(family, its entry) of a recipe already read by :func:`load_recipe`: ``detector``'s, or
    the recipe's default detector's."""
    family = detector or recipe.get("default_detector")
    if family not in recipe["detectors"]:
        raise ValueError(
            f"{path}: no robust defaults for detector {family!r}; the recipe has: {', '.join(recipe['detectors'])}"
        )
    return str(family), recipe["detectors"][family]


def check_recipe_current(recipe: dict[str, Any], path: Path, spec: StudySpec, study_dir: Path) -> None:
    """Refuse a recipe of this study made from fewer stored results than its tables hold now
    (trials finished, or refits run, since ``analyze`` wrote it): its choice may be outdated."""
    if recipe.get("study") != spec.study.name:
        return  # another study's recipe, applied here on purpose: its counts say nothing of these tables
    now = StudyTables(study_dir).counts()
    made = recipe.get("made_from")
    if not isinstance(made, dict):
        if any(now.values()):
            raise ValueError(
                f"{path}: records no count of the results it was made from (written by an older bdx-study); run "
                "`bdx-study analyze` again, then export"
            )
        return
    recorded = {k: made.get(k, 0) for k in now}
    grown = [
        f"{n} {k} (the recipe was made from {recorded[k]})"
        for k, n in now.items()
        if not isinstance(recorded[k], int) or n > recorded[k]
    ]
    if grown:
        raise ValueError(
            f"{path}: older than the study's tables, which now hold {', '.join(grown)}; run `bdx-study analyze` "
            "again, then export"
        )


def recipe_config(entry: dict[str, Any]) -> tuple[dict[str, Any], ProtocolConfig]:
    """(family parameters, protocol) a recipe entry prescribes: its defaults and protocol, with
    the seed policy's seed and clean-set draw applied (the refit the policy chose, so that an
    export does not reproduce a lucky fit)."""
    params = dict(entry["defaults"])
    protocol = dict(entry["protocol"])
    policy = entry.get("seed_policy") or {}
    if policy.get("seed") is not None:
        params["seed"] = policy["seed"]
    if policy.get("clean_set_seed") is not None:
        protocol["clean_set_seed"] = policy["clean_set_seed"]
    return params, ProtocolConfig.model_validate(protocol)


def export_detector(
    spec: StudySpec,
    study_dir: Path,
    out: Path,
    *,
    detector: str | None = None,
    victim: str | None = None,
    recipe_path: Path | None = None,
    log_to_mlflow: bool = True,
    force: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Fit ``detector`` (default: the recipe's) with its robust defaults on the chosen victim,
    evaluate it on that victim's evaluation split, and write the bundle. Returns (bundle path,
    metrics)."""
    recipe_path = recipe_path or study_dir / "recipe.yaml"
    recipe = load_recipe(recipe_path)
    family_name, entry = recipe_entry(recipe, recipe_path, detector)
    check_recipe_current(recipe, recipe_path, spec, study_dir)
    DETECTORS.get(family_name)
    params, protocol = recipe_config(entry)
    family = create_detector(family_name, params)
    vcfg = pick_victim(spec, victim)
    record = VictimCache(spec.storage_root() / "victims").load(vcfg)
    if record is None:
        raise FileNotFoundError(f"victim {vcfg.name} is not in the cache; run `bdx-study launch` first")
    device = pick_device(prefer_gpu=spec.resources.gpu > 0)  # where the study's trials ran
    splits = vcfg.data.splits(vcfg.dataset)
    outside = check_domain(
        recipe,
        dataset=vcfg.dataset,
        architecture=vcfg.architecture,
        input_shape=splits.info.input_shape,
        num_classes=splits.info.num_classes,
        attack=vcfg.attack.name,
        detector=family_name,
    )
    if outside:  # normally never: the study's own victims lie inside its recipe's domain
        print(render_warnings(outside, command="export"), file=sys.stderr, flush=True)
    store = StageStore(spec.storage_root() / "stages" if spec.study.stage_cache else None)
    model = record.load_model(device)
    run = run_detector(
        store,
        family,
        protocol,
        victim_key=vcfg.key,
        model=model,
        splits=splits,
        attack=record.load_attack(),
        layout=vcfg.data.layout(),
        device=device,
    )
    metrics = run.evaluation.metrics
    ids_path = study_dir / "study.json"
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    trial_id = entry.get("selection", {}).get("chosen_trial")
    provenance = {
        "study": spec.study.name,
        "study_dir": str(study_dir),
        "trial": trial_id,
        "trial_metrics": _trial_row_metrics(study_dir, trial_id, vcfg.key),
        "recipe": str(recipe_path),
        "stage_keys": run.stage_keys,
        "components_from_stage_cache": run.fitted_now == 0,
        "victim": vcfg.name,
        "victim_id": vcfg.key,
        "victim_config": vcfg.model_dump(mode="json", exclude={"data": {"root"}}),
        "mlflow": {
            "tracking_uri": ids.get("tracking_uri"),
            "experiment_id": ids.get("experiment_id"),
            "parent_run_id": ids.get("parent_run_id"),
            "trial_run_id": _trial_run_id(ids, trial_id),
        },
        "metrics_protocol": "evaluation split of the victim's dataset, disjoint from the defender's clean data",
        "domain_warnings": outside,
        "unchecked": unseen_triggers(recipe, family_name),
    }
    with interrupts_deferred():  # replacing a bundle: all of it or none
        bundle = save_bundle(
            out,
            family,
            run.fitted,
            model,
            threshold=run.evaluation.threshold,
            target_fpr=protocol.target_fpr,
            protocol=protocol.model_dump(mode="json"),
            architecture=vcfg.architecture,
            info=splits.info,
            metrics={**metrics, **run.costs},
            provenance=provenance,
            reference=run.reference,
            force=force,
        )
    if log_to_mlflow and ids.get("tracking_uri") and ids.get("experiment_id"):
        try:
            model_uri = log_bundle_to_mlflow(bundle, ids, name=f"detector-{family_name}-{vcfg.name}")
            update_provenance(bundle, mlflow={**provenance["mlflow"], "model_uri": model_uri})
        except Exception as e:
            warnings.warn(f"logging the detector to MLflow failed ({type(e).__name__}: {e})", stacklevel=2)
    return bundle, metrics


def _trial_row_metrics(study_dir: Path, trial_id: str | None, victim_id: str) -> dict[str, Any]:
    """The chosen trial's own figures for this victim (the export uses the same fitted
    components, so they agree)."""
    if trial_id is None:
        return {}
    try:
        rows = StudyTables(study_dir).read_part("trials", trial_id).to_pylist()
    except OSError:
        return {}
    keys = ("auroc_correct_only", "tpr_at_threshold_correct_only", "fpr_at_threshold_correct_only", "threshold")
    return {k: r[k] for r in rows if r.get("victim_id") == victim_id for k in keys if k in r}


def _trial_run_id(ids: dict[str, Any], trial_id: str | None) -> str | None:
    if not (trial_id and ids.get("tracking_uri") and ids.get("experiment_id")):
        return None
    try:
        from mlflow.tracking import MlflowClient

        from bdx_study.trials.tracking import children_filter

        flt = children_filter(ids.get("parent_run_id"), "trial", trial_id)
        runs = MlflowClient(ids["tracking_uri"]).search_runs([ids["experiment_id"]], filter_string=flt, max_results=1)
        return runs[0].info.run_id if runs else None
    except Exception:
        return None


def log_bundle_to_mlflow(bundle: Path, ids: dict[str, Any], *, name: str) -> str:
    """Log the bundle as an MLflow pyfunc model ("models from code": no pickled Python object)
    in a run nested under the study's parent run; returns the model URI."""
    import mlflow

    import bdx_study

    mlflow.set_tracking_uri(ids["tracking_uri"])
    code = Path(bdx_study.__file__).parent / "mlflow_model.py"
    manifest = json.loads((bundle / "manifest.json").read_text())
    with mlflow.start_run(
        experiment_id=ids["experiment_id"],
        run_name=name,
        tags={
            "mlflow.parentRunId": ids.get("parent_run_id") or "",
            "bdx.kind": "export",
            "bdx.study": ids.get("study", ""),
            "bdx.detector": manifest["detector"],
        },
    ):
        family = create_detector(manifest["detector"], manifest["params"])
        mlflow.log_params(
            {
                "detector": manifest["detector"],
                **manifest["protocol"],
                **family.params.to_params(),
                "threshold": manifest["threshold"],
            }
        )
        mlflow.log_metrics({k: v for k, v in manifest["metrics"].items() if v is not None})
        with warnings.catch_warnings():  # predict takes arrays; MLflow's type-hint notice does not apply
            warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")
            info = mlflow.pyfunc.log_model(
                name="detector",
                python_model=str(code),
                artifacts={"bundle": str(bundle)},
                code_paths=[str(Path(bdx_study.__file__).parent)],  # the library travels with the model
                pip_requirements=["torch", "safetensors", "numpy", "pandas", "pydantic", "scikit-learn", "PyYAML"],
            )
    return str(info.model_uri)
