"""The searches themselves: each family's sweep rebuilt as an Optuna study (for optuna-dashboard
and for Optuna's own analyses), hyperparameter importance (fANOVA) and, for a multi-objective
(nsga2) search, the Pareto front. Every figure here is of the selection split, what the search
optimized."""

from __future__ import annotations

import datetime
import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from bdx_study._config import flatten
from bdx_study._io import atomic_path
from bdx_study.metrics import HIGHER_IS_BETTER
from bdx_study.objective import FEASIBILITY_TOLERANCE, over_victims
from bdx_study.protocol import ProtocolConfig
from bdx_study.selection import is_pruned
from bdx_study.space import Objective, StudySpec


def optuna_trials(rows_f: pd.DataFrame, spec: StudySpec, family: str) -> list[Any]:
    """One Optuna trial per study trial, in the order they ran, with their real start and end
    times: params = the searched values; value = the objective on the selection split, as the
    search measured it (not the penalty the search ranks an infeasible trial by); the clean-accuracy
    constraint as Optuna's own (feasible iff <= 0), so infeasible trials show as infeasible; user
    attributes named by split (``selection/<victim>/<metric>``, ``evaluation/<victim>/<metric>``);
    intermediate values = the running objective after each victim (step = victims done), so
    optuna-dashboard plots each trial's progress over victims. A trial the study's pruner stopped
    is PRUNED; one whose objective is undefined is FAIL."""
    import optuna

    dists = spec.optuna_space(family)
    obj = spec.search.objective
    metric, limit = obj.metric, spec.search.constraint.max_clean_acc_drop
    groups = list(rows_f.groupby("trial_id", sort=False))
    if "started_at" in rows_f.columns:
        groups.sort(key=lambda g: (float(np.nanmin(g[1]["started_at"].to_numpy(dtype=float))), str(g[0])))
    out = []
    for tid, rows in groups:
        first = rows.iloc[0]
        full = {**ProtocolConfig.from_row(first).model_dump(), **flatten(json.loads(first["params"]))}
        params = {k: full[k] for k in dists}
        value = _aggregate(rows, obj)
        drops = rows["selection_clean_acc_drop"].dropna().to_numpy() if "selection_clean_acc_drop" in rows else []
        constraints = None
        if limit is not None and len(drops):
            # Optuna: feasible when <= 0, with the selection rule's own tolerance (objective.feasible)
            constraints = {"selection_clean_acc_drop": float(np.max(drops)) - limit - FEASIBILITY_TOLERANCE}
        pruned = bool(is_pruned(rows).any())
        progress = measured_progress(rows, obj)
        attrs: dict[str, Any] = {"trial_id": str(tid), "feasible": bool(first["feasible"])}
        for _, r in rows.iterrows():
            attrs[f"selection/{r['victim_name']}/{metric}"] = _none_if_nan(r.get(f"selection_{metric}"))
            attrs[f"evaluation/{r['victim_name']}/{metric}"] = _none_if_nan(r.get(metric))
        state = optuna.trial.TrialState.COMPLETE if math.isfinite(value) else optuna.trial.TrialState.FAIL
        shown: float | None = value if state == optuna.trial.TrialState.COMPLETE else None
        if pruned:
            state = optuna.trial.TrialState.PRUNED
            attrs["stopped_at"] = str(rows.sort_values("victim_step")["victim_name"].iloc[-1])
            shown = progress[max(progress)] if progress else None  # Optuna's own: a pruned trial's last value
        trial = optuna.trial.create_trial(
            state=state,
            params=params,
            distributions={k: dists[k] for k in params},
            value=shown,
            intermediate_values=progress or None,
            user_attrs=attrs,
            # Optuna's named constraint, and the list optuna-dashboard reads to grey out infeasible trials
            constraints=constraints,
            system_attrs={"constraints": list(constraints.values())} if constraints else None,
        )
        start, end = _when(rows, "started_at", min), _when(rows, "finished_at", max)
        if start is not None:
            trial.datetime_start = start
            trial.datetime_complete = end if end is not None and end >= start else start
        out.append(trial)
    return out


