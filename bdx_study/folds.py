"""Held-out groups of victims: one attack, one seed, one architecture or one dataset left out.

A study's victims form a grid; holding out the value ``v`` of a group column
(:data:`~bdx_study.configs.GROUP_COLUMNS`) leaves the victims whose column differs (the fold's
victims, which a fold's own search may see) and those whose column equals ``v`` (the held-out
victims, which it never sees). With ``search.nested_folds``, ``launch`` runs, for each value
(:meth:`StudySpec.group_values <bdx_study.space.StudySpec.group_values>`), the whole search again
on the fold's victims only (a sub-study named ``<study>.fold-<column>-<value>`` beside the study)
and measures each family's pick on the held-out victims: strictly held-out evidence even under
TPE, whose candidates otherwise come from a search that saw every victim.
"""

from __future__ import annotations

from typing import Any

from bdx_study.configs import GroupColumn, VictimConfig
from bdx_study.space import StudySpec


def fold_name(spec: StudySpec, column: GroupColumn, value: Any) -> str:
    return f"{spec.study.name}.fold-{column}-{value}"


def fold_spec(spec: StudySpec, column: GroupColumn, value: Any) -> StudySpec:
    """The study restricted to the fold's victims (those whose ``column`` is not ``value``), with
    the same search (no refits, no folds of its own), stored as a sub-study beside it."""
    g = spec.victims
    update: dict[str, Any]
    if column == "attack":
        update = {"attacks": [a for a in g.attacks if a.name != value]}
    elif column == "victim_seed":
        update = {"seeds": [s for s in g.seeds if s != value]}
    elif column == "architecture":
        update = {"architectures": [a for a in g.architectures if a != value]}
    else:
        update = {"datasets": [d for d in g.datasets if d != value]}
    search = spec.search.model_copy(
        update={"nested_folds": [], "refit": spec.search.refit.model_copy(update={"top_k": 0})}
    )
    return spec.model_copy(
        update={
            "victims": g.model_copy(update=update),
            "study": spec.study.model_copy(update={"name": fold_name(spec, column, value)}),
            "search": search,
        }
    )


def held_out_victims(spec: StudySpec, column: GroupColumn, value: Any) -> list[VictimConfig]:
    return [v for v in spec.victim_configs() if v.group_value(column) == value]
