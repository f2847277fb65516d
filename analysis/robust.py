"""Robust defaults: per detector family, the config that is good across victims, judged honestly.

Selection rule (per family; :mod:`bdx_study.selection`): among the family's trials that meet the
study's clean-accuracy constraint on every victim, take the one with the best aggregate (worst
case by default) of the objective metric across victims; ties go to the better mean. Selection
uses the *selection* split's metrics only.

Honest evidence, at two levels:
- inputs: every reported figure comes from the *evaluation* split, which neither the search
  nor this selection ever saw (the victims, however, are the ones the defaults were tuned on);
- victims: for each victim group (each attack, each seed, each architecture, each dataset that
  has at least two values), the rule is re-run on the other groups' victims only, and the config
  it picks is reported on the held-out group: figures of a config that never saw that attack
  (or seed, ...), on inputs it never saw either.

The comparison table puts every family's defaults side by side, victim by victim, on the
evaluation split under the same protocol.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bdx_study._config import flatten
from bdx_study.configs import GROUP_COLUMNS
from bdx_study.folds import fold_name, fold_spec
from bdx_study.metrics import COST_METRICS, HEADLINE, HIGHER_IS_BETTER
from bdx_study.objective import feasible_rows, mean, over_victims, worst
from bdx_study.protocol import ProtocolConfig
from bdx_study.selection import Selection, is_pruned, select
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables

from .uncertainty import bootstrap_interval, refit_spread


@dataclass
class RobustDefaults:
    detector: str
    objective: str  # per-victim metric name
    aggregate: str  # worst | mean
    max_clean_acc_drop: float | None
    chosen: Selection
    params: dict[str, Any]  # the family's exact parameters in the chosen trial
    protocol: dict[str, Any]  # the protocol settings of the chosen trial
    per_victim: pd.DataFrame  # the rows of the fit the seed policy chose (evaluation split)
    leaderboard: pd.DataFrame  # one row per trial of the family
    held_out: list[dict[str, Any]] = field(default_factory=list)
    fits: pd.DataFrame = field(default_factory=pd.DataFrame)  # the chosen config's fits: the trial and its refits
    refit: dict[str, float] = field(default_factory=dict)  # spread of the evaluation figure over those fits
    bootstrap: tuple[float, float] = (math.nan, math.nan)  # 95% CI over evaluation inputs (the policy's fit)
    seed_policy: dict[str, Any] = field(default_factory=dict)
    chosen_by: str = "the search's single fit"

    @property
    def evaluation_summary(self) -> dict[str, float]:
        """Worst-case and mean of the objective metric across victims, evaluation split."""
        vals = self.per_victim[self.objective].to_numpy(dtype=float)
        return {"worst": worst(vals, self.objective), "mean": mean(vals)}


def load_trials(study_dir: Path) -> pd.DataFrame:
    return StudyTables(study_dir).read("trials").to_pandas()


def with_flat_params(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a column per nested setting of the exact ``params`` JSON, named as the study
    file's search space names it (a committee's ``members.badexpert.unlearn_lr``)."""
    if rows.empty:
        return rows
    flat = pd.DataFrame([flatten(json.loads(p)) for p in rows["params"]], index=rows.index)
    return pd.concat([rows, flat[[c for c in flat.columns if c not in rows.columns]]], axis=1)


def _summary(rows: pd.DataFrame, metric: str) -> dict[str, float]:
    vals = rows[metric].to_numpy(dtype=float)
    return {
        "worst": worst(vals, metric),
        "mean": mean(vals),
        "worst_clean_acc_drop": float(rows["clean_acc_drop"].max()),
    }


def _fold_record(
    name: str,
    strict: bool,
    why: str,
    pick: Selection,
    in_fold: pd.DataFrame,
    test_rows: pd.DataFrame,
    scores: pd.DataFrame | None,
    metric: str,
    aggregate: str,
) -> dict[str, Any] | None:
    """One held-out fold: the pick's figure on the held-out victims (evaluation split) with a
    bootstrap interval over their evaluation inputs, and the transfer gap against the same
    figure on the victims it was tuned on."""
    held = _summary(test_rows, metric)
    if math.isnan(held["worst"]):
        return None
    tuned = _summary(in_fold, metric)
    lo, hi = math.nan, math.nan
    if scores is not None:
        thresholds = {str(r["victim_id"]): float(r["threshold"]) for _, r in test_rows.iterrows()}
        lo, hi = bootstrap_interval(scores[scores["victim_id"].isin(thresholds)], thresholds, metric, aggregate)
    gap = held[aggregate] - tuned[aggregate]
    return {
        "held_out": name,
        "strictly_held_out": strict,
        "why": why,
        "picked_trial": pick.trial_id,
        f"tuned_on_{aggregate}_selection_{metric}": pick.score,
        f"tuned_victims_{aggregate}_{metric}": tuned[aggregate],
        f"held_out_{aggregate}_{metric}": held[aggregate],
        "held_out_ci95": [lo, hi],
        "transfer_gap": gap,
        "transfer_gap_ci95": [lo - tuned[aggregate], hi - tuned[aggregate]],
        "held_out_worst_clean_acc_drop": held["worst_clean_acc_drop"],
        "held_out_victims": int(len(test_rows)),
    }


