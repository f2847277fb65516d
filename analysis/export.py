"""Export the study's detector: BaDExpert with the robust defaults, fitted on one victim model
and written as a bundle (safetensors + manifest), also logged to MLflow as a pyfunc model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from bdx_study.defense import DefenseConfig, evaluate_badexpert, fit_badexpert
from bdx_study.detector import save_bundle
from bdx_study.space import StudySpec
from bdx_study.training import pick_device
from bdx_study.victims import VictimCache, VictimConfig


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


def export_detector(
    spec: StudySpec,
    study_dir: Path,
    out: Path,
    *,
    victim: str | None = None,
    recipe_path: Path | None = None,
    log_to_mlflow: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Fit BaDExpert with the recipe's defaults on the chosen victim, evaluate it on that victim's
    evaluation split, and write the bundle. Returns (bundle path, metrics)."""
    recipe_path = recipe_path or study_dir / "recipe.yaml"
    if not recipe_path.is_file():
        raise FileNotFoundError(f"{recipe_path}: no recipe; run `bdx-study analyze` first")
    recipe = yaml.safe_load(recipe_path.read_text())
    cfg = DefenseConfig.model_validate(recipe["defaults"])
    vcfg = pick_victim(spec, victim)
    record = VictimCache(spec.storage_root() / "victims").load(vcfg)
    if record is None:
        raise FileNotFoundError(f"victim {vcfg.name} is not in the cache; run `bdx-study launch` first")
    device = pick_device()
    splits = vcfg.data.splits(vcfg.dataset)
    det, _ = fit_badexpert(record.load_model(device), splits, cfg, device=device)
    metrics = evaluate_badexpert(det, splits, vcfg.build_attack(), device=device).metrics
    ids_path = study_dir / "study.json"
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    provenance = {
        "study": spec.study.name,
        "study_dir": str(study_dir),
        "trial": recipe.get("selection", {}).get("chosen_trial"),
        "recipe": str(recipe_path),
        "victim": vcfg.name,
        "victim_id": vcfg.key,
        "victim_config": vcfg.model_dump(mode="json", exclude={"data": {"root"}}),
        "mlflow": {
            "tracking_uri": ids.get("tracking_uri"),
            "experiment_id": ids.get("experiment_id"),
            "parent_run_id": ids.get("parent_run_id"),
        },
        "metrics_protocol": "evaluation split of the victim's dataset, disjoint from the defender's clean data",
    }
    bundle = save_bundle(
        out, det, architecture=vcfg.architecture, info=splits.info, metrics=metrics, provenance=provenance
    )
    if log_to_mlflow and ids.get("tracking_uri") and ids.get("experiment_id"):
        try:
            model_uri = log_bundle_to_mlflow(bundle, ids, name=f"detector-{vcfg.name}")
            provenance["mlflow"]["model_uri"] = model_uri
            manifest = json.loads((bundle / "manifest.json").read_text())
            manifest["provenance"] = provenance  # not hashed: weights are what the hashes protect
            (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
        except Exception as e:
            warnings.warn(f"logging the detector to MLflow failed ({type(e).__name__}: {e})", stacklevel=2)
    return bundle, metrics


def log_bundle_to_mlflow(bundle: Path, ids: dict[str, Any], *, name: str) -> str:
    """Log the bundle as an MLflow pyfunc model ("models from code": no pickled Python object)
    in a run nested under the study's parent run; returns the model URI."""
    import mlflow

    import bdx_study

    mlflow.set_tracking_uri(ids["tracking_uri"])
    code = Path(bdx_study.__file__).parent / "mlflow_model.py"
    with mlflow.start_run(
        experiment_id=ids["experiment_id"],
        run_name=name,
        tags={
            "mlflow.parentRunId": ids.get("parent_run_id") or "",
            "bdx.kind": "export",
            "bdx.study": ids.get("study", ""),
        },
    ):
        manifest = json.loads((bundle / "manifest.json").read_text())
        mlflow.log_params(
            {
                "threshold": manifest["threshold"],
                "score": manifest["score"]["kind"],
                "ensemble_alpha": manifest["score"]["alpha"],
                "ensemble_beta": manifest["score"]["beta"],
                "target_fpr": manifest["target_fpr"],
            }
        )
        mlflow.log_metrics({k: v for k, v in manifest["metrics"].items() if v is not None})
        info = mlflow.pyfunc.log_model(
            name="detector",
            python_model=str(code),
            artifacts={"bundle": str(bundle)},
            pip_requirements=["bdx-study", "torch", "safetensors", "numpy", "pandas"],
        )
    return str(info.model_uri)
