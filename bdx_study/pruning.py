"""Trials that stop early, the study's victims as the resource (``search.pruning``).

A trial evaluates its config victim by victim. After each victim it knows its *running*
aggregates over the victims done, and its running objective (:func:`trials.context`'s value of
those aggregates). A pruner decides from them, and from the trials the study had finished when
the trial started (its *study state*, read from the Parquet tables), whether to go on.

- ``exact`` (worst-case objective): the running worst case can only fall (a maximized metric; rise
  for a minimized one) and the running worst clean-accuracy drop can only rise, so the trial's
  optimistic key under the selection rule (:mod:`bdx_study.selection`: feasible first, then the
  worst case) only gets worse. The trial stops once that key is strictly behind the key of the
  ``k``-th best finished trial of its family, with ``k`` = the configs that matter
  (:func:`configs_that_matter`): the pick, the refitted ``top_k`` and, under TPE, the trials
  TPE's good group holds at the end of the budget. Such a trial can never be among them, so
  the selection rule picks the same config, refits the same configs and (run one trial at a time,
  as ``max_concurrent: 1`` does) TPE samples the same configs as without pruning. Victims go
  hardest first (lowest mean of the objective metric over the family's stored trials), so
  hopeless trials stop after few victims; the order is fixed for a given study state.
- ``successive_halving`` and ``median``: Optuna's pruners, asked about the trial's running
  objective at each step (victims done), against the family's stored trials rebuilt as an
  Optuna study (their intermediate values and the pruner's rung records, both kept in the
  tables). Victims go in the study's order, so a step means the same victims for every trial.
  Approximate: they can stop a trial that would have won.

Refits, held-out folds and a user's ``fit`` never prune; pruned trials are kept (rows marked
``pruned``) and never picked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bdx_study.metrics import HIGHER_IS_BETTER
from bdx_study.objective import feasible
from bdx_study.selection import board, is_pruned
from bdx_study.tables import StudyTables

if TYPE_CHECKING:
    import optuna

    from bdx_study.space import StudySpec
    from bdx_study.victims import VictimConfig


def tpe_good_group(n_trials: int) -> int:
    """How many trials TPE's good group holds after ``n_trials`` (Optuna's default gamma)."""
    return min(math.ceil(0.1 * n_trials), 25)


def configs_that_matter(spec: StudySpec, family: str) -> int:
    """How many of a family's best trials exact pruning must leave alone: the selection rule's
    pick, the ``refit.top_k`` refitted configs and, for TPE, its good group at the budget's end
    (so TPE splits its trials the same way with or without pruning)."""
    k = max(1, spec.search.refit.top_k)
    if spec.search.sampler == "tpe":
        k = max(k, tpe_good_group(spec.trials_for(family)))
    return k


STORED_COLUMNS = (
    "trial_id",
    "detector",
    "victim_id",
    "pruned",
    "victim_step",
    "running_objective",
    "pruner_attrs",
    "objective",
    "started_at",
)


def stored_rows(study_dir: Path, family: str, metric: str) -> pd.DataFrame:
    """The rows of ``family``'s finished and pruned trials (the columns pruning reads)."""
    columns = [*STORED_COLUMNS, f"selection_{metric}", "selection_clean_acc_drop"]
    try:
        df = StudyTables(study_dir).read("trials", columns=columns).to_pandas()
    except FileNotFoundError:
        return pd.DataFrame(columns=columns)
    for c in columns:
        if c not in df.columns:
            df[c] = None
    return df[df["detector"] == family]


