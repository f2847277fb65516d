"""Strictly held-out validation (``search.nested_folds``): for each value of each group column,
the whole search again on the other victims only, then each family's pick measured on the
held-out victims."""

from __future__ import annotations

from typing import Any

from bdx_study.folds import fold_spec, held_out_victims
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables

from .context import StudyContext
from .followups import repair_lost_trials
from .tracking import StudyTracker
from .tuner import as_task, build_tuner, fit, interrupted


def _heldout(ctx: StudyContext, trial_row: dict[str, Any]) -> str:
    from .trainable import execute_heldout

    return execute_heldout(ctx, trial_row)


def _fold_search(fs: StudySpec, ctx: StudyContext, tracker: StudyTracker) -> None:
    """The search of fold ``fs`` on its victims (resumed where a killed launch left it)."""
    from ray import tune

    fold_ctx = StudyContext(
        spec=fs,
        study_dir=fs.study_dir,
        victim_cache=ctx.victim_cache,
        victims=tuple(fs.victim_configs()),
        stage_cache=ctx.stage_cache,
    )
    fs.study_dir.mkdir(parents=True, exist_ok=True)
    tune_dir = fs.study_dir / "tune"
    resume = tune_dir.exists() and tune.Tuner.can_restore(str(tune_dir))
    grid = fit(build_tuner(fs, fold_ctx, tracker, resume, fold=fs.study.name))
    if interrupted(fs, grid):
        raise KeyboardInterrupt
    repair_lost_trials(fs, fold_ctx, grid)


def _fold_picks(spec: StudySpec, tables: StudyTables) -> list[dict[str, Any]]:
    """Each family's pick among a fold's trials, by the study's selection rule (trial rows)."""
    from bdx_study.selection import select

    obj, max_drop = spec.search.objective, spec.search.constraint.max_clean_acc_drop
    df = tables.read("trials").to_pandas()
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
    return rows


def run_nested_folds(spec: StudySpec, ctx: StudyContext, tracker: StudyTracker) -> int:
    """For each value of each ``search.nested_folds`` column, the whole search again on the
    other victims only (a sub-study beside this one, its trials tagged ``bdx.fold`` in MLflow),
    then each family's pick (by the same selection rule) measured on the held-out victims.
    Folds already measured are kept. Returns folds run now."""
    import ray

    task = as_task(spec, _heldout)
    ran = 0
    for column in spec.search.nested_folds:
        for value in spec.group_values(column):
            fs = fold_spec(spec, column, value)
            tables = StudyTables(fs.study_dir)
            if len(tables.finished_trials(kind="heldout")) >= len(spec.families):
                continue
            print(f"[bdx-study] nested fold {fs.study.name}: the search again without {column}={value}", flush=True)
            _fold_search(fs, ctx, tracker)
            held_ctx = StudyContext(
                spec=spec,
                study_dir=fs.study_dir,
                victim_cache=ctx.victim_cache,
                victims=tuple(held_out_victims(spec, column, value)),
                stage_cache=ctx.stage_cache,
            )
            ray.get([task.remote(held_ctx, row) for row in _fold_picks(spec, tables)])
            ran += 1
    return ran
