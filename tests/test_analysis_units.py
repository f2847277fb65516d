"""Unit tests on small synthetic frames: the selection rule (bdx_study.selection), robust defaults
and their held-out evidence (analysis.robust), the uncertainty figures (analysis.uncertainty)
and the Pareto front (analysis.searches.pareto). Nothing here trains or scores a model."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from bdx_study.analysis.robust import comparison, family_board, robust_defaults, with_flat_params
from bdx_study.analysis.searches import pareto
from bdx_study.analysis.uncertainty import bootstrap_auroc, bootstrap_interval, refit_spread
from bdx_study.selection import Selection, board, select, top_k
from bdx_study.space import StudySpec, load_space

from .conftest import tiny_study, write_study

VICTIMS = (("v1", "badnet"), ("v2", "blend"), ("v3", "wanet"))  # one attack each: three leave-one-out groups


def _spec(tmp_path: Path, **search: Any) -> StudySpec:
    """The tiny study with two families (badexpert, then strip) and ``search`` overrides."""
    doc = tiny_study(tmp_path)
    doc["detectors"]["strip"] = {"num_images": {"dist": "choice", "values": [4, 8]}}
    doc["search"].update(search)
    return load_space(write_study(tmp_path, doc))


def _trial_rows(
    family: str, trial: str, sel: tuple[float, ...], ev: tuple[float, ...], drops: tuple[float, ...], seed: int = 0
) -> list[dict[str, Any]]:
    """One trial's rows (one per victim) shaped like the trials table: selection_ and evaluation
    AUROC, clean-accuracy drops (the same on both splits), victim groups, exact params JSON."""
    return [
        {
            "study": "tiny",
            "trial_id": trial,
            "refit_of": None,
            "refit_index": None,
            "detector": family,
            "victim_id": vid,
            "victim_name": f"{vid}-{attack}",
            "dataset": "digits",
            "architecture": "small_cnn",
            "attack": attack,
            "poison_rate": 0.1,
            "victim_seed": 0,
            "victim_epochs": 4,
            "params": json.dumps({"seed": seed, "trial": trial}),
            "clean_set_seed": 7,
            "target_fpr": 0.1,
            "selection_auroc_correct_only": s,
            "auroc_correct_only": e,
            "selection_clean_acc_drop": d,
            "clean_acc_drop": d,
            "attack_success_after": 1.0 - e,
        }
        for (vid, attack), s, e, d in zip(VICTIMS, sel, ev, drops, strict=True)
    ]


def _badexpert_trials() -> pd.DataFrame:
    """3 trials x 3 victims, constraint 0.1. tA: best mean (0.84) but worst case 0.62; tB: best
    worst case (0.73) among the feasible; tC: best on everything but a 0.3 drop on v3 (infeasible).
    The evaluation figures rank the other way round (tA best): selection must not look at them."""
    return pd.DataFrame(
        _trial_rows("badexpert", "tA", (0.95, 0.95, 0.62), (0.9, 0.9, 0.9), (0.02, 0.02, 0.02), seed=1)
        + _trial_rows("badexpert", "tB", (0.75, 0.74, 0.73), (0.5, 0.5, 0.5), (0.05, 0.05, 0.05), seed=2)
        + _trial_rows("badexpert", "tC", (0.99, 0.97, 0.98), (0.96, 0.99, 0.3), (0.0, 0.0, 0.3), seed=3)
    )


def _strip_trials() -> pd.DataFrame:
    """strip: two trials, both infeasible; its best worst case (0.9) beats badexpert's (0.73)."""
    return pd.DataFrame(
        _trial_rows("strip", "s1", (0.9, 0.9, 0.9), (0.8, 0.8, 0.8), (0.2, 0.2, 0.2))
        + _trial_rows("strip", "s2", (0.7, 0.7, 0.7), (0.6, 0.6, 0.6), (0.5, 0.5, 0.5))
    )


NO_REFITS = pd.DataFrame(columns=["trial_id", "refit_of", "detector"])


# --- the selection rule -------------------------------------------------------------------------