class TrialPruner:
    """The pruning of one trial of ``family``: its victim order, and at each step whether to stop.

    ``stored`` are the family's stored rows when the trial starts (:func:`stored_rows`; None:
    none read, as pruning ``none`` needs none); the trial's own (a retried trial's) are left out."""

    def __init__(self, spec: StudySpec, family: str, stored: pd.DataFrame | None, trial_id: str = "") -> None:
        self.spec = spec
        self.family = family
        stored = stored if stored is not None else pd.DataFrame(columns=list(STORED_COLUMNS))
        self.stored = stored[stored["trial_id"] != trial_id]
        self.kind = spec.pruning.kind
        self.metric = spec.search.objective.metric
        self.attrs: dict[str, Any] = {}  # the Optuna pruner's records of this trial (its rungs)
        self._optuna: tuple[optuna.Study, optuna.trial.Trial] | None = None
        self.bar = self._exact_bar() if self.kind == "exact" else None

    # -- order ------------------------------------------------------------------------------

    def order(self, victims: tuple[VictimConfig, ...]) -> list[int]:
        """Indices of ``victims`` in the order the trial evaluates them: hardest first for exact
        pruning (by the stored trials; victims no trial measured yet last, in study order), the
        study's order otherwise."""
        study_order = list(range(len(victims)))
        if self.kind != "exact" or self.stored.empty:
            return study_order
        col = f"selection_{self.metric}"
        means = pd.to_numeric(self.stored[col], errors="coerce").groupby(self.stored["victim_id"]).mean()
        sign = 1.0 if self.metric in HIGHER_IS_BETTER else -1.0

        def hardness(i: int) -> tuple[int, float, int]:
            m = means.get(victims[i].key, math.nan)
            return (0, sign * float(m), i) if math.isfinite(m) else (1, 0.0, i)

        return sorted(study_order, key=hardness)

    # -- exact ------------------------------------------------------------------------------

    def _exact_bar(self) -> tuple[float, bool] | None:
        """(worst case, feasible) of the k-th best complete trial of the family, when there are
        k; None otherwise (nothing can be ruled out yet)."""
        if self.stored.empty:
            return None
        b = board(self.stored, self.metric, "worst", self.spec.search.constraint.max_clean_acc_drop)
        k = configs_that_matter(self.spec, self.family)
        if len(b) < k:
            return None
        row = b.iloc[k - 1]
        return float(row["worst"]), bool(row["feasible"])

    def _exact_stop(self, aggregates: dict[str, float]) -> bool:
        if self.bar is None or not self.bar[1]:
            return False  # fewer than k trials, or an infeasible k-th: its order can still change
        limit = self.spec.search.constraint.max_clean_acc_drop
        drop = aggregates.get("worst/selection_clean_acc_drop", math.nan)
        if limit is not None and math.isfinite(drop) and not feasible(drop, limit):
            return True  # infeasible already; the k-th best is feasible
        value = aggregates.get(f"worst/selection_{self.metric}", math.nan)
        if not math.isfinite(value):
            return False
        return value < self.bar[0] if self.metric in HIGHER_IS_BETTER else value > self.bar[0]

    # -- Optuna's pruners -------------------------------------------------------------------

    def _pruner(self) -> optuna.pruners.BasePruner:
        """Optuna's pruner of ``search.pruning`` (its settings are named as Optuna names them)."""
        import optuna

        p = self.spec.pruning
        pruner: dict[str, type[optuna.pruners.BasePruner]] = {
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "median": optuna.pruners.MedianPruner,
        }
        return pruner[p.kind](**p.model_dump(exclude={"kind"}))

    def _study(self) -> tuple[optuna.Study, optuna.trial.Trial]:
        """The family's stored trials as an in-memory Optuna study with this trial's pruner, and
        this trial asked from it."""
        if self._optuna is not None:
            return self._optuna
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        maximize = self.spec.search.objective.mode == "max"
        study = optuna.create_study(direction="maximize" if maximize else "minimize", pruner=self._pruner())
        groups = list(self.stored.groupby("trial_id", sort=False))
        groups.sort(key=lambda g: (_first(g[1], "started_at", math.inf), str(g[0])))
        for _, rows in groups:
            study.add_trial(_stored_trial(rows))
        self._optuna = study, study.ask()
        return self._optuna

    def _optuna_stop(self, step: int, running_objective: float) -> bool:
        if not math.isfinite(running_objective):
            return False  # the objective is undefined so far (clean victims only): nothing to compare
        study, trial = self._study()
        trial.report(running_objective, step)
        stop = trial.should_prune()
        self.attrs = dict(study.get_trials(deepcopy=False)[-1].system_attrs)
        return stop

    # -- the decision -----------------------------------------------------------------------

    def stop(self, step: int, n_victims: int, aggregates: dict[str, float], running_objective: float) -> bool:
        """Whether the trial stops after ``step`` of ``n_victims`` victims (never after the last)."""
        if step >= n_victims or self.kind == "none":
            return False
        if self.kind == "exact":
            return self._exact_stop(aggregates)
        return self._optuna_stop(step, running_objective)


def _first(rows: pd.DataFrame, column: str, default: float) -> float:
    values = pd.to_numeric(rows[column], errors="coerce").dropna()
    return float(values.min()) if len(values) else default


def intermediate_values(rows: pd.DataFrame) -> dict[int, float]:
    """A trial's running objective after each victim (step = victims done), from its rows."""
    out = {}
    for step, value in zip(rows["victim_step"], rows["running_objective"], strict=True):
        if pd.notna(step) and pd.notna(value) and math.isfinite(float(value)):
            out[int(step)] = float(value)
    return out


def _stored_trial(rows: pd.DataFrame) -> optuna.trial.FrozenTrial:
    """A stored trial as Optuna knows it: its intermediate values, the pruner's records, PRUNED
    or COMPLETE with its objective."""
    import optuna

    pruned = bool(is_pruned(rows).any())
    value = float(rows["objective"].iloc[0]) if rows["objective"].iloc[0] is not None else math.nan
    attrs = rows["pruner_attrs"].iloc[0]
    state = optuna.trial.TrialState.PRUNED if pruned or not math.isfinite(value) else optuna.trial.TrialState.COMPLETE
    return optuna.trial.create_trial(
        state=state,
        value=value if state == optuna.trial.TrialState.COMPLETE else None,
        intermediate_values=intermediate_values(rows),
        system_attrs=json.loads(attrs) if isinstance(attrs, str) and attrs else {},
    )


def savings(trials: pd.DataFrame) -> dict[str, float]:
    """What pruning saved in a study's trial rows: trials pruned, victim evaluations done and
    skipped, and the skipped ones priced at the complete trials' mean seconds per victim."""
    if trials.empty:
        return {"trials": 0, "pruned": 0, "evaluated": 0, "skipped": 0, "seconds_skipped": 0.0}
    pruned = is_pruned(trials)
    per_trial = trials.assign(_pruned=pruned).groupby("trial_id")
    n_rows = per_trial.size()
    planned = per_trial["victims_planned"].first() if "victims_planned" in trials.columns else n_rows
    planned = pd.to_numeric(planned, errors="coerce").fillna(n_rows)
    skipped = float((planned - n_rows).clip(lower=0).sum())
    complete = trials[~pruned]
    per_victim = math.nan
    if not complete.empty and "trial_seconds" in complete.columns:
        seconds = complete.groupby("trial_id")["trial_seconds"].first()
        per_victim = float((seconds / complete.groupby("trial_id").size()).mean())
    return {
        "trials": float(len(n_rows)),
        "pruned": float(per_trial["_pruned"].any().sum()),
        "evaluated": float(n_rows.sum()),
        "skipped": skipped,
        "seconds_skipped": skipped * per_victim if math.isfinite(per_victim) else math.nan,
    }
