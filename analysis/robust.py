"""Robust defaults: per detector family, the config that is good across victims, judged honestly.

Selection rule (per family): among the family's trials that meet the study's clean-accuracy
constraint on every victim, take the one with the best aggregate (worst case by default) of the
objective metric across victims; ties go to the better mean. Selection uses the *selection*
split's metrics only.

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

import pandas as pd

from bdx_study.metrics import COST_METRICS, HEADLINE, HIGHER_IS_BETTER, worst
from bdx_study.protocol import ProtocolConfig
from bdx_study.space import StudySpec
from bdx_study.tables import StudyTables

GROUP_COLUMNS = ("attack", "victim_seed", "architecture", "dataset")


@dataclass
class Selection:
    trial_id: str
    score: float  # the aggregate objective on the victims it was selected on
    mean: float
    feasible: bool


@dataclass
class RobustDefaults:
    detector: str
    objective: str  # per-victim metric name
    aggregate: str  # worst | mean
    max_clean_acc_drop: float | None
    chosen: Selection
    params: dict[str, Any]  # the family's exact parameters in the chosen trial
    protocol: dict[str, Any]  # the protocol settings of the chosen trial
    per_victim: pd.DataFrame  # the chosen trial's rows (evaluation split)
    leaderboard: pd.DataFrame  # one row per trial of the family
    held_out: list[dict[str, Any]] = field(default_factory=list)

    @property
    def evaluation_summary(self) -> dict[str, float]:
        """Worst-case and mean of the objective metric across victims, evaluation split."""
        vals = self.per_victim[self.objective].dropna()
        return {"worst": worst(vals.to_numpy(), self.objective), "mean": float(vals.mean()) if len(vals) else math.nan}


def load_trials(study_dir: Path) -> pd.DataFrame:
    return StudyTables(study_dir).read("trials").to_pandas()


def _per_trial(df: pd.DataFrame, metric: str, aggregate: str, max_drop: float | None, prefix: str) -> pd.DataFrame:
    """Per trial: worst and mean of ``prefix + metric`` over the victims where it is defined, and
    feasibility from the clean-accuracy drop over *every* victim (clean victims included)."""
    col = prefix + metric
    higher = metric in HIGHER_IS_BETTER
    g = df.dropna(subset=[col]).groupby("trial_id")[col]
    out = pd.DataFrame({"worst": g.min() if higher else g.max(), "mean": g.mean(), "victims": g.size()})
    out["worst_clean_acc_drop"] = df.groupby("trial_id")[prefix + "clean_acc_drop"].max()
    out["score"] = out["worst"] if aggregate == "worst" else out["mean"]
    out["feasible"] = True if max_drop is None else out["worst_clean_acc_drop"] <= max_drop + 1e-12
    return out


def select(
    df: pd.DataFrame, metric: str, aggregate: str, max_drop: float | None, prefix: str = "selection_"
) -> tuple[Selection, pd.DataFrame]:
    """Apply the selection rule to the rows ``df`` (trial x victim, one family), using the
    metrics of the selection split (``prefix``), and return the pick and the per-trial board."""
    board = _per_trial(df, metric, aggregate, max_drop, prefix)
    if board.empty:
        raise ValueError(f"no trial has a defined {prefix + metric} (are all victims clean?)")
    higher = metric in HIGHER_IS_BETTER
    sign = 1 if higher else -1
    board = board.assign(_key=sign * board["score"], _key2=sign * board["mean"])
    pool = board[board["feasible"]] if board["feasible"].any() else board
    best = pool.sort_values(["_key", "_key2"], ascending=False).index[0]
    row = board.loc[best]
    board = board.drop(columns=["_key", "_key2"]).sort_values("score", ascending=not higher)
    return Selection(str(best), float(row["score"]), float(row["mean"]), bool(row["feasible"])), board


def _summary(rows: pd.DataFrame, metric: str) -> dict[str, float]:
    vals = rows[metric].dropna()
    return {
        "worst": worst(vals.to_numpy(), metric),
        "mean": float(vals.mean()) if len(vals) else math.nan,
        "worst_clean_acc_drop": float(rows["clean_acc_drop"].max()),
    }


def _held_out(df: pd.DataFrame, metric: str, aggregate: str, max_drop: float | None) -> list[dict[str, Any]]:
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
            test_rows = test[test["trial_id"] == pick.trial_id]
            s = _summary(test_rows, metric)
            if math.isnan(s["worst"]):
                continue
            folds.append(
                {
                    "held_out": f"{col}={v}",
                    "picked_trial": pick.trial_id,
                    f"tuned_on_{aggregate}_selection_{metric}": pick.score,
                    f"held_out_worst_{metric}": s["worst"],
                    f"held_out_mean_{metric}": s["mean"],
                    "held_out_worst_clean_acc_drop": s["worst_clean_acc_drop"],
                    "held_out_victims": int(len(test_rows)),
                }
            )
    return folds


def robust_defaults(study_dir: Path, spec: StudySpec, df: pd.DataFrame | None = None) -> dict[str, RobustDefaults]:
    """The robust defaults of every family of the study that has finished trials, in file order."""
    df = load_trials(study_dir) if df is None else df
    obj = spec.search.objective
    max_drop = spec.search.constraint.max_clean_acc_drop
    out = {}
    for family in spec.families:
        rows_f = df[df["detector"] == family]
        if rows_f.empty:
            continue
        chosen, board = select(rows_f, obj.metric, obj.aggregate, max_drop)
        rows = rows_f[rows_f["trial_id"] == chosen.trial_id]
        first = rows.iloc[0]
        out[family] = RobustDefaults(
            detector=family,
            objective=obj.metric,
            aggregate=obj.aggregate,
            max_clean_acc_drop=max_drop,
            chosen=chosen,
            params=json.loads(first["params"]),
            protocol=ProtocolConfig.from_row(first).model_dump(mode="json"),
            per_victim=rows,
            leaderboard=board,
            held_out=_held_out(rows_f, obj.metric, obj.aggregate, max_drop),
        )
    if not out:
        raise ValueError(f"no finished trial of {', '.join(spec.families)} in {study_dir}")
    return out


COMPARISON_METRICS = (*HEADLINE, "tpr_at_5pct_fpr_correct_only", *(m.name for m in COST_METRICS))


def comparison(per_family: dict[str, RobustDefaults]) -> pd.DataFrame:
    """Family x victim: each family's robust defaults on each victim's evaluation split."""
    frames = []
    for family, rd in per_family.items():
        cols = ["victim_name", "attack", *[m for m in COMPARISON_METRICS if m in rd.per_victim.columns]]
        frames.append(rd.per_victim[cols].assign(detector=family, trial_id=rd.chosen.trial_id))
    table = pd.concat(frames, ignore_index=True)
    return table[["detector", "trial_id", *[c for c in table.columns if c not in ("detector", "trial_id")]]]


def write_optuna_study(df: pd.DataFrame, spec: StudySpec, path: Path) -> Path:
    """Rebuild the sweep as Optuna studies in SQLite (``optuna-dashboard sqlite:///PATH``, or
    ``optuna.load_study``), one per family (``<study>-<family>``), one completed trial per study
    trial: params = the searched values, value = the objective Tune optimized, per-victim figures
    as user attrs."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    storage = f"sqlite:///{tmp}"
    metric = spec.search.objective.metric
    for family in spec.families:
        dists = spec.optuna_space(family)
        rows_f = df[df["detector"] == family]
        if not dists or rows_f.empty:
            continue
        study = optuna.create_study(
            study_name=f"{spec.study.name}-{family}",
            storage=storage,
            direction="maximize" if spec.search.objective.mode == "max" else "minimize",
        )
        trials = []
        for tid, rows in rows_f.groupby("trial_id", sort=False):
            first = rows.iloc[0]
            full = {**ProtocolConfig.from_row(first).model_dump(), **json.loads(first["params"])}
            params = {k: full[k] for k in dists}
            trials.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions={k: dists[k] for k in params},
                    value=float(first["objective"]),
                    user_attrs={
                        "trial_id": str(tid),
                        "feasible": bool(first["feasible"]),
                        **{f"{r['victim_name']}/{metric}": _none_if_nan(r[metric]) for _, r in rows.iterrows()},
                    },
                )
            )
        study.add_trials(trials)
        del study
    if tmp.exists():
        tmp.replace(path)
    return path


def _none_if_nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v
