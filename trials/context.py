"""What every trial of a study needs to know, passed once through ``tune.with_parameters``."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bdx_study.objective import feasible
from bdx_study.space import StudySpec
from bdx_study.victims import VictimConfig


@dataclass(frozen=True)
class StudyContext:
    spec: StudySpec
    study_dir: Path  # absolute; shared by every node on a cluster
    victim_cache: Path  # absolute
    victims: tuple[VictimConfig, ...]
    stage_cache: Path | None = None  # absolute; None = every trial fits its components again

    @property
    def name(self) -> str:
        return self.spec.study.name

    def places(self) -> dict[str, Path]:
        """Where the study's trials and tasks write (what a full disk is reported against): the
        study's folder, the caches and the temporary folder (Ray's spill files and logs)."""
        out = {"study": self.study_dir, "victim cache": self.victim_cache}
        if self.stage_cache is not None:
            out["stage cache"] = self.stage_cache
        return {**out, "temporary folder": Path(tempfile.gettempdir())}


def objective_values(spec: StudySpec, aggregates: dict[str, float]) -> list[float]:
    """The values a multi-objective (nsga2) search optimizes, one per ``search.objectives``, on
    the selection split; an undefined one is the worst finite value."""
    out = []
    for obj in spec.search.objectives:
        value = aggregates.get(obj.selection_key, math.nan)
        if not math.isfinite(value):
            key = f"{obj.aggregate}/{obj.metric}"  # cost metrics have no selection split
            value = aggregates.get(key, math.nan)
        out.append(value if math.isfinite(value) else (-2.0 if obj.mode == "max" else 1e9))
    return out


def objective_value(spec: StudySpec, aggregates: dict[str, float]) -> tuple[float, bool]:
    """The value the search optimizes and whether the trial meets the constraint.

    value = the objective's aggregate metric on the selection split (e.g.
    worst/selection_auroc_correct_only): the evaluation split never steers the search. A trial
    whose worst-case clean-accuracy drop (selection split) exceeds
    ``search.constraint.max_clean_acc_drop`` (:func:`bdx_study.objective.feasible`, the
    selection rule's own test) is infeasible and is pushed behind every feasible one: value - 1 -
    excess for a maximized metric (value + 1 + excess for a minimized one), since per-victim
    metrics lie in [0, 1]. Undefined objectives (no victim with a backdoor) report the worst
    finite value.
    """
    obj = spec.search.objective
    sign = 1.0 if obj.mode == "max" else -1.0
    value = aggregates.get(obj.selection_key, math.nan)
    if not math.isfinite(value):
        return -sign * 2.0, False
    limit = spec.search.constraint.max_clean_acc_drop
    drop = aggregates.get("worst/selection_clean_acc_drop", math.nan)  # unmeasured: infeasible, as the board says
    if limit is not None and not feasible(drop, limit):
        excess = drop - limit if math.isfinite(drop) else 1.0
        return value - sign * (1.0 + excess), False
    return value, True