def _held_out(
    study_dir: Path, spec: StudySpec, df: pd.DataFrame, metric: str, aggregate: str, max_drop: float | None
) -> list[dict[str, Any]]:
    """Re-picks without each group, from the study's own trials (strictly held out only when the
    candidates did not depend on the victims: grid or random search), and the nested folds'
    picks (strictly held out: a search per fold that never saw the group)."""
    return [
        *_regrouped_folds(study_dir, spec, df, metric, aggregate, max_drop),
        *_nested_folds(spec, str(df["detector"].iloc[0]), metric, aggregate, max_drop),
    ]


def _regrouped_folds(
    study_dir: Path, spec: StudySpec, df: pd.DataFrame, metric: str, aggregate: str, max_drop: float | None
) -> list[dict[str, Any]]:
    """For each victim group (each value of a group column with at least two), the rule re-run on
    the other groups' victims and its pick measured on the group's."""
    tables = StudyTables(study_dir)
    pruned = bool(is_pruned(df).any())
    strict = spec.search.sampler in ("grid", "random") and not pruned
    why = (
        "candidates drawn without looking at any victim (grid/random search); re-picked without the group"
        if strict
        else "pruning stopped candidates while it saw every victim, this group included "
        "(set search.nested_folds for a search per fold)"
        if pruned and spec.search.sampler == "random"
        else "TPE proposed the candidates while it saw every victim, this group included "
        "(set search.nested_folds for a search per fold)"
    )
    folds = []
    for col in GROUP_COLUMNS:
        values = sorted(df[col].dropna().unique().tolist())
        if len(values) < 2:
            continue
        for v in values:
            tune_rows, test = df[df[col] != v], df[df[col] == v]
            try:
                pick, _ = select(tune_rows, metric, aggregate, max_drop)
            except ValueError:
                continue
            in_fold = tune_rows[tune_rows["trial_id"] == pick.trial_id]
            test = test[test["trial_id"] == pick.trial_id]
            scores = _scores_or_none(tables, "scores", pick.trial_id)
            rec = _fold_record(f"{col}={v}", strict, why, pick, in_fold, test, scores, metric, aggregate)
            if rec is not None:
                folds.append(rec)
    return folds


def _nested_folds(
    spec: StudySpec, family: str, metric: str, aggregate: str, max_drop: float | None
) -> list[dict[str, Any]]:
    """Each nested fold's own pick (its search never saw the group), measured on the group."""
    folds = []
    for col in spec.search.nested_folds:
        for v in spec.group_values(col):
            ft = StudyTables(fold_spec(spec, col, v).study_dir)
            try:
                fold_rows = ft.read("trials").to_pandas()
                heldout = ft.read("heldout").to_pandas()
            except FileNotFoundError:
                continue
            fold_rows, heldout = fold_rows[fold_rows["detector"] == family], heldout[heldout["detector"] == family]
            if fold_rows.empty or heldout.empty:
                continue
            pick, _ = select(fold_rows, metric, aggregate, max_drop)
            rec = _fold_record(
                f"{col}={v}",
                True,
                f"nested: the fold's own search ({fold_name(spec, col, v)}) never saw these victims",
                pick,
                fold_rows[fold_rows["trial_id"] == pick.trial_id],
                heldout[heldout["trial_id"] == pick.trial_id],
                _scores_or_none(ft, "heldout_scores", pick.trial_id),
                metric,
                aggregate,
            )
            if rec is not None:
                folds.append(rec)
    return folds


def _scores_or_none(tables: StudyTables, table: str, trial_id: str) -> pd.DataFrame | None:
    try:
        return tables.read_part(table, trial_id).to_pandas()
    except OSError:
        return None


def load_refits(study_dir: Path) -> pd.DataFrame:
    try:
        return StudyTables(study_dir).read("refits").to_pandas()
    except FileNotFoundError:
        return pd.DataFrame(columns=["trial_id", "refit_of", "detector"])