def measured_progress(rows: pd.DataFrame, obj: Objective) -> dict[int, float]:
    """A trial's objective as measured over its first n victims (step n = victims done, in the
    order it evaluated them): the figure its value is, not the penalty the search ranks an
    infeasible trial by (the pruners' ``running_objective``)."""
    col = "selection_" + obj.metric
    if "victim_step" not in rows.columns or col not in rows.columns or rows["victim_step"].isna().any():
        return {}
    ordered = rows.sort_values("victim_step")
    values = ordered[col].to_numpy(dtype=float)
    out = {}
    for n, step in enumerate(ordered["victim_step"].to_numpy(dtype=int), start=1):
        v = over_victims(values[:n], obj.metric, obj.aggregate)
        if math.isfinite(v):
            out[int(step)] = float(v)
    return out


def _when(rows: pd.DataFrame, column: str, pick: Any) -> datetime.datetime | None:
    """The earliest start or latest end of a trial's rows (epoch seconds in the tables)."""
    if column not in rows.columns:
        return None
    values = [float(v) for v in rows[column] if v is not None and math.isfinite(float(v))]
    return datetime.datetime.fromtimestamp(pick(values)) if values else None


def study_name(spec: StudySpec, family: str) -> str:
    """The Optuna study of one family's sweep in ``optuna.db``."""
    return f"{spec.study.name}-{family}"


def direction(spec: StudySpec) -> Literal["maximize", "minimize"]:
    return "maximize" if spec.search.objective.mode == "max" else "minimize"


def name_the_objective(study: Any, spec: StudySpec) -> None:
    """Name the value as the search measured it (optuna-dashboard says "Objective 0" otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna calls set_metric_names experimental
        study.set_metric_names([spec.search.objective.selection_key])


def _studies(df: pd.DataFrame, spec: StudySpec, storage: str | None = None) -> dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = {}
    for family in spec.families:
        rows_f = df[df["detector"] == family]
        if not spec.optuna_space(family) or rows_f.empty:
            continue
        study = optuna.create_study(study_name=study_name(spec, family), storage=storage, direction=direction(spec))
        name_the_objective(study, spec)
        study.add_trials(optuna_trials(rows_f, spec, family))
        out[family] = study
    return out


def write_optuna_study(df: pd.DataFrame, spec: StudySpec, path: Path) -> Path:
    """Rebuild the sweep as Optuna studies in SQLite (``optuna-dashboard sqlite:///PATH``, or
    ``optuna.load_study``), one per family (``<study>-<family>``)."""
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    _studies(df, spec, storage=f"sqlite:///{tmp}")
    if tmp.exists():
        tmp.replace(path)
    return path


IMPORTANCE_RESAMPLES = 8  # bootstrap resamples of the trials: how stable each importance is


def param_importances(df: pd.DataFrame, spec: StudySpec, seed: int = 0) -> pd.DataFrame:
    """fANOVA importance (Optuna's FanovaImportanceEvaluator, a random-forest functional ANOVA) of
    each searched setting for the objective the search optimized (selection split), per family,
    with the number of trials it rests on and its spread over bootstrap resamples of those trials
    (``importance_sd``: a figure from few trials moves a lot). Families with fewer than 4 finished
    trials, or one searched setting, are left out."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    rows = []
    for family, study in _studies(df, spec).items():
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        varying = [k for k in spec.optuna_space(family) if len({json.dumps(t.params.get(k)) for t in done}) > 1]
        if len(done) < 4 or len(varying) < 2:
            continue
        imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), params=varying)
        rng = np.random.default_rng(seed)
        resampled: dict[str, list[float]] = {k: [] for k in varying}
        for r in range(IMPORTANCE_RESAMPLES):
            boot = optuna.create_study(direction=study.direction)
            boot.add_trials([done[i] for i in rng.integers(0, len(done), len(done))])
            try:
                got = get_param_importances(boot, evaluator=FanovaImportanceEvaluator(seed=seed + r), params=varying)
            except (ValueError, RuntimeError):  # a resample in which a setting never varies
                continue
            for k in varying:
                resampled[k].append(float(got.get(k, 0.0)))
        rows += [
            {
                "detector": family,
                "param": k,
                "importance": float(v),
                "importance_sd": float(np.std(resampled[k])) if len(resampled[k]) >= 2 else math.nan,
                "trials": len(done),
            }
            for k, v in imp.items()
        ]
    return pd.DataFrame(rows, columns=["detector", "param", "importance", "importance_sd", "trials"])


