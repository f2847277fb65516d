"""Run or resume a study: validate, train victims, sweep BaDExpert with Ray Tune + OptunaSearch,
track in MLflow, keep Parquet tables.

Storage layout under ``<study.storage>``:
    victims/<key>/                 the victim cache, shared by every study under this storage
    studies/<name>/study.yaml      the study file as launched
    studies/<name>/study.json      ids: MLflow tracking URI, experiment and parent run
    studies/<name>/tune/           Ray Tune's experiment state (what --resume restores)
    studies/<name>/optuna.db       an Optuna study rebuilt from the tables by `bdx-study analyze`
    studies/<name>/tables/         Parquet tables (see bdx_study.tables)
    studies/<name>/artifacts/<trial>/trial.png, report.json
    stages/<victim key>/...        fitted detector components and their outputs (bdx_study.stages)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bdx_study._io import write_text_atomic
from bdx_study.space import SpaceError, StudySpec
from bdx_study.tables import StudyTables
from bdx_study.victims import VictimCache

from .context import StudyContext


@dataclass
class LaunchResult:
    study_dir: Path
    tracking_uri: str
    experiment_id: str | None
    parent_run_id: str | None
    num_trials: int
    num_errors: int
    best: dict[str, Any]
    seconds: float


def _check_data(spec: StudySpec) -> None:
    """Fail before Ray starts if a dataset cannot be read or a split cannot be cut."""
    from bdx_study.data import DataError

    for ds in spec.victims.datasets:
        try:
            spec.data.splits(ds)
        except (DataError, OSError) as e:
            raise SpaceError(f"data for dataset {ds!r}: {e}") from None


def _check_same_study(spec: StudySpec, study_dir: Path) -> None:
    """A resumed study must be the one that was launched (victims, defense, search unchanged)."""
    from bdx_study.space import load_space

    stored = study_dir / "study.yaml"
    if not stored.is_file():
        return
    before = load_space(stored)
    changed = [
        s for s in ("victims", "detectors", "protocol", "search", "data") if getattr(before, s) != getattr(spec, s)
    ]
    if changed:
        raise SpaceError(
            f"{stored}: the study file differs from the one this study was launched with in "
            f"{', '.join(changed)}; resume it with the original file, or give the new one another study.name"
        )


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": "WARNING"}
    if address:
        kwargs["address"] = address
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster on loopback
        kwargs["object_store_memory"] = 256 * 2**20
    ray.init(**kwargs)


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """Ray resources of one trial (and one victim-training task): fractions of a GPU pack several
    trials on one device; they are logical, so each trial must fit in its share of memory."""
    return {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}


def _check_resources(spec: StudySpec) -> None:
    """Fail fast when no node could ever run a trial (Ray would wait forever)."""
    import ray

    want = trial_resources(spec)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= want["cpu"] and n.get("GPU", 0) >= want["gpu"] for n in nodes):
        have = ", ".join(f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes)
        raise SpaceError(
            f"resources: a trial asks for {want['cpu']:g} CPU and {want['gpu']:g} GPU but no Ray node has that "
            f"(nodes: {have}); lower resources.cpu/gpu or join a cluster with --address"
        )


def _searcher(spec: StudySpec) -> Any:
    from .search import FamilySearcher

    return FamilySearcher(spec)


def _write_ids(path: Path, ids: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(ids, indent=2))


def launch(
    spec: StudySpec,
    *,
    source: Path | None = None,
    address: str | None = None,
    resume: bool = False,
) -> LaunchResult:
    """Run the study described by ``spec`` (already validated), or resume it."""
    from ray import tune

    from bdx_study.schema import victim_columns

    from .tracking import MlflowStudyCallback, StudyTracker, resolve_tracking_uri, runs_link, ui_command
    from .trainable import defense_trial
    from .victim_stage import ensure_victims

    t0 = time.perf_counter()
    # Snapshot Tune's experiment state at most 1 s apart (default: >= 10 s), so a killed driver
    # loses as little bookkeeping as possible; finished trials are also recognised by their tables.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    study_dir = spec.study_dir
    tune_dir = study_dir / "tune"
    exists = tune_dir.exists() or (study_dir / "study.json").exists()
    if exists and not resume:
        raise SpaceError(
            f"study {spec.study.name!r} already exists at {study_dir}; pass --resume to continue it, "
            "or change study.name (or delete that folder) to start over"
        )
    if resume and not exists:
        print(f"[bdx-study] nothing to resume at {study_dir}; starting the study", flush=True)
        resume = False
    if resume:
        _check_same_study(spec, study_dir)
        if tune_dir.exists() and not tune.Tuner.can_restore(str(tune_dir)):
            raise SpaceError(
                f"{tune_dir}: Ray Tune's state cannot be restored, so --resume cannot continue this study without "
                "mixing two searches in its tables; launch it under a new study.name (its victims are reused)"
            )
    _check_data(spec)
    study_dir.mkdir(parents=True, exist_ok=True)
    if source is not None and not resume:
        shutil.copyfile(source, study_dir / "study.yaml")

    ids_path = study_dir / "study.json"
    ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    uri = ids.get("tracking_uri") or resolve_tracking_uri(spec.tracking.uri)
    if spec.tracking.uri is not None and resolve_tracking_uri(spec.tracking.uri) != uri:
        uri = resolve_tracking_uri(spec.tracking.uri)  # the study file names a new store: log there
        print(f"[bdx-study] tracking moved to {uri}: a new parent run there gets every finished trial", flush=True)
        ids.pop("experiment_id", None)
        ids.pop("parent_run_id", None)
    tracker = StudyTracker(uri, spec.experiment_name, spec.study.name)
    victims = spec.victim_configs()
    tracking_ok = True
    try:
        tracker.start(
            {
                "space_file": str(source or ""),
                "sampler": spec.search.sampler,
                "num_trials": spec.num_trials,
                "objective": spec.search.objective.selection_key,
                "objective_mode": spec.search.objective.mode,
                "max_clean_acc_drop": spec.search.constraint.max_clean_acc_drop,
                "num_victims": len(victims),
                "detectors": ",".join(spec.families),
                "stage_cache": spec.study.stage_cache,
                **{f"protocol.{k}": v for k, v in spec.protocol.items() if not isinstance(v, BaseModel)},
            },
            description=spec.study.description,
            parent_run_id=ids.get("parent_run_id"),
        )
    except Exception as e:
        tracking_ok = False
        print(
            f"[bdx-study] WARNING: MLflow at {uri} is unavailable ({e}); results are kept in Parquet only", flush=True
        )
    ids.update(tracking_uri=uri, study=spec.study.name)
    if tracking_ok:  # during an outage keep the ids a later resume must continue
        ids.update(experiment_id=tracker.experiment_id, parent_run_id=tracker.parent_run_id)
    _write_ids(ids_path, ids)
    print(
        f"[bdx-study] study {spec.study.name!r}: {len(victims)} victim(s) x {spec.num_trials} trial(s); "
        f"storage {study_dir}",
        flush=True,
    )

    _init_ray(address)
    _check_resources(spec)
    cache = VictimCache(spec.storage_root() / "victims")
    res = spec.resources
    records = ensure_victims(victims, cache, cpu=res.cpu, gpu=res.gpu)
    tables = StudyTables(study_dir)
    tables.write_victims(
        [
            {
                **victim_columns(r.config),
                "clean_acc": r.clean_acc,
                "attack_success": r.attack_success,
                "train_seconds": r.train_seconds,
                "weights_sha256": r.weights_sha256,
                "cache_path": str(r.path),
            }
            for r, _ in records
        ]
    )
    if tracking_ok:
        _log_victims(tracker, records)

    ctx = StudyContext(
        spec=spec,
        study_dir=study_dir,
        victim_cache=cache.root,
        victims=tuple(victims),
        stage_cache=spec.storage_root() / "stages" if spec.study.stage_cache else None,
    )
    trainable = tune.with_resources(tune.with_parameters(defense_trial, ctx=ctx), trial_resources(spec))
    if resume and tune_dir.exists():
        print(
            f"[bdx-study] resuming: {len(tables.finished_trials())} finished trial(s) kept, the rest run now",
            flush=True,
        )
        # Tune restores the callbacks pickled at the first launch (see MlflowStudyCallback).
        tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric="objective",
                mode=spec.search.objective.mode,
                search_alg=_searcher(spec),
                num_samples=spec.num_trials,
                max_concurrent_trials=spec.search.max_concurrent,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(study_dir),
                callbacks=[MlflowStudyCallback(tracker, spec, study_dir)],
                failure_config=tune.FailureConfig(max_failures=res.max_failures),
                verbose=0,
            ),
        )
    fit_start = time.perf_counter()
    grid = tuner.fit()
    ids["tune_fit_seconds_resumed" if resume else "tune_fit_seconds"] = time.perf_counter() - fit_start
    _write_ids(ids_path, ids)
    tables.consolidate()

    best: dict[str, Any] = {}
    try:
        r = grid.get_best_result(metric="objective", mode=spec.search.objective.mode)
        m = r.metrics or {}
        best = {
            "trial_id": m.get("trial_id"),
            "objective": m.get("objective"),
            "feasible": bool(m.get("feasible")),
            "config": r.config,
        }
    except RuntimeError:
        pass
    if tracking_ok:
        _finish_study(tracker, spec, study_dir, best, ok=grid.num_errors == 0)

    seconds = time.perf_counter() - t0
    print(
        f"[bdx-study] study {spec.study.name!r} done in {seconds:.0f} s: "
        f"{grid.num_terminated} trial(s) finished, {grid.num_errors} failed",
        flush=True,
    )
    if best:
        print(
            f"[bdx-study] best trial {best['trial_id']}: {spec.search.objective.selection_key} "
            f"{best['objective']:.4f}{'' if best['feasible'] else ' (infeasible)'} (selection split; "
            "`bdx-study analyze` reports the evaluation split)",
            flush=True,
        )
    print(f"[bdx-study] tables: {study_dir / 'tables'}", flush=True)
    if tracking_ok and tracker.experiment_id:
        print(f"[bdx-study] MLflow: {ui_command(uri)}  then open {runs_link(uri, tracker.experiment_id)}", flush=True)
    return LaunchResult(
        study_dir,
        uri,
        tracker.experiment_id,
        tracker.parent_run_id,
        grid.num_terminated,
        grid.num_errors,
        best,
        seconds,
    )


def _log_victims(tracker: Any, records: list[Any]) -> None:
    from bdx_study.schema import victim_columns

    for rec, trained in records:
        try:
            params = {
                **victim_columns(rec.config),
                **{f"attack.{k}": v for k, v in rec.config.attack.params.items() if k != "poison_rate"},
                **{f"training.{k}": v for k, v in rec.config.training.model_dump().items() if k != "epochs"},
            }
            run_id, created = tracker.child_run("victim", rec.config.key, f"victim-{rec.config.name}", params)
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


def _finish_study(tracker: Any, spec: StudySpec, study_dir: Path, best: dict[str, Any], ok: bool) -> None:
    try:
        synced = tracker.sync(spec, study_dir)
        if synced:
            print(f"[bdx-study] logged {synced} finished trial(s) MLflow was missing", flush=True)
        if best.get("objective") is not None and math.isfinite(best["objective"]):
            tracker.log_metrics(tracker.parent_run_id, {"best_objective": best["objective"]})
        for p in ("tables/trials.parquet", "tables/victims.parquet", "study.yaml"):
            tracker.log_artifact(tracker.parent_run_id, study_dir / p, "study")
        tracker.finish(tracker.parent_run_id, ok=ok)
    except Exception as e:
        print(f"[bdx-study] WARNING: MLflow logging of the study run failed: {e}", flush=True)