def test_board_worst_case_is_the_minimum_of_a_higher_is_better_metric() -> None:
    b = board(_badexpert_trials(), "auroc_correct_only", "worst", 0.1)
    assert list(b.index) == ["tB", "tA", "tC"]  # feasible first (tB before tA by worst case), then tC
    assert b.loc["tA", "worst"] == 0.62 and b.loc["tA", "mean"] == pytest.approx(0.84)
    assert b.loc["tC", "worst_clean_acc_drop"] == 0.3 and not b.loc["tC", "feasible"]
    assert b["victims"].tolist() == [3, 3, 3]
    assert b["score"].tolist() == b["worst"].tolist()


def test_select_worst_mean_and_no_constraint_pick_three_different_trials() -> None:
    df = _badexpert_trials()
    worst_pick, _ = select(df, "auroc_correct_only", "worst", 0.1)
    mean_pick, _ = select(df, "auroc_correct_only", "mean", 0.1)
    free_pick, free_board = select(df, "auroc_correct_only", "worst", None)
    assert (worst_pick.trial_id, worst_pick.score, worst_pick.feasible) == ("tB", 0.73, True)
    assert worst_pick.mean == pytest.approx(0.74)
    assert mean_pick.trial_id == "tA" and mean_pick.score == pytest.approx(0.84) and mean_pick.feasible
    assert free_pick.trial_id == "tC" and free_pick.feasible and free_board["feasible"].all()


def test_a_lower_is_better_metric_is_ranked_by_its_maximum() -> None:
    """attack_success_after: the worst case is the largest value, the best trial the smallest."""
    df = _badexpert_trials()
    # tA 0.1 on every victim; tB 0.5; tC 0.04, 0.01, 0.7 (worst 0.7, mean 0.25)
    b = board(df, "attack_success_after", "worst", None, prefix="")
    assert list(b.index) == ["tA", "tB", "tC"]
    assert b["worst"].tolist() == pytest.approx([0.1, 0.5, 0.7])
    by_mean = board(df, "attack_success_after", "mean", None, prefix="")
    assert list(by_mean.index) == ["tA", "tC", "tB"]


def test_ties_on_the_aggregate_go_to_the_better_mean_in_either_direction() -> None:
    rows = []
    for trial, vals in (("t1", (0.5, 0.6)), ("t2", (0.5, 0.9)), ("t3", (0.4, 0.95))):
        for vid, v in zip(("v1", "v2"), vals, strict=True):
            rows.append({"trial_id": trial, "victim_id": vid, "selection_m": v, "selection_clean_acc_drop": 0.0})
    df = pd.DataFrame(rows)
    up = df.rename(columns={"selection_m": "selection_auroc_all_inputs"})
    assert list(board(up, "auroc_all_inputs", "worst", 0.1).index) == ["t2", "t1", "t3"]
    down = df.rename(columns={"selection_m": "selection_fpr_at_threshold_all_inputs"})
    # lower is better: worst = max (0.6, 0.9, 0.95); no tie, so t1 first
    assert list(board(down, "fpr_at_threshold_all_inputs", "worst", 0.1).index) == ["t1", "t2", "t3"]
    tied = down.assign(selection_fpr_at_threshold_all_inputs=[0.9, 0.5, 0.9, 0.2, 0.1, 0.95])
    # worst: t1 0.9, t2 0.9 (tied), t3 0.95; t2's mean 0.55 beats t1's 0.7
    assert list(board(tied, "fpr_at_threshold_all_inputs", "worst", 0.1).index) == ["t2", "t1", "t3"]


def test_a_clean_victim_counts_for_feasibility_but_not_for_the_objective() -> None:
    """A clean victim has no AUROC (NaN): it is left out of worst and mean, but the drop it
    causes decides feasibility like any other victim's."""
    df = _badexpert_trials()
    clean = df[df["victim_id"] == "v1"].assign(victim_id="clean", selection_auroc_correct_only=math.nan)
    clean.loc[clean["trial_id"] == "tB", "selection_clean_acc_drop"] = 0.4  # tB breaks the clean victim
    b = board(pd.concat([df, clean]), "auroc_correct_only", "worst", 0.1)
    assert list(b.index) == ["tA", "tC", "tB"] and not b.loc["tB", "feasible"]
    assert b.loc["tB", "victims"] == 3 and b.loc["tB", "worst"] == 0.73


