"""Aggregation over victims and feasibility (bdx_study.objective), and that the search, the
selection rule and the analysis judge a trial the same way on synthetic tables."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bdx_study.objective import (
    FEASIBILITY_TOLERANCE,
    aggregate,
    feasible,
    feasible_rows,
    mean,
    over_victims,
    over_victims_rows,
    reduction,
    worst,
)
from bdx_study.selection import board, select
from bdx_study.space import load_space

from .conftest import tiny_study, write_study


def test_worst_and_mean_over_victims_skip_undefined_values() -> None:
    vals = [0.9, float("nan"), 0.6, 0.8]
    assert over_victims(vals, "auroc_correct_only", "worst") == 0.6  # higher is better: the minimum
    assert over_victims(vals, "attack_success_after", "worst") == 0.9  # lower is better: the maximum
    assert over_victims(vals, "auroc_correct_only", "mean") == pytest.approx(2.3 / 3)
    assert math.isnan(over_victims([float("nan")], "auroc_correct_only", "mean"))
    assert (reduction("auroc_correct_only", "worst"), reduction("clean_acc_drop", "worst")) == ("min", "max")
    assert reduction("auroc_correct_only", "mean") == "mean"


def test_rows_aggregate_like_one_column_at_a_time() -> None:
    stack = np.array([[0.9, 0.5, np.nan], [0.7, 0.8, 0.6]])  # victims x resamples
    for metric in ("auroc_correct_only", "attack_success_after"):
        for how in ("worst", "mean"):
            got = over_victims_rows(stack, metric, how)
            assert got.tolist() == pytest.approx([over_victims(c, metric, how) for c in stack.T])


def test_feasibility_has_one_tolerance() -> None:
    limit = 0.1
    assert feasible(float(np.nextafter(limit, 1.0)), limit) and feasible(limit + FEASIBILITY_TOLERANCE / 2, limit)
    assert not feasible(limit + 1e-9, limit)
    assert feasible(5.0, None)
    rows = feasible_rows(pd.Series([0.0, limit + FEASIBILITY_TOLERANCE / 2, limit + 1e-9]), limit)
    assert isinstance(rows, pd.Series) and rows.tolist() == [True, True, False]


def _trials() -> pd.DataFrame:
    """Three trials on two victims: t1 best worst case but over the drop limit (0.1), t2 and t3
    tied on the worst case (t3 the better mean, its drop a rounding error above the limit)."""
    rows = []
    for trial, aurocs, drop in (("t1", (0.99, 0.95), 0.2), ("t2", (0.8, 0.9), 0.05), ("t3", (0.8, 0.97), 0.1)):
        for victim, a in zip(("v1", "v2"), aurocs, strict=True):
            rows.append(
                {
                    "trial_id": trial,
                    "victim_id": victim,
                    "selection_auroc_correct_only": a,
                    # t3 sits one float above the limit: feasible only through the tolerance
                    "selection_clean_acc_drop": float(np.nextafter(drop, 1.0)) if trial == "t3" else drop,
                }
            )
    return pd.DataFrame(rows)


def test_selection_ranks_feasible_first_then_worst_case_then_mean() -> None:
    df = _trials()
    pick, b = select(df, "auroc_correct_only", "worst", 0.1)
    assert pick.trial_id == "t3" and pick.feasible and pick.score == 0.8
    assert list(b.index) == ["t3", "t2", "t1"] and not b.loc["t1", "feasible"]
    by_mean = board(df, "auroc_correct_only", "mean", None)
    assert list(by_mean.index) == ["t1", "t3", "t2"]  # no constraint: t1's mean 0.97 wins
    assert by_mean["score"].tolist() == pytest.approx([0.97, 0.885, 0.85])


def test_the_search_and_the_selection_rule_agree_on_feasibility(tmp_path: Path) -> None:
    """A trial one rounding error above the drop limit is feasible to the search's objective as
    to the selection rule; one clearly above is pushed behind every feasible value."""
    from bdx_study.trials.context import objective_value

    doc = tiny_study(tmp_path, search__constraint={"max_clean_acc_drop": 0.1})
    spec = load_space(write_study(tmp_path, doc))
    key = spec.search.objective.selection_key
    at_limit = {key: 0.8, "worst/selection_clean_acc_drop": float(np.nextafter(0.1, 1.0))}
    assert objective_value(spec, at_limit) == (0.8, True)
    value, ok = objective_value(spec, {key: 0.8, "worst/selection_clean_acc_drop": 0.3})
    assert not ok and value == pytest.approx(0.8 - 1.0 - 0.2)
    # a drop measured on no victim: infeasible to both (the board's max of NaN fails the constraint)
    value, ok = objective_value(spec, {key: 0.8})
    assert not ok and value == pytest.approx(0.8 - 2.0)
    frame = pd.DataFrame(
        {"trial_id": ["t"], "selection_auroc_correct_only": [0.8], "selection_clean_acc_drop": [math.nan]}
    )
    assert not board(frame, "auroc_correct_only", "worst", 0.1)["feasible"].any()


def test_worst_skips_non_finite_values_and_is_nan_when_none_is_left() -> None:
    assert worst([0.7, math.inf, -math.inf, 0.9], "auroc_correct_only") == 0.7
    assert worst(np.array([0.2, math.nan, 0.5]), "clean_acc_drop") == 0.5  # lower is better: the maximum
    assert math.isnan(worst([], "auroc_correct_only")) and math.isnan(worst([math.nan], "clean_acc_drop"))
    assert mean([0.2, math.nan, 0.4]) == pytest.approx(0.3) and math.isnan(mean([]))
    assert over_victims([0.2, 0.4], "clean_acc_drop", "mean") == pytest.approx(0.3)
    assert reduction("clean_acc_drop", "mean") == "mean"


def test_aggregate_reports_every_directed_metric_over_the_defined_victims() -> None:
    """The search's per-trial aggregates: a clean victim (NaN AUROC) counts for the clean-accuracy
    drop only; a metric without a direction (the threshold) and an unknown name are not reported."""
    per_victim = [
        {"auroc_correct_only": 0.9, "clean_acc_drop": 0.01, "threshold": 3.0, "custom": 1.0},
        {"auroc_correct_only": 0.6, "clean_acc_drop": 0.02, "threshold": 5.0, "custom": 2.0},
        {"auroc_correct_only": math.nan, "clean_acc_drop": 0.08, "threshold": 4.0, "custom": 3.0},
    ]
    got = aggregate(per_victim)
    assert set(got) == {
        "mean/auroc_correct_only",
        "worst/auroc_correct_only",
        "mean/clean_acc_drop",
        "worst/clean_acc_drop",
    }
    assert got["worst/auroc_correct_only"] == 0.6 and got["mean/auroc_correct_only"] == pytest.approx(0.75)
    assert got["worst/clean_acc_drop"] == 0.08 and got["mean/clean_acc_drop"] == pytest.approx(0.11 / 3)
    assert aggregate([]) == {}


def test_rows_of_an_all_undefined_column_stay_undefined() -> None:
    stack = np.array([[0.9, np.nan], [0.7, np.nan]])
    with pytest.warns(RuntimeWarning):
        got = over_victims_rows(stack, "auroc_correct_only", "worst")
    assert got[0] == 0.7 and math.isnan(got[1])


def test_feasibility_at_the_limit_and_without_a_constraint() -> None:
    assert feasible(0.1, 0.1) and feasible(0.0, 0.0) and not feasible(0.1 + 2 * FEASIBILITY_TOLERANCE, 0.1)
    assert feasible_rows(pd.Series([0.5, 0.9]), None) is True
    assert FEASIBILITY_TOLERANCE < 1e-9  # a real drop (1 image in 10^9) is never forgiven


def test_the_search_aggregates_and_the_selection_board_agree() -> None:
    """For each trial, the search's ``aggregate`` of its per-victim metrics (selection split) and
    the selection rule's board give the same worst case, mean and worst drop."""
    df = _trials()
    b = board(df, "auroc_correct_only", "worst", 0.1)
    for trial, rows in df.groupby("trial_id"):
        per_victim = [
            {"auroc_correct_only": r.selection_auroc_correct_only, "clean_acc_drop": r.selection_clean_acc_drop}
            for r in rows.itertuples()
        ]
        got = aggregate(per_victim)
        assert b.loc[trial, "worst"] == got["worst/auroc_correct_only"]
        assert b.loc[trial, "mean"] == pytest.approx(got["mean/auroc_correct_only"])
        assert b.loc[trial, "worst_clean_acc_drop"] == got["worst/clean_acc_drop"]
        assert b.loc[trial, "feasible"] == feasible(got["worst/clean_acc_drop"], 0.1)
