"""Run or resume a study: validate, train victims, sweep the detector families with Ray Tune +
Optuna, track in MLflow, keep Parquet tables. :func:`launch` reads as its steps; each lives in
its own module:

- :mod:`.resume`: whether this launch starts the study or resumes it;
- :mod:`.cluster` and :mod:`.lock`: Ray up (and what a killed launch left stopped), the study's lock;
- :mod:`.parent_run`: the study's MLflow parent run and ``study.json``;
- :mod:`.victim_stage`: every victim trained and cached;
- :mod:`.tuner`: Tune's search over the families (a resume restores it);
- :mod:`.followups` and :mod:`.nested_folds`: lost trials run again, refits, held-out folds.

Storage layout under ``<study.storage>``:
    victims/<key>/                 the victim cache, shared by every study under this storage
    studies/<name>/study.yaml      the study file as launched
    studies/<name>/study.json      ids: MLflow tracking URI, experiment and parent run
    studies/<name>/tune/           Ray Tune's experiment state (what --resume restores)
    studies/<name>/optuna.db       Optuna studies, one per family: written live by the search, rebuilt by analyze
    studies/<name>/tables/         Parquet tables (see bdx_study.tables)
    studies/<name>/artifacts/<trial>/trial.png, report.json
    stages/<victim key>/...        fitted detector components and their outputs (bdx_study.stages)
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdx_study.preflight import preflight
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables

from .cluster import init_ray, stop_orphans
from .context import StudyContext
from .followups import repair_lost_trials, run_refits
from .live_optuna import LiveOptuna
from .lock import study_lock
from .nested_folds import run_nested_folds
from .parent_run import ParentRun, open_parent_run
from .resume import decide_resume, refuse_resume_elsewhere
from .tracking import runs_link, ui_command
from .tuner import best_trial, build_tuner, check_resources, disk_full, fit, interrupted
from .victim_stage import prepare_victims


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


@dataclass
class _Outcome:
    """What the search and its follow-ups did."""

    grid: Any = None  # Tune's ResultGrid
    best: dict[str, Any] = field(default_factory=dict)
    repaired: int = 0
    refitted: int = 0
    folds: int = 0


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
    preflight(spec, source or spec.study.name, local=address is None and not ray.is_initialized())
    if resume:
        refuse_resume_elsewhere(spec, source)
    with study_lock(spec.study_dir, spec.study.name):
        resume = decide_resume(spec, resume)
        _start_ray(spec, address)
        parent = open_parent_run(spec, source, resume)
        if source is not None and not resume:
            shutil.copyfile(source, spec.study_dir / "study.yaml")
        print(
            f"[bdx-study] study {spec.study.name!r}: {len(spec.victim_configs())} victim(s) x {spec.num_trials} "
            f"trial(s) of {', '.join(spec.families)}; storage {spec.study_dir}",
            flush=True,
        )
        outcome = _run_study(spec, parent, resume)
    seconds = time.perf_counter() - t0
    _print_summary(spec, parent, outcome, seconds)
    tracker, grid = parent.tracker, outcome.grid
    return LaunchResult(
        spec.study_dir,
        tracker.uri,
        tracker.experiment_id,
        tracker.parent_run_id,
        grid.num_terminated,
        grid.num_errors,
        outcome.best,
        seconds,
    )


def _start_ray(spec: StudySpec, address: str | None) -> None:
    """Ray up (own local one, or the cluster at ``address``), with what a killed launch of this
    study left running stopped and room for a trial somewhere."""
    init_ray(address, spec.study_dir)
    stopped = stop_orphans(spec.study_dir)
    if stopped:
        print(f"[bdx-study] stopped {stopped} Ray process(es) an earlier, killed launch left running", flush=True)
    check_resources(spec)


def _run_study(spec: StudySpec, parent: ParentRun, resume: bool) -> _Outcome:
    """Victims, the search and its follow-ups; the parent run closed with how it ended."""
    status, outcome = "FAILED", _Outcome()
    try:
        cache, records = prepare_victims(spec)
        parent.log_victims(records)
        ctx = StudyContext(
            spec=spec,
            study_dir=spec.study_dir,
            victim_cache=cache.root,
            victims=tuple(spec.victim_configs()),
            stage_cache=spec.storage_root() / "stages" if spec.study.stage_cache else None,
        )
        outcome = _search(spec, ctx, parent, resume)
        status = "FINISHED" if outcome.grid.num_errors == 0 else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.finish(spec, outcome.best, status=status)
    return outcome


def _search(spec: StudySpec, ctx: StudyContext, parent: ParentRun, resume: bool) -> _Outcome:
    """Tune's search, then lost trials run again, refits and nested folds; their timings go to
    ``study.json`` and the Parquet parts are consolidated."""
    suffix = "_resumed" if resume else ""
    fit_start = time.perf_counter()
    grid = fit(build_tuner(spec, ctx, parent.tracker, resume))
    parent.ids[f"tune_fit_seconds{suffix}"] = time.perf_counter() - fit_start  # Tuner.fit alone
    full = disk_full(grid)
    if full is not None:  # a trial met a full disk: Tune's run was stopped and saved (see MlflowStudyCallback)
        raise full
    if interrupted(spec, grid):  # Tune stopped on SIGINT/SIGTERM and saved its state
        raise KeyboardInterrupt
    after_start = time.perf_counter()
    outcome = _Outcome(grid=grid)
    outcome.repaired = repair_lost_trials(spec, ctx, grid)
    outcome.refitted = run_refits(spec, ctx)
    outcome.folds = run_nested_folds(spec, ctx, parent.tracker)
    parent.ids[f"after_tune_seconds{suffix}"] = time.perf_counter() - after_start  # repairs, refits, nested folds
    parent.save_ids()
    StudyTables(spec.study_dir).consolidate()
    LiveOptuna(spec, spec.study_dir).rebuild()  # as analyze writes it: every stored trial, in the order they started
    outcome.best = best_trial(spec, grid)
    return outcome


def _print_summary(spec: StudySpec, parent: ParentRun, outcome: _Outcome, seconds: float) -> None:
    grid, best = outcome.grid, outcome.best
    pruned = sum(bool((grid[i].metrics or {}).get("pruned")) for i in range(len(grid)))
    print(
        f"[bdx-study] study {spec.study.name!r} done in {seconds:.0f} s: "
        f"{grid.num_terminated} trial(s) finished"
        + (f" ({pruned} pruned: stopped early by search.pruning: {spec.pruning.kind})" if pruned else "")
        + f", {grid.num_errors} failed"
        + (f", {outcome.repaired} run again after their stored result was lost" if outcome.repaired else "")
        + (f"; {outcome.refitted} refit(s)" if outcome.refitted else "")
        + (f"; {outcome.folds} nested fold(s)" if outcome.folds else ""),
        flush=True,
    )
    if best.get("objective") is not None:  # None: every trial failed
        print(
            f"[bdx-study] best trial {best['trial_id']}: {spec.search.objective.selection_key} "
            f"{best['objective']:.4f}{'' if best['feasible'] else ' (infeasible)'} (selection split; "
            "`bdx-study analyze` reports the evaluation split)",
            flush=True,
        )
    print(f"[bdx-study] tables: {spec.study_dir / 'tables'}", flush=True)
    tracker = parent.tracker
    if parent.ok and tracker.experiment_id:
        link = runs_link(tracker.uri, tracker.experiment_id, spec.search.objective.mode, spec.study.name)
        print(f"[bdx-study] MLflow: {ui_command(tracker.uri)}  then open {link}", flush=True)