def test_no_feasible_trial_takes_the_best_marked_infeasible() -> None:
    pick, b = select(_strip_trials(), "auroc_correct_only", "worst", 0.1)
    assert pick.trial_id == "s1" and not pick.feasible and not b["feasible"].any()


def test_no_defined_metric_on_any_victim_raises() -> None:
    clean_only = _strip_trials().assign(selection_auroc_correct_only=math.nan)
    with pytest.raises(ValueError, match="no trial has a defined"):
        select(clean_only, "auroc_correct_only", "worst", 0.1)


def test_top_k_follows_the_board_and_degrades_to_empty() -> None:
    df = _badexpert_trials()
    assert top_k(df, 2, "auroc_correct_only", "worst", 0.1) == ["tB", "tA"]
    assert top_k(df, 10, "auroc_correct_only", "mean", 0.1) == ["tA", "tB", "tC"]
    assert top_k(df, 0, "auroc_correct_only", "worst", 0.1) == []
    assert top_k(df.iloc[0:0], 2, "auroc_correct_only", "worst", 0.1) == []
    assert top_k(df.drop(columns="selection_clean_acc_drop"), 2, "auroc_correct_only", "worst", 0.1) == []


# --- robust defaults ----------------------------------------------------------------------------


def test_robust_defaults_pick_the_best_feasible_worst_case_not_the_best_mean(tmp_path: Path) -> None:
    spec = _spec(tmp_path, constraint={"max_clean_acc_drop": 0.1}, sampler="random")
    df = pd.concat([_badexpert_trials(), _strip_trials()], ignore_index=True)
    out = robust_defaults(tmp_path, spec, df, NO_REFITS)
    assert list(out) == ["badexpert", "strip"]
    rd = out["badexpert"]
    assert rd.chosen.trial_id == "tB" and rd.chosen.feasible and rd.chosen.score == 0.73
    assert rd.params == {"seed": 2, "trial": "tB"} and rd.protocol["clean_set_seed"] == 7
    assert list(rd.leaderboard.index) == ["tB", "tA", "tC"]
    assert rd.per_victim["trial_id"].unique().tolist() == ["tB"] and len(rd.per_victim) == 3
    assert rd.evaluation_summary == {"worst": 0.5, "mean": 0.5}  # reported on the evaluation split
    assert rd.seed_policy["fit"] == "tB" and rd.seed_policy["seed"] == 2 and rd.refit["fits"] == 1.0
    assert math.isnan(rd.bootstrap[0])  # no scores stored
    assert out["strip"].chosen.trial_id == "s1" and not out["strip"].chosen.feasible


def test_robust_defaults_follow_the_objective_aggregate(tmp_path: Path) -> None:
    spec = _spec(tmp_path, objective={"metric": "auroc_correct_only", "aggregate": "mean"})
    rd = robust_defaults(tmp_path, spec, _badexpert_trials(), NO_REFITS)["badexpert"]
    assert rd.chosen.trial_id == "tC"  # no constraint: tC's mean 0.987 is the best


def test_held_out_groups_repick_on_the_other_victims_only(tmp_path: Path) -> None:
    """Leave one attack out: tC's only large drop is on v3, so without v3 it is feasible and
    picked, and its figures on v3 (evaluation split) are what is reported."""
    spec = _spec(tmp_path, constraint={"max_clean_acc_drop": 0.1}, sampler="random")
    rd = robust_defaults(tmp_path, spec, _badexpert_trials(), NO_REFITS)["badexpert"]
    folds = {f["held_out"]: f for f in rd.held_out}
    assert set(folds) == {"attack=badnet", "attack=blend", "attack=wanet"}  # one seed, arch, dataset
    assert {k: f["picked_trial"] for k, f in folds.items()} == {
        "attack=badnet": "tB",
        "attack=blend": "tB",
        "attack=wanet": "tC",
    }
    w = folds["attack=wanet"]
    assert w["strictly_held_out"] and w["held_out_victims"] == 1
    assert w["tuned_on_worst_selection_auroc_correct_only"] == 0.97  # tC's selection worst on v1, v2
    assert w["tuned_victims_worst_auroc_correct_only"] == 0.96  # its evaluation worst there
    assert w["held_out_worst_auroc_correct_only"] == 0.3
    assert w["transfer_gap"] == pytest.approx(0.3 - 0.96)
    assert w["held_out_worst_clean_acc_drop"] == 0.3
    tpe = robust_defaults(tmp_path, _spec(tmp_path, sampler="tpe"), _badexpert_trials(), NO_REFITS)["badexpert"]
    assert tpe.held_out and not any(f["strictly_held_out"] for f in tpe.held_out)


