"""Pruning (bdx_study.pruning) on synthetic study states: which trials stop, in which victim
order, that exact pruning never changes the configs that matter, Optuna's pruners on the stored
trials, the searcher's Optuna records and what analyze reports. Nothing here trains a model;
tests/test_pruning_study.py runs real studies."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest

from bdx_study.objective import aggregate
from bdx_study.pruning import TrialPruner, configs_that_matter, intermediate_values, savings, tpe_good_group
from bdx_study.selection import board, top_k
from bdx_study.space import StudySpec, parse_space
from bdx_study.trials.search import FamilySearcher

from .conftest import tiny_study

METRIC = "auroc_correct_only"


def _spec(tmp_path: Path, **search: Any) -> StudySpec:
    doc = tiny_study(tmp_path)
    doc["search"].update(search)
    return parse_space(doc, "study.yaml")


def _rows(trial: str, sel: list[float], drops: list[float] | None = None, pruned: bool = False) -> pd.DataFrame:
    """A stored trial: one row per victim v0, v1, ... (in that evaluation order)."""
    drops = drops or [0.0] * len(sel)
    running = [min(sel[: i + 1]) for i in range(len(sel))]
    return pd.DataFrame(
        {
            "trial_id": trial,
            "detector": "badexpert",
            "victim_id": [f"v{i}" for i in range(len(sel))],
            f"selection_{METRIC}": sel,
            "selection_clean_acc_drop": drops,
            "pruned": pruned,
            "victim_step": list(range(1, len(sel) + 1)),
            "running_objective": running,
            "pruner_attrs": None,
            "objective": running[-1],
            "started_at": float(int(trial.strip("t") or 0)),
            "victims_planned": 3,
            "trial_seconds": 3.0 * len(sel),
        }
    )


def _stored(*trials: pd.DataFrame) -> pd.DataFrame:
    return pd.concat(trials, ignore_index=True) if trials else _rows("t0", [0.5]).iloc[:0]


def _agg(sel: list[float], drops: list[float] | None = None) -> dict[str, float]:
    drops = drops or [0.0] * len(sel)
    out = {}
    for k, v in aggregate([{METRIC: s, "clean_acc_drop": d} for s, d in zip(sel, drops, strict=True)]).items():
        how, _, m = k.partition("/")
        out[f"{how}/selection_{m}"] = v
    return out


class _Victim:
    def __init__(self, key: str) -> None:
        self.key = key


# ------------------------------------------------------------------------------------ settings


def test_default_pruning_is_exact_only_where_it_is_exact(tmp_path: Path) -> None:
    assert _spec(tmp_path).pruning.kind == "exact"  # worst case, random sampler
    assert _spec(tmp_path, sampler="tpe").pruning.kind == "exact"
    assert _spec(tmp_path, objective={"aggregate": "mean"}).pruning.kind == "none"
    assert _spec(tmp_path, pruning={"kind": "none"}).pruning.kind == "none"
    sh = _spec(tmp_path, objective={"aggregate": "mean"}, pruning={"kind": "successive_halving"}).pruning
    assert sh.kind == "successive_halving" and sh.reduction_factor == 3


def test_configs_that_matter(tmp_path: Path) -> None:
    assert configs_that_matter(_spec(tmp_path, sampler="random", num_trials=40), "badexpert") == 1
    assert configs_that_matter(_spec(tmp_path, sampler="random", refit={"top_k": 3}), "badexpert") == 3
    # TPE: its good group at the end of the budget, so TPE splits trials alike with or without pruning
    assert configs_that_matter(_spec(tmp_path, sampler="tpe", num_trials=40), "badexpert") == 4
    assert configs_that_matter(_spec(tmp_path, sampler="tpe", num_trials=1000), "badexpert") == 25
    from optuna.samplers._tpe.sampler import default_gamma  # the rule tpe_good_group restates

    assert all(tpe_good_group(n) == default_gamma(n) for n in range(1, 400))


# ---------------------------------------------------------------------------------- exact


def test_exact_waits_for_k_trials_then_stops_strictly_behind_the_kth(tmp_path: Path) -> None:
    spec = _spec(tmp_path, refit={"top_k": 2})  # k = 2
    one = TrialPruner(spec, "badexpert", _stored(_rows("t1", [0.9, 0.8, 0.85])))
    assert one.bar is None and not one.stop(1, 3, _agg([0.1]), 0.1)  # one trial: nothing can be ruled out
    stored = _stored(_rows("t1", [0.9, 0.8, 0.85]), _rows("t2", [0.7, 0.75, 0.72]), _rows("t3", [0.2, 0.3, 0.4]))
    p = TrialPruner(spec, "badexpert", stored)
    assert p.bar == (0.7, True)  # the 2nd best worst case
    assert p.stop(1, 3, _agg([0.69]), 0.69)
    assert not p.stop(1, 3, _agg([0.7]), 0.7)  # a tie could still be picked (the mean decides)
    assert not p.stop(2, 3, _agg([0.95, 0.71]), 0.71)
    assert not p.stop(3, 3, _agg([0.95, 0.71, 0.1]), 0.1)  # never after the last victim: the trial is complete
    # a pruned stored trial is not among the configs to beat, however good it looked
    q = TrialPruner(spec, "badexpert", _stored(_rows("t1", [0.9, 0.8, 0.85]), _rows("t4", [0.99], pruned=True)))
    assert q.bar is None


def test_exact_feasibility(tmp_path: Path) -> None:
    spec = _spec(tmp_path, constraint={"max_clean_acc_drop": 0.1})
    feasible = TrialPruner(spec, "badexpert", _stored(_rows("t1", [0.6, 0.7, 0.65])))
    assert feasible.stop(1, 3, _agg([0.99], [0.2]), 0.99 - 1.1)  # infeasible already; the best is feasible
    assert not feasible.stop(1, 3, _agg([0.99], [0.1]), 0.99)
    # the k-th best is infeasible: no running trial can be ruled out (it may be the first feasible one)
    infeasible = TrialPruner(spec, "badexpert", _stored(_rows("t1", [0.9, 0.9, 0.9], [0.3, 0.0, 0.0])))
    assert infeasible.bar == (0.9, False)
    assert not infeasible.stop(1, 3, _agg([0.1], [0.5]), -1.0)


def test_exact_on_a_lower_is_better_metric(tmp_path: Path) -> None:
    spec = _spec(tmp_path, objective={"metric": "clean_acc_drop", "aggregate": "worst"})
    stored = _rows("t1", [0.0, 0.0, 0.0]).assign(selection_clean_acc_drop=[0.05, 0.02, 0.03])
    p = TrialPruner(spec, "badexpert", stored)
    assert p.bar == (0.05, True)
    agg = {"worst/selection_clean_acc_drop": 0.06}
    assert p.stop(1, 3, agg, 0.06) and not p.stop(1, 3, {"worst/selection_clean_acc_drop": 0.05}, 0.05)


def test_victim_order_hardest_first_and_deterministic(tmp_path: Path) -> None:
    victims = tuple(_Victim(f"v{i}") for i in range(4))
    stored = _stored(_rows("t1", [0.9, 0.5, 0.7]), _rows("t2", [0.8, 0.6, 0.9]))  # means: v0 .85, v1 .55, v2 .8
    p = TrialPruner(_spec(tmp_path), "badexpert", stored)
    assert p.order(victims) == [1, 2, 0, 3]  # v3 never measured: last
    assert TrialPruner(_spec(tmp_path), "badexpert", stored).order(victims) == [1, 2, 0, 3]
    assert TrialPruner(_spec(tmp_path), "badexpert", _stored()).order(victims) == [0, 1, 2, 3]
    median = _spec(tmp_path, pruning={"kind": "median"})  # approximate pruners compare steps: the study's order
    assert TrialPruner(median, "badexpert", stored).order(victims) == [0, 1, 2, 3]


@pytest.mark.parametrize("k", [1, 3])
def test_exact_pruning_never_changes_the_configs_that_matter(tmp_path: Path, k: int) -> None:
    """Random studies of 30 trials x 6 victims, run without and with exact pruning (one trial at
    a time, hardest first): the top k of the selection rule's board are the same trials, in the
    same order, and the pruned trials did skip victims."""
    spec = _spec(tmp_path, refit={"top_k": k}, constraint={"max_clean_acc_drop": 0.1})
    rng = np.random.default_rng(k)
    skipped = 0
    for _ in range(20):
        sel = rng.uniform(0.3, 1.0, (30, 6)).round(2)  # rounded: ties happen
        drops = rng.uniform(0.0, 0.13, (30, 6)).round(2)
        full = _stored(*(_rows(f"t{i}", list(sel[i]), list(drops[i])) for i in range(30)))
        kept: list[pd.DataFrame] = []
        for i in range(30):
            pruner = TrialPruner(spec, "badexpert", _stored(*kept))
            order = pruner.order(tuple(_Victim(f"v{j}") for j in range(6)))
            done: list[int] = []
            for step, j in enumerate(order, start=1):
                done.append(j)
                if pruner.stop(step, 6, _agg([sel[i][d] for d in done], [drops[i][d] for d in done]), math.nan):
                    break
            rows = _rows(f"t{i}", list(sel[i]), list(drops[i])).iloc[sorted(done)]
            kept.append(rows.assign(pruned=len(done) < 6))
            skipped += 6 - len(done)
        with_pruning = _stored(*kept)
        assert top_k(with_pruning, k, METRIC, "worst", 0.1) == top_k(full, k, METRIC, "worst", 0.1)
    assert skipped > 0


# ------------------------------------------------------------------------- Optuna's pruners


def test_median_pruner_on_the_stored_trials(tmp_path: Path) -> None:
    spec = _spec(tmp_path, objective={"aggregate": "mean"}, pruning={"kind": "median", "n_startup_trials": 2})
    stored = _stored(_rows("t1", [0.9, 0.9, 0.9]), _rows("t2", [0.8, 0.8, 0.8]))
    assert not TrialPruner(spec, "badexpert", stored.iloc[:3]).stop(1, 3, {}, 0.1)  # one finished trial: startup
    p = TrialPruner(spec, "badexpert", stored)
    assert not p.stop(1, 3, {}, math.nan)  # undefined so far: nothing to compare
    assert not p.stop(1, 3, {}, 0.86)  # above the median (0.85) at step 1
    assert not p.stop(2, 3, {}, 0.84)  # Optuna's rule: the trial's best step so far (0.86) against the median
    assert TrialPruner(spec, "badexpert", stored).stop(1, 3, {}, 0.84)


def test_successive_halving_keeps_its_rungs_in_the_tables(tmp_path: Path) -> None:
    spec = _spec(tmp_path, objective={"aggregate": "mean"}, pruning={"kind": "successive_halving"})
    first = TrialPruner(spec, "badexpert", _stored())
    assert not first.stop(1, 3, {}, 0.9)  # alone at rung 0: promoted
    assert first.attrs == {"completed_rung_0": 0.9}
    stored = _rows("t1", [0.9, 0.9, 0.9]).assign(pruner_attrs=json.dumps(first.attrs))
    second = TrialPruner(spec, "badexpert", stored)
    assert second.stop(1, 3, {}, 0.5)  # rung 0 against the stored trial's record: not in the top third
    assert second.attrs == {"completed_rung_0": 0.5}


def test_intermediate_values_from_rows() -> None:
    rows = _rows("t1", [0.9, 0.5, 0.7])
    assert intermediate_values(rows) == {1: 0.9, 2: 0.5, 3: 0.5}
    assert intermediate_values(rows.assign(running_objective=[math.nan, 0.5, None])) == {2: 0.5}


# ---------------------------------------------------------------------- searcher and analysis


def test_searcher_records_progress_and_pruned_trials(tmp_path: Path) -> None:
    searcher = FamilySearcher(_spec(tmp_path))
    for tid in ("a", "b"):
        assert searcher.suggest(tid)["detector"] == "badexpert"
    searcher.on_trial_result("a", {"objective": 0.8, "victims_done": 1.0})
    searcher.on_trial_result("a", {"objective": 0.7, "victims_done": 2.0})
    searcher.on_trial_complete("a", {"objective": 0.6, "victims_done": 3.0, "pruned": 0.0})
    searcher.on_trial_result("b", {"objective": 0.5, "victims_done": 1.0})
    searcher.on_trial_complete("b", {"objective": 0.5, "victims_done": 1.0, "pruned": 1.0})
    a, b = searcher._studies["badexpert"].trials
    assert a.state == optuna.trial.TrialState.COMPLETE and a.value == 0.6
    assert a.intermediate_values == {1: 0.8, 2: 0.7}
    assert b.state == optuna.trial.TrialState.PRUNED and b.intermediate_values == {1: 0.5}


def test_board_never_ranks_a_pruned_trial_and_savings_are_counted() -> None:
    df = _stored(_rows("t1", [0.6, 0.6, 0.6]), _rows("t2", [0.95], pruned=True), _rows("t3", [0.5, 0.5], pruned=True))
    assert list(board(df, METRIC, "worst", None).index) == ["t1"]
    s = savings(df)
    assert (s["trials"], s["pruned"], s["evaluated"], s["skipped"]) == (3, 2, 6, 3)
    assert s["seconds_skipped"] == pytest.approx(3 * 3.0)  # the complete trial's 3 s per victim
    old = df.drop(columns=["pruned", "victims_planned"])  # tables written before pruning existed
    assert savings(old)["pruned"] == 0 and len(board(old, METRIC, "worst", None)) == 3
