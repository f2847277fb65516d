"""The study's MLflow parent run over one launch: opened (a new one per launch; a resume
continues the recorded one), the victims logged as its children, and closed with what MLflow is
missing. The ids a resume continues are kept in the study's ``study.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bdx_study._io import short_error, write_text_atomic
from bdx_study.schema import victim_columns
from bdx_study.space import SpaceError, StudySpec
from bdx_study.tables import StudyTables
from bdx_study.victims import VictimConfig, VictimRecord

from .tracking import StudyTracker, probe_tracking, resolve_tracking_uri


def _recorded_ids(spec: StudySpec, ids_path: Path, resume: bool) -> tuple[str, dict[str, Any]]:
    """(tracking URI, ids) a launch logs under: a resume's recorded ones, unless the study file
    now names another store (then a new parent run there)."""
    ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    uri = ids.get("tracking_uri") or resolve_tracking_uri(spec.tracking.uri)
    if spec.tracking.uri is not None and resolve_tracking_uri(spec.tracking.uri) != uri:
        uri = resolve_tracking_uri(spec.tracking.uri)  # the study file names a new store: log there
        print(f"[bdx-study] tracking moved to {uri}: a new parent run there gets every finished trial", flush=True)
        ids.pop("experiment_id", None)
        ids.pop("parent_run_id", None)
    return uri, ids


def _run_params(spec: StudySpec, source: Path | None) -> dict[str, Any]:
    """The parent run's params: the study's search, objective and protocol."""
    return {
        "space_file": str(source or ""),
        "sampler": spec.search.sampler,
        "num_trials": spec.num_trials,
        "objective": spec.search.objective.selection_key,
        "objective_mode": spec.search.objective.mode,
        "max_clean_acc_drop": spec.search.constraint.max_clean_acc_drop,
        "num_victims": len(spec.victim_configs()),
        "detectors": ",".join(spec.families),
        "stage_cache": spec.study.stage_cache,
        **{f"protocol.{k}": v for k, v in spec.protocol.items() if not isinstance(v, BaseModel)},
    }


@dataclass
class ParentRun:
    """The study's parent run for one launch, and the ids in ``study.json``."""

    tracker: StudyTracker
    ids: dict[str, Any]  # study.json: tracking URI, experiment and parent run, launch timings
    ok: bool  # MLflow answered; False = the study runs on Parquet only (`bdx-study sync` later)
    ids_path: Path

    def save_ids(self) -> None:
        write_text_atomic(self.ids_path, json.dumps(self.ids, indent=2))

    def log_victims(self, records: list[tuple[VictimRecord, bool]]) -> None:
        if self.ok:
            _log_victims(self.tracker, records)

    def finish(self, spec: StudySpec, best: dict[str, Any], status: str) -> None:
        """Close the parent run with ``status`` (FINISHED, FAILED, KILLED), the best trial named."""
        run_id = self.tracker.parent_run_id
        if self.ok and run_id is not None:  # ok: MLflow opened the run
            _finish_study(self.tracker, run_id, spec, best, status=status)


def open_parent_run(spec: StudySpec, source: Path | None, resume: bool) -> ParentRun:
    """The study's MLflow parent run (a new one per launch; a resume continues the recorded one).
    An unreachable store is refused (``tracking.required``), or the study runs on Parquet only."""
    ids_path = spec.study_dir / "study.json"
    uri, ids = _recorded_ids(spec, ids_path, resume)
    tracker = StudyTracker(uri, spec.experiment_name, spec.study.name)
    tracking_ok = True
    try:
        probe_tracking(uri)
        tracker.start(
            _run_params(spec, source), description=spec.study.description, parent_run_id=ids.get("parent_run_id")
        )
    except Exception as e:
        why = short_error(e)
        if spec.tracking.required:
            raise SpaceError(
                f"tracking.uri: MLflow at {uri} cannot be reached ({why}); start the server or fix tracking.uri "
                "(null = a local sqlite:///mlflow.db), or set tracking.required: false to run on Parquet only"
            ) from None
        tracking_ok = False
        print(
            f"[bdx-study] WARNING: MLflow at {uri} is unavailable ({why}); results are kept in Parquet only, "
            "`bdx-study sync` logs them later",
            flush=True,
        )
    ids.update(tracking_uri=uri, study=spec.study.name)
    if tracking_ok:  # during an outage keep the ids a later resume must continue
        ids.update(experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_run_id)
    run = ParentRun(tracker, ids, tracking_ok, ids_path)
    run.save_ids()
    return run


def victim_run_fields(config: VictimConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(params, tags) of a victim's MLflow run: its identity columns, attack and training recipe
    (``training.precision`` and ``training.channels_last`` included), and the arithmetic it was
    trained with as tags (``bdx.precision``, ``bdx.channels_last``) to filter runs by."""
    t = config.training
    params = {
        **victim_columns(config),
        **{f"attack.{k}": v for k, v in config.attack.params.items() if k != "poison_rate"},
        **{f"training.{k}": v for k, v in t.model_dump().items() if k != "epochs"},
    }
    return params, {"bdx.precision": t.precision, "bdx.channels_last": str(t.channels_last).lower()}


def _log_victims(tracker: StudyTracker, records: list[tuple[VictimRecord, bool]]) -> None:
    for rec, trained in records:
        try:
            params, tags = victim_run_fields(rec.config)
            run_id, created = tracker.child_run("victim", rec.config.key, f"victim-{rec.config.name}", params, tags)
            if created:
                tracker.log_metrics(
                    run_id,
                    {
                        "clean_acc": rec.clean_acc,
                        "attack_success": rec.attack_success,
                        "train_seconds": rec.train_seconds,
                    },
                )
                tracker.client.set_tag(run_id, "bdx.trained_now", str(trained).lower())
                tracker.finish(run_id)
        except Exception as e:
            print(f"[bdx-study] WARNING: MLflow logging of victim {rec.config.name} failed: {e}", flush=True)


def _finish_study(tracker: StudyTracker, run_id: str, spec: StudySpec, best: dict[str, Any], status: str) -> None:
    """Log what MLflow is missing, drop runs of trials that will never finish, close the study run
    ``run_id``."""
    study_dir = spec.study_dir
    try:
        synced = tracker.sync(spec, study_dir)
        if synced:
            print(f"[bdx-study] logged {synced} finished trial(s) MLflow was missing", flush=True)
        if best.get("objective") is not None and math.isfinite(best["objective"]):
            tracker.log_metrics(run_id, {"best_objective": best["objective"]})
        if best.get("trial_id"):
            tracker.name_the_best(str(best["trial_id"]))
        for p in ("tables/trials.parquet", "tables/victims.parquet", "study.yaml"):
            tracker.log_artifact(run_id, study_dir / p, "study")
        tracker.finish(run_id, status=status)
    except Exception as e:
        missing = len(StudyTables(study_dir).finished_trials())
        print(
            f"[bdx-study] WARNING: MLflow could not be brought up to date ({short_error(e)}); Parquet holds all "
            f"{missing} finished trial(s). Run `bdx-study sync --space FILE` once MLflow answers again.",
            flush=True,
        )