def test_refits_pick_by_the_refit_average_among_feasible_candidates(tmp_path: Path) -> None:
    """tB wins on its single fit, but its refits are poor; tA's are good. tC's refits are the
    best but its trial breaks the constraint. The seed policy takes tA's median fit."""
    spec = _spec(tmp_path, constraint={"max_clean_acc_drop": 0.1})
    df = _badexpert_trials()
    refits = []
    for of, r, sel in (("tA", 1, 0.95), ("tA", 2, 0.85), ("tB", 1, 0.5), ("tB", 2, 0.5), ("tC", 1, 1.0)):
        for row in _trial_rows("badexpert", f"{of}-refit{r}", (sel,) * 3, (sel - 0.1,) * 3, (0.0,) * 3, seed=10 + r):
            refits.append({**row, "refit_of": of, "refit_index": r})
    rd = robust_defaults(tmp_path, spec, df, pd.DataFrame(refits))["badexpert"]
    assert rd.chosen.trial_id == "tA" and rd.chosen.score == 0.62 and "refit-averaged" in rd.chosen_by
    assert rd.fits["fit_id"].tolist() == ["tA", "tA-refit1", "tA-refit2"]
    assert rd.fits["selection"].tolist() == pytest.approx([0.62, 0.95, 0.85])
    assert rd.seed_policy["fit"] == "tA-refit2" and rd.seed_policy["fit_kind"] == "refits"
    assert rd.seed_policy["seed"] == 12
    assert rd.per_victim["trial_id"].unique().tolist() == ["tA-refit2"]
    assert rd.refit["fits"] == 3.0 and rd.refit["mean"] == pytest.approx((0.9 + 0.85 + 0.75) / 3)


def test_family_board_puts_feasible_families_first_then_the_better_aggregate(tmp_path: Path) -> None:
    spec = _spec(tmp_path, constraint={"max_clean_acc_drop": 0.1})
    df = pd.concat([_badexpert_trials(), _strip_trials()], ignore_index=True)
    per_family = robust_defaults(tmp_path, spec, df, NO_REFITS)
    fb = family_board(per_family)
    assert fb["detector"].tolist() == ["badexpert", "strip"]  # strip's 0.9 is infeasible
    assert fb["selection_worst_auroc_correct_only"].tolist() == [0.73, 0.9]
    assert fb["trial"].tolist() == ["tB", "s1"] and fb["feasible"].tolist() == [True, False]
    free = family_board(robust_defaults(tmp_path, _spec(tmp_path), df, NO_REFITS))
    assert free["selection_worst_auroc_correct_only"].tolist() == [0.97, 0.9]  # no constraint: tC


def test_family_board_ranks_by_score_then_mean_then_file_order(tmp_path: Path) -> None:
    base = robust_defaults(tmp_path, _spec(tmp_path), pd.concat([_badexpert_trials(), _strip_trials()]), NO_REFITS)

    def order(objective: str = "auroc_correct_only", **choices: tuple[float, float]) -> list[str]:
        per_family = {
            f: replace(base[f], objective=objective, chosen=Selection(base[f].chosen.trial_id, s, m, True))
            for f, (s, m) in choices.items()
        }
        return family_board(per_family)["detector"].tolist()

    assert order(badexpert=(0.8, 0.95), strip=(0.85, 0.9)) == ["strip", "badexpert"]  # score first
    assert order(badexpert=(0.8, 0.85), strip=(0.8, 0.9)) == ["strip", "badexpert"]  # then the mean
    assert order(badexpert=(0.8, 0.9), strip=(0.8, 0.9)) == ["badexpert", "strip"]  # then file order
    assert order(strip=(0.8, 0.9), badexpert=(0.8, 0.9)) == ["strip", "badexpert"]
    lower = "attack_success_after"  # lower is better: the smaller score, then the smaller mean
    assert order(lower, badexpert=(0.2, 0.1), strip=(0.1, 0.3)) == ["strip", "badexpert"]
    assert order(lower, badexpert=(0.2, 0.1), strip=(0.2, 0.3)) == ["badexpert", "strip"]
    assert family_board({}).empty


