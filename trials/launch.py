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
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bdx_study._io import write_text_atomic
from bdx_study.preflight import preflight
from bdx_study.space import SpaceError, StudySpec
from bdx_study.tables import StudyTables
from bdx_study.victims import VictimCache, VictimConfig

from .cluster import init_ray, stop_orphans
from .context import StudyContext
from .lock import study_lock
from .tracking import (
    MlflowStudyCallback,
    StudyTracker,
    probe_tracking,
    resolve_tracking_uri,
    runs_link,
    short_error,
    ui_command,
)


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


def _refuse_resume_elsewhere(spec: StudySpec, source: str | os.PathLike[str] | None) -> None:
    """``--resume`` from another folder than the launch's: a relative study.storage is resolved
    against the working folder, so the study is not where the command looks. Where it exists
    beside the study file (the launch ran from there), refuse before writing anything, saying
    where it looked and where the study is."""
    study_dir = spec.study_dir
    if source is None or (study_dir / "study.json").exists() or (study_dir / "tune").exists():
        return
    base = Path(source).resolve().parent
    beside = spec.storage_root(base=base) / "studies" / spec.study.name
    if beside != study_dir and ((beside / "study.json").exists() or (beside / "tune").exists()):
        raise SpaceError(
            f"--resume: no study {spec.study.name!r} at {study_dir} (study.storage {spec.study.storage!r} is resolved "
            f"against the working folder {Path.cwd()}), but there is one at {beside}: run the command from {base}, "
            "or give study.storage as an absolute path"
        )


def _decide_resume(spec: StudySpec, resume: bool) -> bool:
    """Refuse to start over an existing study without --resume, or to resume what cannot be
    restored; a --resume with nothing to resume starts the study."""
    from ray import tune

    study_dir = spec.study_dir
    tune_dir = study_dir / "tune"
    exists = tune_dir.exists() or (study_dir / "study.json").exists()
    if exists and not resume:
        raise SpaceError(
            f"study {spec.study.name!r} already exists at {study_dir}; pass --resume to continue it, "
            "or change study.name (or delete that folder) to start over"
        )
    if resume and not exists:
        where = f"study.storage {spec.study.storage!r} is resolved against the working folder {Path.cwd()}"
        print(f"[bdx-study] nothing to resume at {study_dir} ({where}); starting the study", flush=True)
        return False
    if resume:
        _check_same_study(spec, study_dir)
        if tune_dir.exists() and not tune.Tuner.can_restore(str(tune_dir)):
            raise SpaceError(
                f"{tune_dir}: Ray Tune's state cannot be restored, so --resume cannot continue this study without "
                "mixing two searches in its tables; launch it under a new study.name (its victims are reused)"
            )
    return resume


def _check_same_study(spec: StudySpec, study_dir: Path) -> None:
    """A resumed study must be the one that was launched (victims, detectors, search unchanged)."""
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


def _start_tracking(
    spec: StudySpec, source: Path | None, study_dir: Path, resume: bool
) -> tuple[StudyTracker, dict[str, Any], bool]:
    """The study's MLflow parent run (a new one per launch; a resume continues the recorded one).
    An unreachable store is refused (``tracking.required``), or the study runs on Parquet only."""
    ids_path = study_dir / "study.json"
    ids = json.loads(ids_path.read_text()) if resume and ids_path.is_file() else {}
    uri = ids.get("tracking_uri") or resolve_tracking_uri(spec.tracking.uri)
    if spec.tracking.uri is not None and resolve_tracking_uri(spec.tracking.uri) != uri:
        uri = resolve_tracking_uri(spec.tracking.uri)  # the study file names a new store: log there
        print(f"[bdx-study] tracking moved to {uri}: a new parent run there gets every finished trial", flush=True)
        ids.pop("experiment_id", None)
        ids.pop("parent_run_id", None)
    tracker = StudyTracker(uri, spec.experiment_name, spec.study.name)
    tracking_ok = True
    try:
        probe_tracking(uri)
        tracker.start(
            {
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
            },
            description=spec.study.description,
            parent_run_id=ids.get("parent_run_id"),
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
    _write_ids(ids_path, ids)
    return tracker, ids, tracking_ok


def _prepare_victims(spec: StudySpec, tracker: StudyTracker | None) -> VictimCache:
    """Train the missing victims (Ray tasks), record all of them in Parquet and MLflow."""
    from bdx_study.schema import victim_columns

    from .victim_stage import ensure_victims

    cache = VictimCache(spec.storage_root() / "victims")
    records = ensure_victims(spec.victim_configs(), cache, cpu=spec.resources.cpu, gpu=spec.resources.gpu)
    StudyTables(spec.study_dir).write_victims(
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
    if tracker is not None:
        _log_victims(tracker, records)
    return cache


def _fit(tuner: Any) -> Any:
    """``tuner.fit()``, leaving the signal handlers as it found them: Tune installs a SIGINT
    handler that only flags its run and keeps it after the run ends, which would swallow the
    next Ctrl-C (while the quickstart analyzes and exports, or in a caller's process)."""
    on_main = threading.current_thread() is threading.main_thread()
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)} if on_main else {}
    try:
        return tuner.fit()
    finally:
        for s, handler in kept.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _tuner(spec: StudySpec, ctx: StudyContext, tracker: StudyTracker, resume: bool, fold: str | None = None) -> Any:
    from ray import tune

    from .trainable import defense_trial

    tune_dir = spec.study_dir / "tune"
    trainable = tune.with_resources(tune.with_parameters(defense_trial, ctx=ctx), trial_resources(spec))
    if resume and tune_dir.exists():
        print(
            f"[bdx-study] resuming: {len(StudyTables(spec.study_dir).finished_trials())} finished trial(s) kept, "
            "the rest run now",
            flush=True,
        )
        # Tune restores the callbacks pickled at the first launch (see MlflowStudyCallback).
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
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
            storage_path=str(spec.study_dir),
            callbacks=[MlflowStudyCallback(tracker, spec, spec.study_dir, fold)],
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            verbose=0,
        ),
    )


