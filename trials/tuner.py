"""Ray Tune for a study: a trial's resources, the Tuner (a new search, or the one a resume
restores), running it, and reading what it left (interrupted? the best trial)."""

from __future__ import annotations

import functools
import math
import signal
import threading
from typing import Any

from bdx_study._io import DiskFullError, disk_full_error, disk_full_reported, is_disk_full
from bdx_study.space import SpaceError, StudySpec
from bdx_study.tables import StudyTables

from .context import StudyContext
from .tracking import MlflowStudyCallback, StudyTracker


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """Ray resources of one trial (and one victim-training task): fractions of a GPU pack several
    trials on one device; they are logical, so each trial must fit in its share of memory."""
    return {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}


def check_resources(spec: StudySpec) -> None:
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


def as_task(spec: StudySpec, fn: Any) -> Any:
    """``fn(ctx, ...)`` as a Ray task with a trial's resources and retries (work done outside
    Tune's trials); a full disk it meets comes back as one :class:`DiskFullError`."""
    import ray

    res = trial_resources(spec)

    @functools.wraps(fn)
    def task(ctx: StudyContext, *args: Any) -> Any:
        with disk_full_reported(f"running {fn.__name__.strip('_')}", ctx.places()):
            return fn(ctx, *args)

    return ray.remote(task).options(num_cpus=res["cpu"], num_gpus=res["gpu"], max_retries=spec.resources.max_failures)


def build_tuner(
    spec: StudySpec, ctx: StudyContext, tracker: StudyTracker, resume: bool, fold: str | None = None
) -> Any:
    """The study's Tuner: restored from ``<study>/tune`` on a resume, else a new search (one
    FamilySearcher over the study's families, MLflow logging through the driver's callback)."""
    from ray import tune

    from .search import FamilySearcher
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
            search_alg=FamilySearcher(spec),
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


def fit(tuner: Any) -> Any:
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


def interrupted(spec: StudySpec, grid: Any) -> bool:
    """Whether Tune's run ended before every trial ran (it returns normally after SIGINT)."""
    return len(grid) < spec.num_trials or grid.num_terminated + grid.num_errors < len(grid)


def disk_full(grid: Any) -> DiskFullError | None:
    """The full disk a trial of Tune's run last failed on, if one did."""
    for i in range(len(grid)):
        err = grid[i].error
        if err is not None and is_disk_full(err):
            return disk_full_error(err)
    return None


def best_trial(spec: StudySpec, grid: Any) -> dict[str, Any]:
    """The best trial of Tune's run by the objective (selection split): id, objective, feasible.
    A pruned trial's objective covers only the victims it saw: it is never the best."""
    sign = 1.0 if spec.search.objective.mode == "max" else -1.0
    best: dict[str, Any] = {}
    for i in range(len(grid)):
        r = grid[i]
        m = r.metrics or {}
        value = m.get("objective")
        if r.error is not None or m.get("pruned") or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if not best or sign * value > sign * best["objective"]:
            best = {"trial_id": m.get("trial_id"), "objective": value, "feasible": bool(m.get("feasible"))}
    return best