def _fits(trial_rows: pd.DataFrame, refit_rows: pd.DataFrame, metric: str, aggregate: str) -> pd.DataFrame:
    """One row per fit of a config: its selection and evaluation aggregate, worst selection
    clean-accuracy drop, seeds, and where its rows are stored."""
    out = []
    for kind, rows in (("trials", trial_rows), ("refits", refit_rows)):
        for fit_id, r in rows.groupby("trial_id"):
            first = r.iloc[0]
            sel, ev = r["selection_" + metric].to_numpy(dtype=float), r[metric].to_numpy(dtype=float)
            out.append(
                {
                    "fit_id": str(fit_id),
                    "kind": kind,
                    "refit_index": 0 if kind == "trials" else int(first["refit_index"]),
                    "seed": int(json.loads(first["params"])["seed"]),
                    "clean_set_seed": int(first["clean_set_seed"]),
                    "selection": over_victims(sel, metric, aggregate),
                    "evaluation": over_victims(ev, metric, aggregate),
                    "worst_clean_acc_drop": float(r["selection_clean_acc_drop"].max()),
                }
            )
    return pd.DataFrame(out).sort_values("refit_index").reset_index(drop=True)


def _by_refits(
    rows_f: pd.DataFrame, refits_f: pd.DataFrame, metric: str, aggregate: str, max_drop: float | None
) -> tuple[str, pd.DataFrame] | None:
    """The refitted candidate with the best refit-averaged selection objective (among those whose
    every fit meets the constraint, if any), and its fits."""
    candidates = sorted(set(refits_f["refit_of"].dropna()))
    if not candidates:
        return None
    higher = metric in HIGHER_IS_BETTER
    scored = []
    for c in candidates:
        fits = _fits(rows_f[rows_f["trial_id"] == c], refits_f[refits_f["refit_of"] == c], metric, aggregate)
        meets = bool(np.all(feasible_rows(fits["worst_clean_acc_drop"], max_drop)))
        averaged = float(fits["selection"].mean())
        scored.append((meets, averaged if higher else -averaged, c, fits))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return scored[0][2], scored[0][3]


def robust_defaults(
    study_dir: Path, spec: StudySpec, df: pd.DataFrame | None = None, refits: pd.DataFrame | None = None
) -> dict[str, RobustDefaults]:
    """The robust defaults of every family of the study that has finished trials, in file order.

    Without refits, the selection rule's pick. With refits (``search.refit``), the refitted
    candidate with the best *refit-averaged* selection objective, its spread over the fits, and
    a seed policy: export uses the fit with the median selection objective, not the luckiest."""
    df = load_trials(study_dir) if df is None else df
    refits = load_refits(study_dir) if refits is None else refits
    out = {}
    for family in spec.families:
        rows_f = df[df["detector"] == family]
        if not rows_f.empty:
            out[family] = _family_defaults(study_dir, spec, family, rows_f, df, refits)
    if not out:
        raise ValueError(f"no finished trial of {', '.join(spec.families)} in {study_dir}")
    return out


def _family_defaults(
    study_dir: Path, spec: StudySpec, family: str, rows_f: pd.DataFrame, df: pd.DataFrame, refits: pd.DataFrame
) -> RobustDefaults:
    """One family's robust defaults: the pick, its fits, the seed policy's fit and the evidence."""
    obj = spec.search.objective
    max_drop = spec.search.constraint.max_clean_acc_drop
    chosen, board = select(rows_f, obj.metric, obj.aggregate, max_drop)
    picked = _by_refits(rows_f, refits[refits["detector"] == family], obj.metric, obj.aggregate, max_drop)
    chosen_by = "the search's single fit (no refits)"
    if picked is not None:
        trial_id, fits = picked
        b = board.loc[trial_id]
        chosen = Selection(trial_id, float(b["score"]), float(b["mean"]), bool(b["feasible"]))
        chosen_by = f"the refit-averaged selection objective over {len(fits)} fits of each of the top configs"
    else:
        fits = _fits(rows_f[rows_f["trial_id"] == chosen.trial_id], rows_f.iloc[0:0], obj.metric, obj.aggregate)
    policy = _median_fit(fits, obj.metric)
    source = df if policy["kind"] == "trials" else refits
    rows = source[source["trial_id"] == policy["fit_id"]]
    trial_first = rows_f[rows_f["trial_id"] == chosen.trial_id].iloc[0]
    return RobustDefaults(
        detector=family,
        objective=obj.metric,
        aggregate=obj.aggregate,
        max_clean_acc_drop=max_drop,
        chosen=chosen,
        params=json.loads(trial_first["params"]),
        protocol=ProtocolConfig.from_row(trial_first).model_dump(mode="json"),
        per_victim=rows,
        leaderboard=board,
        held_out=_held_out(study_dir, spec, rows_f, obj.metric, obj.aggregate, max_drop),
        fits=fits,
        refit=refit_spread(fits["evaluation"].tolist()),
        bootstrap=_policy_interval(StudyTables(study_dir), policy, rows, obj.metric, obj.aggregate),
        seed_policy={
            "rule": "the fit with the median selection objective among the chosen config's fits"
            if len(fits) > 1
            else "the search's own fit",
            "fit": str(policy["fit_id"]),
            "fit_kind": str(policy["kind"]),
            "seed": int(policy["seed"]),
            "clean_set_seed": int(policy["clean_set_seed"]),
        },
        chosen_by=chosen_by,
    )