def test_comparison_lists_each_familys_pick_victim_by_victim(tmp_path: Path) -> None:
    spec = _spec(tmp_path, constraint={"max_clean_acc_drop": 0.1})
    df = pd.concat([_badexpert_trials(), _strip_trials()], ignore_index=True)
    table = comparison(robust_defaults(tmp_path, spec, df, NO_REFITS))
    assert table.columns[:4].tolist() == ["detector", "trial_id", "victim_name", "attack"]
    assert len(table) == 6 and table.groupby("detector")["trial_id"].unique().map(list).to_dict() == {
        "badexpert": ["tB"],
        "strip": ["s1"],
    }
    assert table["auroc_correct_only"].tolist() == [0.5, 0.5, 0.5, 0.8, 0.8, 0.8]  # evaluation split
    assert "selection_auroc_correct_only" not in table.columns


def test_with_flat_params_adds_nested_settings_without_duplicating_columns() -> None:
    rows = pd.DataFrame(
        {"seed": [1, 2], "params": [json.dumps({"seed": 1, "members": {"badexpert": {"unlearn_lr": 1e-3}}})] * 2}
    )
    flat = with_flat_params(rows)
    assert flat.columns.tolist() == ["seed", "params", "members.badexpert.unlearn_lr"]
    assert flat["seed"].tolist() == [1, 2] and flat["members.badexpert.unlearn_lr"].tolist() == [1e-3, 1e-3]
    assert with_flat_params(rows.iloc[0:0]).empty


# --- uncertainty --------------------------------------------------------------------------------


def test_refit_spread_is_a_t_interval_of_the_finite_values() -> None:
    got = refit_spread([1.0, 2.0, math.nan, 3.0])
    assert got["fits"] == 3.0 and got["mean"] == 2.0 and got["std"] == 1.0
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) * std / sqrt(n)
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert (got["min"], got["max"]) == (1.0, 3.0)
    wider = refit_spread([1.0, 2.0, 3.0], level=0.99)
    assert wider["ci_low"] < got["ci_low"] and wider["ci_high"] > got["ci_high"]
    one = refit_spread([0.7])
    assert one["mean"] == 0.7 and one["min"] == one["max"] == 0.7
    assert math.isnan(one["std"]) and math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    none = refit_spread([])
    assert none["fits"] == 0.0 and math.isnan(none["mean"]) and math.isnan(none["min"])


def test_bootstrap_auroc_known_cases() -> None:
    rng = np.random.default_rng(0)
    neg, pos = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.6, 0.7, 0.8])
    assert bootstrap_auroc(neg, pos, 50, rng).tolist() == [1.0] * 50
    assert bootstrap_auroc(pos, neg, 50, rng).tolist() == [0.0] * 50
    assert bootstrap_auroc(np.full(5, 0.3), np.full(4, 0.3), 20, rng).tolist() == [0.5] * 20  # ties: one half
    assert (
        np.isnan(bootstrap_auroc(np.array([]), pos, 7, rng)).all() and len(bootstrap_auroc(neg, pos[:0], 7, rng)) == 7
    )
    # neg resamples {0,0}, {0,1}, {1,1} against a positive at 1: AUROC 1, 0.75, 0.5 exactly
    got = bootstrap_auroc(np.array([0.0, 1.0]), np.array([1.0]), 400, rng)
    assert set(got.tolist()) == {0.5, 0.75, 1.0}
    assert np.mean(got == 0.75) == pytest.approx(0.5, abs=0.1)