def _aggregate(rows: pd.DataFrame, obj: Objective) -> float:
    col = "selection_" + obj.metric if "selection_" + obj.metric in rows.columns else obj.metric
    return over_victims(rows[col].to_numpy(dtype=float), obj.metric, obj.aggregate)


def pareto(df: pd.DataFrame, spec: StudySpec) -> pd.DataFrame:
    """Per family and trial, each of ``search.objectives`` (selection split; cost metrics as
    measured) and whether the trial is on the family's Pareto front (no other trial is at least
    as good on every objective and better on one)."""
    objectives = spec.search.objectives
    if not objectives:
        return pd.DataFrame()
    out = []
    for family in spec.families:
        rows_f = df[df["detector"] == family]
        table = pd.DataFrame(
            [
                {
                    "detector": family,
                    "trial_id": tid,
                    **{f"{o.aggregate}/{o.metric}": _aggregate(r, o) for o in objectives},
                }
                for tid, r in rows_f.groupby("trial_id")
            ]
        )
        if table.empty:
            continue
        signs = np.array([1.0 if o.metric in HIGHER_IS_BETTER else -1.0 for o in objectives])
        vals = table[[f"{o.aggregate}/{o.metric}" for o in objectives]].to_numpy() * signs  # higher = better
        on_front = []
        for i in range(len(vals)):
            dominated = np.any(np.all(vals >= vals[i], axis=1) & np.any(vals > vals[i], axis=1))
            on_front.append(not dominated and np.isfinite(vals[i]).all())
        out.append(table.assign(pareto_front=on_front))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def plot_importances(table: pd.DataFrame, path: Path) -> Path | None:
    if table.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(table["detector"]))
    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 3.0), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        t = table[table["detector"] == family].sort_values("importance")
        sd = t["importance_sd"].fillna(0.0) if "importance_sd" in t else None
        ax.barh(t["param"], t["importance"], xerr=sd, color="tab:blue", ecolor="black", capsize=2)
        n = int(t["trials"].iloc[0]) if "trials" in t else None
        ax.set_title(
            f"{family}: fANOVA importance, {n} trials\nbars: +-1 sd over {IMPORTANCE_RESAMPLES} bootstrap resamples",
            fontsize=7,
        )
        ax.set_xlabel("share of the objective's variance (selection split)")
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def plot_pareto(table: pd.DataFrame, spec: StudySpec, path: Path) -> Path | None:
    """The first two objectives of every trial, the Pareto front joined, the third as colour."""
    if table.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [f"{o.aggregate}/{o.metric}" for o in spec.search.objectives]
    families = list(dict.fromkeys(table["detector"]))
    fig, axes = plt.subplots(1, len(families), figsize=(3.8 * len(families), 3.3), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        t = table[table["detector"] == family]
        colour = t[cols[2]] if len(cols) > 2 else None
        sc = ax.scatter(t[cols[0]], t[cols[1]], c=colour, s=14, cmap="viridis")
        front = t[t["pareto_front"]].sort_values(cols[0])
        ax.plot(front[cols[0]], front[cols[1]], color="tab:red", linewidth=1, marker="o", markersize=3)
        ax.set_xlabel(cols[0] + " (selection)", fontsize=7)
        ax.set_ylabel(cols[1] + " (selection)", fontsize=7)
        ax.set_title(f"{family}: Pareto front", fontsize=8)
        if colour is not None:
            fig.colorbar(sc, ax=ax).set_label(cols[2], fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def _none_if_nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v