def _median_fit(fits: pd.DataFrame, metric: str) -> pd.Series:
    """The seed policy: the fit with the median selection objective; with an even count, the worse
    of the two middle fits (never the luckier one)."""
    ranked = fits.sort_values("selection", ascending=metric not in HIGHER_IS_BETTER).reset_index(drop=True)
    return ranked.iloc[len(ranked) // 2]  # best first: index n // 2 is the median, or the worse middle


def _policy_interval(
    tables: StudyTables, policy: pd.Series, rows: pd.DataFrame, metric: str, aggregate: str
) -> tuple[float, float]:
    """The bootstrap interval over evaluation inputs of the seed policy's fit (NaN when its
    per-input scores are not stored)."""
    try:
        scores = tables.read_part("scores" if policy["kind"] == "trials" else "refit_scores", policy["fit_id"])
        thresholds = {str(r["victim_id"]): float(r["threshold"]) for _, r in rows.iterrows()}
        return bootstrap_interval(scores.to_pandas(), thresholds, metric, aggregate)
    except (OSError, KeyError):
        return (math.nan, math.nan)


def family_board(per_family: dict[str, RobustDefaults]) -> pd.DataFrame:
    """The selection rule across families: each family's robust defaults as the search saw them
    (selection split; the refit-averaged figure where the config was refitted, so that a lucky fit
    does not win), best first: feasible before infeasible, then the better aggregate of the
    objective, then the better mean, then file order. The first row is the recipe's
    ``default_detector``. Evaluation-split figures are not used: they are what the choice is
    reported on."""
    rows = []
    for order, (family, rd) in enumerate(per_family.items()):
        refitted = len(rd.fits) > 1
        rows.append(
            {
                "detector": family,
                "feasible": rd.chosen.feasible,
                f"selection_{rd.aggregate}_{rd.objective}": float(rd.fits["selection"].mean())
                if refitted
                else rd.chosen.score,
                f"selection_mean_{rd.objective}_of_trial": rd.chosen.mean,  # the tie-break: the chosen trial's
                "fits": int(len(rd.fits)) if refitted else 1,
                "trial": rd.chosen.trial_id,
                "order": order,
            }
        )
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    rd0 = next(iter(per_family.values()))
    sign = 1 if rd0.objective in HIGHER_IS_BETTER else -1
    score_col, mean_col = f"selection_{rd0.aggregate}_{rd0.objective}", f"selection_mean_{rd0.objective}_of_trial"
    key = board.assign(_s=sign * board[score_col], _m=sign * board[mean_col])
    order = key.sort_values(["feasible", "_s", "_m", "order"], ascending=[False, False, False, True]).index
    return board.loc[order].drop(columns="order").reset_index(drop=True)


COMPARISON_METRICS = (*HEADLINE, "tpr_at_5pct_fpr_correct_only", *(m.name for m in COST_METRICS))


def comparison(per_family: dict[str, RobustDefaults]) -> pd.DataFrame:
    """Family x victim: each family's robust defaults on each victim's evaluation split."""
    frames = []
    for family, rd in per_family.items():
        cols = ["victim_name", "attack", *[m for m in COMPARISON_METRICS if m in rd.per_victim.columns]]
        frames.append(
            rd.per_victim[cols].assign(detector=family, trial_id=rd.seed_policy.get("fit", rd.chosen.trial_id))
        )
    table = pd.concat(frames, ignore_index=True)
    return table[["detector", "trial_id", *[c for c in table.columns if c not in ("detector", "trial_id")]]]
