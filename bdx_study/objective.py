"""Aggregation over victims and feasibility, in one place: what the search optimizes
(``trials``), what the selection rule ranks (:mod:`bdx_study.selection`) and what ``analyze``
reports (robust defaults, uncertainty, the Pareto front) all aggregate and judge this way.

- the *worst case* of a per-victim metric is its minimum when higher is better, its maximum
  when lower is better, over the victims where it is defined (finite); the *mean* is over the
  victims where it is defined (not NaN);
- a trial is *feasible* when its worst-case clean-accuracy drop (over every victim) is at most
  ``search.constraint.max_clean_acc_drop``, up to :data:`FEASIBILITY_TOLERANCE` (a drop computed
  as 0.1 + 2e-17 meets a limit of 0.1). The search (``trials.context.objective_value``) pushes
  an infeasible trial behind every feasible one; the selection rule ranks it after them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np

from bdx_study.metrics import HIGHER_IS_BETTER, LOWER_IS_BETTER

if TYPE_CHECKING:
    import pandas as pd

Aggregate = Literal["worst", "mean"]
FEASIBILITY_TOLERANCE = 1e-12  # float rounding in a drop of accuracies must not make a trial infeasible


def worst_op(metric: str) -> Literal["min", "max"]:
    """The reduction that gives the worst case of ``metric``: min if higher is better, else max."""
    return "min" if metric in HIGHER_IS_BETTER else "max"


def reduction(metric: str, aggregate: str) -> Literal["min", "max", "mean"]:
    """The pandas/numpy reduction name of ``aggregate`` (worst | mean) for ``metric``."""
    return worst_op(metric) if aggregate == "worst" else "mean"


def worst(values: np.ndarray | list[float], metric: str) -> float:
    """The worst of ``values`` for ``metric`` (min if higher is better, else max) over the finite
    ones; NaN if none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if not arr.size:
        return math.nan
    return float(arr.min() if metric in HIGHER_IS_BETTER else arr.max())


def mean(values: np.ndarray | list[float]) -> float:
    """The mean of ``values`` over the defined (not NaN) ones; NaN if none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


def over_victims(values: np.ndarray | list[float], metric: str, aggregate: str) -> float:
    """``aggregate`` (worst | mean) of one per-victim ``metric`` across victims."""
    return worst(values, metric) if aggregate == "worst" else mean(values)


def over_victims_rows(stack: np.ndarray, metric: str, aggregate: str) -> np.ndarray:
    """``aggregate`` across victims of a (victims x resamples) array, column by column, ignoring
    NaN (a bootstrap of a study-level figure)."""
    if aggregate == "worst":
        return np.nanmin(stack, axis=0) if metric in HIGHER_IS_BETTER else np.nanmax(stack, axis=0)
    return np.nanmean(stack, axis=0)


def aggregate(per_victim: list[dict[str, float]]) -> dict[str, float]:
    """``mean/<metric>`` and ``worst/<metric>`` across victims of every metric with a direction,
    skipping undefined (non-finite) values (e.g. detection metrics on a clean victim)."""
    out: dict[str, float] = {}
    for name in sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER):
        vals = [v[name] for v in per_victim if name in v and math.isfinite(v[name])]
        if not vals:
            continue
        out[f"mean/{name}"] = float(np.mean(vals))
        out[f"worst/{name}"] = worst(vals, name)
    return out


def feasible(worst_drop: float, max_drop: float | None) -> bool:
    """Whether a worst-case clean-accuracy drop meets the constraint (None: no constraint)."""
    return max_drop is None or bool(worst_drop <= max_drop + FEASIBILITY_TOLERANCE)


def feasible_rows(worst_drops: pd.Series, max_drop: float | None) -> pd.Series | bool:
    """:func:`feasible` of each row (True for all when there is no constraint)."""
    return True if max_drop is None else worst_drops <= max_drop + FEASIBILITY_TOLERANCE