def test_bootstrap_auroc_is_centred_on_the_point_auroc_and_seeded() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    neg, pos = rng.normal(0, 1, 40).round(1), rng.normal(0.8, 1, 30).round(1)  # rounded: with ties
    point = roc_auc_score([0] * 40 + [1] * 30, np.concatenate([neg, pos]))
    boots = bootstrap_auroc(neg, pos, 2000, np.random.default_rng(5))
    assert boots.shape == (2000,) and 0.0 <= boots.min() < point < boots.max() <= 1.0
    assert boots.mean() == pytest.approx(point, abs=0.005)  # E[resampled AUROC] = the AUROC
    again = bootstrap_auroc(neg, pos, 2000, np.random.default_rng(5))
    assert np.array_equal(boots, again)


def _scores(victim: str, clean: list[float], trig: list[float], **cols: list[Any]) -> pd.DataFrame:
    """One victim's per-input rows (evaluation split): clean inputs correctly classified (label
    0), triggered ones flipped to the attack label 1, unless ``cols`` overrides a column."""
    n, m = len(clean), len(trig)
    frame = pd.DataFrame(
        {
            "victim_id": victim,
            "split": "evaluation",
            "triggered": [False] * n + [True] * m,
            "label": [0] * (n + m),
            "attack_label": [1] * (n + m),
            "pred": [0] * n + [1] * m,
            "score": clean + trig,
        }
    )
    for k, v in cols.items():
        frame[k] = v
    return frame


def test_bootstrap_interval_separated_scores_and_worst_versus_mean() -> None:
    good = _scores("v1", [0.1, 0.2, 0.3], [0.7, 0.8])
    bad = _scores("v2", [0.7, 0.8, 0.9], [0.1, 0.2])
    thresholds = {"v1": 0.5, "v2": 0.5}
    assert bootstrap_interval(good, thresholds, "auroc_correct_only", "worst", n_boot=200) == (1.0, 1.0)
    both = pd.concat([good, bad])
    assert bootstrap_interval(both, thresholds, "auroc_correct_only", "worst", n_boot=200) == (0.0, 0.0)
    assert bootstrap_interval(both, thresholds, "auroc_correct_only", "mean", n_boot=200) == (0.5, 0.5)
    # the selection split's rows are not part of the evaluation figure
    sel = bad.assign(victim_id="v1", split="selection")
    assert bootstrap_interval(pd.concat([good, sel]), thresholds, "auroc_correct_only", "worst", n_boot=50) == (
        1.0,
        1.0,
    )
    assert all(math.isnan(x) for x in bootstrap_interval(sel, thresholds, "auroc_correct_only", "worst"))


def test_bootstrap_interval_protocols_and_a_thresholded_lower_is_better_metric() -> None:
    # a misclassified clean input (pred 1) with the top score: excluded under correct_only only
    s = _scores("v1", [0.1, 0.2, 0.95], [0.7, 0.8], pred=[0, 0, 1, 1, 1])
    th = {"v1": 0.5}
    assert bootstrap_interval(s, th, "auroc_correct_only", "mean", n_boot=100) == (1.0, 1.0)
    lo, hi = bootstrap_interval(s, th, "auroc_all_inputs", "mean", n_boot=300)
    assert lo < 1.0 and hi == 1.0
    # every triggered input flagged (score > 0.5): no attack success after defense, whatever the resample
    assert bootstrap_interval(s, th, "attack_success_after", "worst", n_boot=10) == (0.0, 0.0)
    assert bootstrap_interval(s, {"v1": 0.9}, "attack_success_after", "worst", n_boot=10) == (1.0, 1.0)