def _as_task(spec: StudySpec, fn: Any) -> Any:
    """``fn`` as a Ray task with a trial's resources and retries (work done outside Tune's trials)."""
    import ray

    res = trial_resources(spec)
    return ray.remote(fn).options(num_cpus=res["cpu"], num_gpus=res["gpu"], max_retries=spec.resources.max_failures)


def _rerun(ctx: StudyContext, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
    from .trainable import execute_trial

    return execute_trial(ctx, trial_id, config)


def repair_lost_trials(spec: StudySpec, ctx: StudyContext, grid: Any) -> int:
    """Run again, as Ray tasks, the trials Tune counts as finished whose stored result is
    missing or unreadable (checked whole); returns how many."""
    import ray

    finished = StudyTables(spec.study_dir).finished_trials(full=True)
    lost = []
    for i in range(len(grid)):
        r = grid[i]
        trial_id = (r.metrics or {}).get("trial_id")
        if r.error is None and trial_id and trial_id not in finished:
            lost.append((trial_id, dict(r.config)))
    if not lost:
        return 0
    print(f"[bdx-study] running {len(lost)} trial(s) again whose stored result was lost", flush=True)
    task = _as_task(spec, _rerun)
    ray.get([task.remote(ctx, trial_id, config) for trial_id, config in lost])
    return len(lost)


def _interrupted(spec: StudySpec, grid: Any) -> bool:
    """Whether Tune's run ended before every trial ran (it returns normally after SIGINT)."""
    return len(grid) < spec.num_trials or grid.num_terminated + grid.num_errors < len(grid)


def _refit(ctx: StudyContext, trial_row: dict[str, Any], index: int) -> str:
    from .trainable import execute_refit

    return execute_refit(ctx, trial_row, index)


def run_refits(spec: StudySpec, ctx: StudyContext) -> int:
    """Refit uncertainty: each family's ``search.refit.top_k`` best configs (by the selection
    rule, selection split) fitted again ``repeats`` times with fresh seeds and fresh draws of D_c,
    as Ray tasks; refits already stored are kept. Returns how many ran now."""
    import ray

    from bdx_study.selection import top_k

    rf = spec.search.refit
    if rf.top_k == 0:
        return 0
    tables = StudyTables(spec.study_dir)
    try:
        df = tables.read("trials").to_pandas()
    except FileNotFoundError:
        return 0
    done = tables.finished_trials(kind="refits")
    obj, max_drop = spec.search.objective, spec.search.constraint.max_clean_acc_drop
    todo = []
    for family in spec.families:
        rows = df[df["detector"] == family]
        for trial_id in top_k(rows, rf.top_k, obj.metric, obj.aggregate, max_drop):
            row = rows[rows["trial_id"] == trial_id].iloc[0].to_dict()
            todo += [(row, r) for r in range(1, rf.repeats + 1) if f"{trial_id}-refit{r}" not in done]
    if not todo:
        return 0
    print(f"[bdx-study] refitting: {len(todo)} fit(s) of the best configs with fresh seeds and D_c draws", flush=True)
    task = _as_task(spec, _refit)
    ray.get([task.remote(ctx, row, r) for row, r in todo])
    return len(todo)


def _heldout(ctx: StudyContext, trial_row: dict[str, Any]) -> str:
    from .trainable import execute_heldout

    return execute_heldout(ctx, trial_row)


def run_nested_folds(spec: StudySpec, ctx: StudyContext, tracker: StudyTracker) -> int:
    """Strictly held-out validation (``search.nested_folds``): for each value of each group
    column, the whole search again on the other victims only (a sub-study beside this one, its
    trials tagged ``bdx.fold`` in MLflow), then each family's pick (by the same selection rule)
    measured on the held-out victims. Folds already measured are kept. Returns folds run now."""
    import ray
    from ray import tune

    from bdx_study.folds import fold_spec, fold_values, held_out_victims
    from bdx_study.selection import select

    obj, max_drop = spec.search.objective, spec.search.constraint.max_clean_acc_drop
    task = _as_task(spec, _heldout)
    ran = 0
    for column in spec.search.nested_folds:
        for value in fold_values(spec, column):
            fs = fold_spec(spec, column, value)
            fdir = fs.study_dir
            tables = StudyTables(fdir)
            if tables.finished_trials(kind="heldout") and len(tables.finished_trials(kind="heldout")) >= len(
                spec.families
            ):
                continue
            print(f"[bdx-study] nested fold {fs.study.name}: the search again without {column}={value}", flush=True)
            fold_ctx = StudyContext(
                spec=fs,
                study_dir=fdir,
                victim_cache=ctx.victim_cache,
                victims=tuple(fs.victim_configs()),
                stage_cache=ctx.stage_cache,
            )
            fdir.mkdir(parents=True, exist_ok=True)
            resume = (fdir / "tune").exists() and tune.Tuner.can_restore(str(fdir / "tune"))
            grid = _fit(_tuner(fs, fold_ctx, tracker, resume, fold=fs.study.name))
            if _interrupted(fs, grid):
                raise KeyboardInterrupt
            repair_lost_trials(fs, fold_ctx, grid)
            df = tables.read("trials").to_pandas()
            held_ctx = StudyContext(
                spec=spec,
                study_dir=fdir,
                victim_cache=ctx.victim_cache,
                victims=tuple(held_out_victims(spec, column, value)),
                stage_cache=ctx.stage_cache,
            )
            rows = []
            for family in spec.families:
                mine = df[df["detector"] == family]
                if mine.empty:
                    continue
                try:
                    pick, _ = select(mine, obj.metric, obj.aggregate, max_drop)
                except ValueError:
                    continue
                rows.append(mine[mine["trial_id"] == pick.trial_id].iloc[0].to_dict())
            ray.get([task.remote(held_ctx, row) for row in rows])
            ran += 1
    return ran


def _best(spec: StudySpec, grid: Any) -> dict[str, Any]:
    try:
        r = grid.get_best_result(metric="objective", mode=spec.search.objective.mode)
    except RuntimeError:
        return {}
    m = r.metrics or {}
    return {"trial_id": m.get("trial_id"), "objective": m.get("objective"), "feasible": bool(m.get("feasible"))}


def launch(
    spec: StudySpec,
    *,
    source: Path | None = None,
    address: str | None = None,
    resume: bool = False,
) -> LaunchResult:
    """Run the study described by ``spec`` (already validated), or resume it. Nothing is written
    before the checks pass, the study's lock is held, Ray is up and tracking answers."""
    import ray

    t0 = time.perf_counter()
    # Snapshot Tune's experiment state at most 1 s apart (default: >= 10 s), so a killed driver
    # loses as little bookkeeping as possible; finished trials are also recognised by their tables.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    study_dir = spec.study_dir
    preflight(spec, source or spec.study.name, local=address is None and not ray.is_initialized())
    if resume:
        _refuse_resume_elsewhere(spec, source)
    with study_lock(study_dir, spec.study.name):
        resume = _decide_resume(spec, resume)
        init_ray(address, study_dir)
        stopped = stop_orphans(study_dir)
        if stopped:
            print(f"[bdx-study] stopped {stopped} Ray process(es) an earlier, killed launch left running", flush=True)
        _check_resources(spec)
        tracker, ids, tracking_ok = _start_tracking(spec, source, study_dir, resume)
        if source is not None and not resume:
            shutil.copyfile(source, study_dir / "study.yaml")
        print(
            f"[bdx-study] study {spec.study.name!r}: {len(spec.victim_configs())} victim(s) x {spec.num_trials} "
            f"trial(s) of {', '.join(spec.families)}; storage {study_dir}",
            flush=True,
        )
        status, best = "FAILED", {}
        try:
            cache = _prepare_victims(spec, tracker if tracking_ok else None)
            ctx = StudyContext(
                spec=spec,
                study_dir=study_dir,
                victim_cache=cache.root,
                victims=tuple(spec.victim_configs()),
                stage_cache=spec.storage_root() / "stages" if spec.study.stage_cache else None,
            )
            fit_start = time.perf_counter()
            grid = _fit(_tuner(spec, ctx, tracker, resume))
            suffix = "_resumed" if resume else ""
            ids[f"tune_fit_seconds{suffix}"] = time.perf_counter() - fit_start  # Tuner.fit alone
            if _interrupted(spec, grid):  # Tune stopped on SIGINT/SIGTERM and saved its state
                raise KeyboardInterrupt
            after_start = time.perf_counter()
            repaired = repair_lost_trials(spec, ctx, grid)
            refitted = run_refits(spec, ctx)
            folds = run_nested_folds(spec, ctx, tracker)
            ids[f"after_tune_seconds{suffix}"] = time.perf_counter() - after_start  # repairs, refits, nested folds
            _write_ids(study_dir / "study.json", ids)
            StudyTables(study_dir).consolidate()
            best = _best(spec, grid)
            status = "FINISHED" if grid.num_errors == 0 else "FAILED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if tracking_ok:
                _finish_study(tracker, spec, study_dir, best, status=status)

    seconds = time.perf_counter() - t0
    print(
        f"[bdx-study] study {spec.study.name!r} done in {seconds:.0f} s: "
        f"{grid.num_terminated} trial(s) finished, {grid.num_errors} failed"
        + (f", {repaired} run again after their stored result was lost" if repaired else "")
        + (f"; {refitted} refit(s)" if refitted else "")
        + (f"; {folds} nested fold(s)" if folds else ""),
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
        link = runs_link(tracker.uri, tracker.experiment_id, spec.search.objective.mode)
        print(f"[bdx-study] MLflow: {ui_command(tracker.uri)}  then open {link}", flush=True)
    return LaunchResult(
        study_dir,
        tracker.uri,
        tracker.experiment_id,
        tracker.parent_run_id,
        grid.num_terminated,
        grid.num_errors,
        best,
        seconds,
    )


def victim_run_fields(config: VictimConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """(params, tags) of a victim's MLflow run: its identity columns, attack and training recipe
    (``training.precision`` and ``training.channels_last`` included), and the arithmetic it was
    trained with as tags (``bdx.precision``, ``bdx.channels_last``) to filter runs by."""
    from bdx_study.schema import victim_columns

    t = config.training
    params = {
        **victim_columns(config),
        **{f"attack.{k}": v for k, v in config.attack.params.items() if k != "poison_rate"},
        **{f"training.{k}": v for k, v in t.model_dump().items() if k != "epochs"},
    }
    return params, {"bdx.precision": t.precision, "bdx.channels_last": str(t.channels_last).lower()}


def _log_victims(tracker: Any, records: list[Any]) -> None:
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


def _finish_study(tracker: Any, spec: StudySpec, study_dir: Path, best: dict[str, Any], status: str) -> None:
    """Log what MLflow is missing, drop runs of trials that will never finish, close the study run."""
    try:
        synced = tracker.sync(spec, study_dir)
        if synced:
            print(f"[bdx-study] logged {synced} finished trial(s) MLflow was missing", flush=True)
        if best.get("objective") is not None and math.isfinite(best["objective"]):
            tracker.log_metrics(tracker.parent_run_id, {"best_objective": best["objective"]})
        if best.get("trial_id"):
            tracker.name_the_best(str(best["trial_id"]))
        for p in ("tables/trials.parquet", "tables/victims.parquet", "study.yaml"):
            tracker.log_artifact(tracker.parent_run_id, study_dir / p, "study")
        tracker.finish(tracker.parent_run_id, status=status)
    except Exception as e:
        missing = len(StudyTables(study_dir).finished_trials())
        print(
            f"[bdx-study] WARNING: MLflow could not be brought up to date ({short_error(e)}); Parquet holds all "
            f"{missing} finished trial(s). Run `bdx-study sync --space FILE` once MLflow answers again.",
            flush=True,
        )
