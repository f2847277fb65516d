"""The selection rule, in one place: which of a family's trials is best, judged on the selection
split only. Used by ``analyze`` (robust defaults), by the refit stage (which configs to refit)
and by nested held-out folds (which config a fold's search picked).

Rule: among trials that meet the study's clean-accuracy constraint on every victim (clean
victims included), the best aggregate (worst case by default) of the objective metric across
victims; ties go to the better mean. When no trial is feasible, the best of all is taken and
marked infeasible. Aggregation and feasibility: :mod:`bdx_study.objective`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bdx_study.metrics import HIGHER_IS_BETTER
from bdx_study.objective import feasible_rows, worst_op


@dataclass
class Selection:
    trial_id: str
    score: float  # the aggregate objective on the victims it was selected on
    mean: float
    feasible: bool


def is_pruned(rows: pd.DataFrame) -> pd.Series:
    """Per row: whether its trial was pruned (``search.pruning``; rows written before pruning
    existed were not). A pruned trial is never picked: it did not see every victim."""
    if "pruned" not in rows.columns:
        return pd.Series(False, index=rows.index)
    return rows["pruned"].astype("boolean").fillna(False).astype(bool)


def board(
    df: pd.DataFrame,
    metric: str,
    aggregate: str,
    max_drop: float | None,
    prefix: str = "selection_",
    by: str = "trial_id",
) -> pd.DataFrame:
    """Per trial (``by``): worst and mean of ``prefix + metric`` over the victims where it is
    defined, feasibility from the clean-accuracy drop over *every* victim, and the selection
    ``score``; sorted best first (feasible before infeasible). Pruned trials are left out."""
    df = df[~is_pruned(df)]
    col = prefix + metric
    higher = metric in HIGHER_IS_BETTER
    g = df.dropna(subset=[col]).groupby(by)[col]
    out = pd.DataFrame({"worst": g.agg(worst_op(metric)), "mean": g.mean(), "victims": g.size()})
    # reindexed: on a frame where no trial has a defined metric the board stays empty
    out["worst_clean_acc_drop"] = df.groupby(by)[prefix + "clean_acc_drop"].max().reindex(out.index)
    out["score"] = out["worst"] if aggregate == "worst" else out["mean"]
    out["feasible"] = feasible_rows(out["worst_clean_acc_drop"], max_drop)
    sign = 1 if higher else -1
    key = pd.DataFrame({"f": out["feasible"].astype(int), "s": sign * out["score"], "m": sign * out["mean"]})
    order = key.sort_values(["f", "s", "m"], ascending=False).index
    return out.loc[order]


def select(
    df: pd.DataFrame, metric: str, aggregate: str, max_drop: float | None, prefix: str = "selection_"
) -> tuple[Selection, pd.DataFrame]:
    """Apply the rule to the rows ``df`` (trial x victim, one family) and return the pick and the
    per-trial board (best first)."""
    b = board(df, metric, aggregate, max_drop, prefix)
    if b.empty:
        raise ValueError(f"no trial has a defined {prefix + metric} (are all victims clean?)")
    best = b.index[0]
    row = b.loc[best]
    return Selection(str(best), float(row["score"]), float(row["mean"]), bool(row["feasible"])), b


def top_k(df: pd.DataFrame, k: int, metric: str, aggregate: str, max_drop: float | None) -> list[str]:
    """The ``k`` best trials of one family by the rule (the candidates refits re-examine)."""
    if k <= 0 or df.empty:
        return []
    try:
        return [str(t) for t in board(df, metric, aggregate, max_drop).index[:k]]
    except KeyError:
        return []
