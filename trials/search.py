"""The study's searcher: one Optuna study per detector family, behind one Ray Tune searcher.

Each family has its own search space (its parameters and the searched protocol settings), its
own sampler (TPE, random or grid, seeded) and its own trial budget. Suggestions interleave the
families (the one furthest behind its budget goes next), so a comparison study runs all of them
concurrently. Every suggested config carries its family under the key ``detector``.

The Optuna studies live in memory inside this object, which Tune snapshots together with its
own experiment state (:meth:`save`): after a killed driver both are restored from the same
moment. (An RDB storage would outlive the snapshot and then disagree with it: Optuna refuses to
update trials it already saw finish.) ``bdx-study analyze`` writes optuna.db from the tables.
"""

from __future__ import annotations

import math
import pickle
from typing import Any, Literal

import optuna
from ray.tune.search import Searcher

from bdx_study.space import StudySpec


def _sampler(spec: StudySpec, family: str, seed: int) -> optuna.samplers.BaseSampler:
    s = spec.search
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if s.sampler == "grid":
        return optuna.samplers.GridSampler(spec.grid(family), seed=seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


class FamilySearcher(Searcher):
    """Round-robin over per-family Optuna studies, each within its own trial budget."""

    def __init__(self, spec: StudySpec, metric: str = "objective") -> None:
        mode = spec.search.objective.mode
        super().__init__(metric=metric, mode=mode)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        objectives = spec.search.objectives or [spec.search.objective]
        directions: list[Literal["maximize", "minimize"]] = [
            "maximize" if o.mode == "max" else "minimize" for o in objectives
        ]
        self._multi = len(objectives) > 1
        self._families = spec.families
        self._spaces = {f: spec.optuna_space(f) for f in self._families}
        self._budget = {f: spec.trials_for(f) for f in self._families}
        self._studies = {
            f: optuna.create_study(
                study_name=f"{spec.study.name}-{f}",
                directions=directions,
                sampler=_sampler(spec, f, spec.search.seed + i),
            )
            for i, f in enumerate(self._families)
        }
        self._suggested = dict.fromkeys(self._families, 0)
        self._live: dict[str, tuple[str, optuna.trial.Trial | None]] = {}  # trial id -> (family, Optuna trial)
        self._reported: dict[str, set[int]] = {}  # trial id -> the steps (victims done) Optuna has

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any) -> bool:
        return True  # the spaces come from the study file, not from Tune's param_space

    def _next_family(self) -> str | None:
        open_ = [f for f in self._families if self._suggested[f] < self._budget[f]]
        if not open_:
            return None
        return min(open_, key=lambda f: (self._suggested[f] / self._budget[f], self._families.index(f)))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:  # or Searcher.FINISHED
        family = self._next_family()
        if family is None:
            return Searcher.FINISHED  # type: ignore[return-value]  # Tune's documented sentinel
        self._suggested[family] += 1
        if not self._spaces[family]:  # nothing searched: the family's fixed config
            self._live[trial_id] = (family, None)
            return {"detector": family}
        trial = self._studies[family].ask(fixed_distributions=self._spaces[family])
        self._live[trial_id] = (family, trial)
        return {"detector": family, **trial.params}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """A trial's report after a victim: its running objective, Optuna's intermediate value
        at step = victims done (single-objective searches)."""
        _, trial = self._live.get(trial_id, ("", None))
        step, value = result.get("victims_done"), result.get(self.metric)
        if trial is None or self._multi or step is None or value is None or not math.isfinite(float(value)):
            return
        steps = self._reported.setdefault(trial_id, set())
        if int(step) not in steps:  # a trial Tune restarts after a resume reports its first steps again
            steps.add(int(step))
            trial.report(float(value), int(step))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        family, trial = self._live.pop(trial_id, ("", None))
        self._reported.pop(trial_id, None)
        if trial is None:
            return
        result = result or {}
        if not error and result.get("pruned"):  # stopped early by the study's pruner: a result, not a failure
            self._studies[family].tell(trial, state=optuna.trial.TrialState.PRUNED)
            return
        if self._multi:  # one value per objective, reported by the trial as objectives/<i>
            n = len(self._studies[family].directions)
            values = [result.get(f"objectives/{i}") for i in range(n)]
        else:
            values = [result.get(self.metric)]
        study = self._studies[family]
        if error or any(v is None or not math.isfinite(float(v)) for v in values):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, [float(v) for v in values] if self._multi else float(values[0]))  # type: ignore[arg-type]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        # Tune's own experiment snapshot, written by this class in the study's folder.
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))  # noqa: S301
        self.__dict__.setdefault("_reported", {})  # a snapshot from before per-victim reports