def test_bootstrap_interval_contains_the_point_estimate_and_is_seeded() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    frames, points = [], []
    for vid, shift in (("v1", 1.0), ("v2", 0.5)):
        clean, trig = rng.normal(0, 1, 60).tolist(), rng.normal(shift, 1, 40).tolist()
        frames.append(_scores(vid, clean, trig))
        points.append(roc_auc_score([0] * 60 + [1] * 40, clean + trig))
    scores, th = pd.concat(frames), {"v1": 0.0, "v2": 0.0}
    lo, hi = bootstrap_interval(scores, th, "auroc_correct_only", "mean", n_boot=400, seed=7)
    assert lo < float(np.mean(points)) < hi and hi - lo < 0.3
    wlo, whi = bootstrap_interval(scores, th, "auroc_correct_only", "worst", n_boot=400, seed=7)
    assert wlo < min(points) < whi and whi <= hi
    assert bootstrap_interval(scores, th, "auroc_correct_only", "mean", n_boot=400, seed=7) == (lo, hi)
    assert bootstrap_interval(scores, th, "auroc_correct_only", "mean", n_boot=400, seed=8) != (lo, hi)
    narrow = bootstrap_interval(scores, th, "auroc_correct_only", "mean", n_boot=400, seed=7, level=0.5)
    assert lo < narrow[0] < narrow[1] < hi


# --- the Pareto front ---------------------------------------------------------------------------


def test_pareto_front_of_a_hand_made_frame(tmp_path: Path) -> None:
    """Objectives: worst AUROC (higher better) and worst clean-accuracy drop (lower better), each
    trial on two victims. Dominated: p3 (by p1), p6 (by p2: same AUROC, larger drop), p8 (its
    worst AUROC 0.6; its mean would tie p2), p7 (undefined AUROC). p1 and p4 are equal: both stay."""
    spec = _spec(
        tmp_path,
        sampler="nsga2",
        objectives=[{"metric": "auroc_correct_only"}, {"metric": "clean_acc_drop"}],
    )
    points = {
        "p1": ((0.9, 0.9), (0.05, 0.05)),
        "p2": ((0.8, 0.8), (0.01, 0.01)),
        "p3": ((0.7, 0.7), (0.05, 0.05)),
        "p4": ((0.9, 0.95), (0.05, 0.0)),
        "p5": ((0.95, 0.99), (0.2, 0.0)),
        "p6": ((0.8, 0.8), (0.03, 0.01)),
        "p7": ((math.nan, math.nan), (0.0, 0.0)),
        "p8": ((0.6, 1.0), (0.01, 0.01)),
    }
    rows = [
        {"detector": "badexpert", "trial_id": t, "selection_auroc_correct_only": a, "selection_clean_acc_drop": d}
        for t, (aurocs, drops) in points.items()
        for a, d in zip(aurocs, drops, strict=True)
    ]
    # another family's trial that would dominate everything: fronts are per family
    rows += [
        {"detector": "strip", "trial_id": "q1", "selection_auroc_correct_only": 1.0, "selection_clean_acc_drop": 0.0}
    ]
    table = pareto(pd.DataFrame(rows), spec)
    front = table.set_index("trial_id")["pareto_front"].to_dict()
    assert front == {
        "p1": True,
        "p2": True,
        "p3": False,
        "p4": True,
        "p5": True,
        "p6": False,
        "p7": False,
        "p8": False,
        "q1": True,
    }
    p5 = table.set_index("trial_id").loc["p5"]
    assert (p5["worst/auroc_correct_only"], p5["worst/clean_acc_drop"]) == (0.95, 0.2)
    assert pareto(pd.DataFrame(rows), _spec(tmp_path)).empty  # no objectives: no front


def test_the_seed_policy_takes_the_median_fit_and_never_the_luckier_middle() -> None:
    from bdx_study.analysis.robust import _median_fit

    def fits(values: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"fit_id": [f"f{i}" for i in range(len(values))], "selection": values})

    assert _median_fit(fits([0.7, 0.9, 0.8]), "auroc_correct_only")["selection"] == 0.8
    assert _median_fit(fits([0.95, 0.62]), "auroc_correct_only")["selection"] == 0.62  # the worse of two
    assert _median_fit(fits([0.6, 0.7, 0.8, 0.9]), "auroc_correct_only")["selection"] == 0.7
    # lower is better: the worse middle is the higher attack success
    assert _median_fit(fits([0.1, 0.2, 0.3, 0.4]), "attack_success_after")["selection"] == 0.3
