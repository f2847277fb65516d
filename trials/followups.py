"""What a study runs after Tune's search, as Ray tasks: the trials whose stored result was lost,
and the refits of each family's best configs (refit uncertainty)."""

from __future__ import annotations

from typing import Any

from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables

from .context import StudyContext
from .tuner import as_task


def _rerun(ctx: StudyContext, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
    from .trainable import execute_trial

    return execute_trial(ctx, trial_id, config)


def _refit(ctx: StudyContext, trial_row: dict[str, Any], index: int) -> str:
    from .trainable import execute_refit

    return execute_refit(ctx, trial_row, index)


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
    task = as_task(spec, _rerun)
    ray.get([task.remote(ctx, trial_id, config) for trial_id, config in lost])
    return len(lost)


def _refits_to_run(spec: StudySpec, tables: StudyTables) -> list[tuple[dict[str, Any], int]]:
    """(trial row, refit index) of every refit of the best configs not stored yet."""
    from bdx_study.selection import top_k

    rf = spec.search.refit
    try:
        df = tables.read("trials").to_pandas()
    except FileNotFoundError:
        return []
    done = tables.finished_trials(kind="refits")
    obj, max_drop = spec.search.objective, spec.search.constraint.max_clean_acc_drop
    todo = []
    for family in spec.families:
        rows = df[df["detector"] == family]
        for trial_id in top_k(rows, rf.top_k, obj.metric, obj.aggregate, max_drop):
            row = rows[rows["trial_id"] == trial_id].iloc[0].to_dict()
            todo += [(row, r) for r in range(1, rf.repeats + 1) if f"{trial_id}-refit{r}" not in done]
    return todo


def run_refits(spec: StudySpec, ctx: StudyContext) -> int:
    """Refit uncertainty: each family's ``search.refit.top_k`` best configs (by the selection
    rule, selection split) fitted again ``repeats`` times with fresh seeds and fresh draws of D_c,
    as Ray tasks; refits already stored are kept. Returns how many ran now."""
    import ray

    if spec.search.refit.top_k == 0:
        return 0
    todo = _refits_to_run(spec, StudyTables(spec.study_dir))
    if not todo:
        return 0
    print(f"[bdx-study] refitting: {len(todo)} fit(s) of the best configs with fresh seeds and D_c draws", flush=True)
    task = as_task(spec, _refit)
    ray.get([task.remote(ctx, row, r) for row, r in todo])
    return len(todo)
