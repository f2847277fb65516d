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
from typing import TYPE_CHECKING, Any

from bdx_study._io import interrupts_deferred
from bdx_study.data import DatasetInfo
from bdx_study.detector import check_bundle_target, save_bundle, update_provenance
from bdx_study.detectors import create_detector
from bdx_study.space import StudySpec
from bdx_study.stages import LoadedVictim, StageStore, run_detector
from bdx_study.tables import StudyTables
from bdx_study.training import pick_device
from bdx_study.victims import VictimCache, VictimConfig

from .domain import check_domain, render_warnings, unseen_triggers
from .recipe import FamilyRecipe, Recipe

if TYPE_CHECKING:
    import torch


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


def check_recipe_current(recipe: Recipe, spec: StudySpec, study_dir: Path) -> None:
    """Refuse a recipe of this study made from fewer stored results than its tables hold now
    (trials finished, or refits run, since ``analyze`` wrote it): its choice may be outdated."""
    if recipe.study != spec.study.name:
        return  # another study's recipe, applied here on purpose: its counts say nothing of these tables
    now = StudyTables(study_dir).counts()
    made = recipe.made_from
    if made is None:
        if any(now.values()):
            raise ValueError(
                f"{recipe.path}: records no count of the results it was made from (written by an older bdx-study); "
                "run `bdx-study analyze` again, then export"
            )
        return
    recorded = {k: made.get(k, 0) for k in now}
    grown = [f"{n} {k} (the recipe was made from {recorded[k]})" for k, n in now.items() if n > recorded[k]]
    if grown:
        raise ValueError(
            f"{recipe.path}: older than the study's tables, which now hold {', '.join(grown)}; run `bdx-study "
            "analyze` again, then export"
        )


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
    recipe = Recipe.load(recipe_path or study_dir / "recipe.yaml")
    family_name, entry = recipe.family(detector)
    check_bundle_target(out, force)  # refused before any fitting, as save_bundle would refuse it after
    check_recipe_current(recipe, spec, study_dir)
    params, protocol = entry.config()
    family = create_detector(family_name, params)
    vcfg = pick_victim(spec, victim)
    device = pick_device(prefer_gpu=spec.resources.gpu > 0)  # where the study's trials ran
    loaded = _load_victim(spec, vcfg, device)
    outside = _domain_warnings(recipe, vcfg, loaded.splits.info, family_name)
    store = StageStore(spec.storage_root() / "stages" if spec.study.stage_cache else None)
    run = run_detector(store, family, protocol, loaded, device=device)
    ids = _study_ids(study_dir)
    provenance = {
        **_provenance(spec, study_dir, recipe, entry, vcfg, ids),
        "stage_keys": run.stage_keys,
        "components_from_stage_cache": run.fitted_now == 0,
        "domain_warnings": outside,
        "unchecked": unseen_triggers(recipe, family_name),
    }
    with interrupts_deferred():  # replacing a bundle: all of it or none
        bundle = save_bundle(
            out,
            family,
            run.fitted,
            loaded.model,
            threshold=run.evaluation.threshold,
            target_fpr=protocol.target_fpr,
            protocol=protocol.model_dump(mode="json"),
            architecture=vcfg.architecture,
            info=loaded.splits.info,
            metrics={**run.evaluation.metrics, **run.costs},
            provenance=provenance,
            reference=run.reference,
            force=force,
        )
    if log_to_mlflow:
        _log_export(bundle, ids, f"detector-{family_name}-{vcfg.name}", provenance["mlflow"])
    return bundle, run.evaluation.metrics


def _load_victim(spec: StudySpec, vcfg: VictimConfig, device: torch.device) -> LoadedVictim:
    """The victim as the study trained it (from its cache), its model on ``device``."""
    record = VictimCache(spec.storage_root() / "victims").load(vcfg)
    if record is None:
        raise FileNotFoundError(f"victim {vcfg.name} is not in the cache; run `bdx-study launch` first")
    splits = vcfg.data.splits(vcfg.dataset)
    return LoadedVictim(vcfg.key, record.load_model(device), splits, record.load_attack(), vcfg.data.layout())


def _domain_warnings(recipe: Recipe, vcfg: VictimConfig, info: DatasetInfo, family: str) -> list[str]:
    """Where the victim lies outside the recipe's domain, printed before the fit (normally
    nothing: the study's own victims lie inside its recipe's domain)."""
    outside = check_domain(
        recipe,
        dataset=vcfg.dataset,
        architecture=vcfg.architecture,
        input_shape=info.input_shape,
        num_classes=info.num_classes,
        attack=vcfg.attack.name,
        detector=family,
    )
    if outside:
        print(render_warnings(outside, command="export"), file=sys.stderr, flush=True)
    return outside


def _study_ids(study_dir: Path) -> dict[str, Any]:
    """The study's MLflow ids (``study.json``), or none."""
    ids_path = study_dir / "study.json"
    return json.loads(ids_path.read_text()) if ids_path.is_file() else {}


def _provenance(
    spec: StudySpec, study_dir: Path, recipe: Recipe, entry: FamilyRecipe, vcfg: VictimConfig, ids: dict[str, Any]
) -> dict[str, Any]:
    """Where the exported detector comes from: the study, the chosen trial and its own figures,
    the recipe, the victim and the MLflow runs."""
    trial_id = entry.chosen_trial
    return {
        "study": spec.study.name,
        "study_dir": str(study_dir),
        "trial": trial_id,
        "trial_metrics": _trial_row_metrics(study_dir, trial_id, vcfg.key),
        "recipe": str(recipe.path),
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
    }


def _log_export(bundle: Path, ids: dict[str, Any], name: str, mlflow_ids: dict[str, Any]) -> None:
    """Log the bundle to the study's MLflow experiment, when it has one (best effort: a warning
    on failure), and record the model URI in its provenance."""
    if not (ids.get("tracking_uri") and ids.get("experiment_id")):
        return
    try:
        model_uri = log_bundle_to_mlflow(bundle, ids, name=name)
        update_provenance(bundle, mlflow={**mlflow_ids, "model_uri": model_uri})
    except Exception as e:
        warnings.warn(f"logging the detector to MLflow failed ({type(e).__name__}: {e})", stacklevel=3)


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
