"""A recipe's domain of validity: where its defaults were chosen and checked, and what to run
when a recipe is applied outside it.

``bdx-study analyze`` writes ``domain:`` into every recipe (the datasets, architectures,
attacks, input shapes and class counts of the study's victims). Defaults tuned on one of them
do not carry to another (a digits recipe on a Fashion-MNIST Blend victim let 67% of triggered
inputs through), so ``export`` and ``fit`` call :func:`check_domain` and print what it finds:
one warning per way the application lies outside the domain, each naming what the recipe was
validated on and the nearest shipped study to run instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdx_study.objective import worst_op

from .recipe import Recipe

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class ShippedStudy:
    """A study file under search_spaces/ and the victims it runs, as read from the file."""

    file: str
    datasets: tuple[str, ...]
    input_shape: Shape  # of its first dataset
    architectures: tuple[str, ...]
    families: tuple[str, ...]  # the detector families it tunes
    attacks: tuple[str, ...]  # the attacks of its victims
    what: str  # its study.description
    searches_clean_set_size: bool  # it studies the protocol's |D_c| (ablations, the paper's figures)

    @classmethod
    def read(cls, path: Path) -> ShippedStudy:
        from bdx_study.data import dataset_info
        from bdx_study.space import load_space

        spec = load_space(path)
        victims = spec.victim_configs()
        datasets = tuple(dict.fromkeys(v.dataset for v in victims))
        c, h, w = dataset_info(datasets[0]).input_shape
        architectures = tuple(dict.fromkeys(v.architecture for v in victims))
        what = spec.study.description or spec.study.name
        searches_size = any("clean_set_size" in spec.searched(f) for f in spec.families)
        attacks = tuple(dict.fromkeys(v.attack.name for v in victims))
        return cls(path.name, datasets, (c, h, w), architectures, tuple(spec.families), attacks, what, searches_size)


FRONT_DOOR = "quickstart.yaml"  # the study a user runs first: preferred among equally near ones


@functools.cache
def shipped_studies() -> tuple[ShippedStudy, ...]:
    """The studies shipped in search_spaces/ that a recipe can be made from, read from their
    files: every one except those that search the clean-set size |D_c| (ablations, the paper's
    figures), which study the protocol rather than choose settings to apply. The quickstart
    first, then by file name."""
    from bdx_study.space import builtin_space

    folder = builtin_space().parent
    paths = sorted(folder.glob("*.yaml"), key=lambda p: (p.name != FRONT_DOOR, p.name))
    studies = (ShippedStudy.read(p) for p in paths)
    return tuple(s for s in studies if not s.searches_clean_set_size)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _fmt_list(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values) or "(none recorded)"


def nearest_study(
    *,
    dataset: str | None = None,
    architecture: str | None = None,
    input_shape: Sequence[int] | None = None,
    detector: str | None = None,
) -> tuple[ShippedStudy, bool]:
    """The shipped study closest to an application: (study, whether it matches the data).

    Closeness, in order: the same dataset; the same input shape; the same channel count and the
    nearest image size; then the same architecture, and one that tunes ``detector``. A study
    "matches" when its dataset or input shape is the application's."""
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else None

    def closeness(s: ShippedStudy) -> tuple[int, ...]:
        same_data = int(dataset is not None and dataset in s.datasets)
        same_shape = int(shape is not None and shape == s.input_shape)
        same_channels = int(shape is not None and shape[0] == s.input_shape[0])
        size_gap = -abs(shape[1] * shape[2] - s.input_shape[1] * s.input_shape[2]) if shape is not None else 0
        tunes = int(detector is None or detector in s.families)
        # then the study that tunes fewer families: cheaper to run
        return (
            same_data + same_shape,
            same_channels,
            size_gap,
            int(architecture in s.architectures),
            tunes,
            -len(s.families),
        )

    best = max(shipped_studies(), key=closeness)
    return best, closeness(best)[0] > 0


def suggestion(
    *,
    dataset: str | None = None,
    architecture: str | None = None,
    input_shape: Sequence[int] | None = None,
    detector: str | None = None,
    recipe_study: str | None = None,
) -> str:
    """What to run instead, in one sentence naming a study file."""
    study, matches = nearest_study(
        dataset=dataset, architecture=architecture, input_shape=input_shape, detector=detector
    )
    where = f"search_spaces/{study.file} ({study.what})"
    if not matches:
        shape = f" of {_fmt_shape(input_shape)} inputs" if input_shape is not None else ""
        return (
            f"no shipped study covers {architecture or 'this model'}{shape}: run a study of victims like yours "
            f"(your architecture, a dataset of your input size) with the settings of study "
            f"{recipe_study or 'the recipe came from'}, starting from the nearest, {where}"
        )
    add = f", adding {detector} under detectors:" if detector is not None and detector not in study.families else ""
    if architecture is not None and architecture not in study.architectures:
        return f"run {where} with victims.architectures: [{architecture}]{add}"
    return f"run {where} instead{add}"


def check_domain(
    recipe: Recipe,
    *,
    dataset: str | None = None,
    architecture: str,
    input_shape: Sequence[int],
    num_classes: int,
    attack: str | None = None,
    detector: str | None = None,
) -> list[str]:
    """Warnings, one per way applying ``recipe`` to this model lies outside the domain it was
    validated on (architecture, input shape, class count, and the dataset and attack when
    known); empty when it lies inside. Each names what the recipe was validated on and the
    nearest shipped study to run instead."""
    study = recipe.study
    dom = recipe.domain
    instead = suggestion(
        dataset=dataset,
        architecture=architecture,
        input_shape=input_shape,
        detector=detector or recipe.default_detector,
        recipe_study=study,
    )
    if dom is None:
        return [
            f"the recipe (study {study}) states no domain (it was written by an older bdx-study): nothing says it "
            f"holds for this model; run `bdx-study analyze` on its study again, or {instead}"
        ]
    shape = tuple(int(s) for s in input_shape)
    shapes = [tuple(int(v) for v in s) for s in dom.input_shapes or []]
    out: list[str] = []

    def outside(what: str, validated: str) -> None:
        out.append(f"{what}: the recipe (study {study}) was validated on {validated} only; {instead}")

    if dataset is not None and dataset not in (dom.datasets or []):
        outside(f"dataset {dataset}", f"dataset(s) {_fmt_list(dom.datasets or [])}")
    if architecture not in (dom.architectures or []):
        outside(f"architecture {architecture}", f"architecture(s) {_fmt_list(dom.architectures or [])}")
    if shape not in shapes:
        outside(f"input shape {_fmt_shape(shape)}", f"input shape(s) {_fmt_list([_fmt_shape(s) for s in shapes])}")
    if num_classes not in (dom.num_classes or []):
        outside(f"{num_classes} classes", f"class count(s) {_fmt_list(dom.num_classes or [])}")
    if attack is not None and attack not in (dom.attacks or []):
        out.append(
            f"attack {attack}: the recipe (study {study}) was validated on attack(s) "
            f"{_fmt_list(dom.attacks or [])} only; add {{name: {attack}}} to victims.attacks of its study"
            + _study_with(attack)
        )
    return out


def _study_with(attack: str) -> str:
    """', or run search_spaces/<file> (<what>)': the first shipped study whose victims carry ``attack``."""
    for s in shipped_studies():
        if attack in s.attacks:
            return f", or run search_spaces/{s.file} ({s.what})"
    return ""


def unseen_triggers(recipe: Recipe, detector: str | None = None) -> str:
    """One line on what the domain check cannot see: the trigger kind a user's model carries.
    A recipe knows the attacks it was tuned on, nothing more; the line names them and the
    family's weakest held-out attack with its figure (its evidence of how defaults transfer to an
    attack they were not tuned on)."""
    family = detector or recipe.default_detector
    attacks = _fmt_list((recipe.domain.attacks if recipe.domain is not None else None) or [])
    entry = recipe.detectors.get(family) if family is not None else None
    head = (
        f"unchecked: the recipe was tuned on attacks {attacks}; no check can see which trigger a model carries, "
        "and a trigger unlike these may go undetected"
    )
    figures = []
    for f in entry.held_out_folds if entry is not None else []:
        figure = f.figure()
        if figure is None or not str(f.held_out).startswith("attack="):
            continue
        metric, value = figure
        figures.append((value, str(f.held_out).removeprefix("attack="), metric, bool(f.strictly_held_out)))
    if not figures:
        return head + f" (the recipe has no held-out-attack evidence for {family}: its study had one attack)"
    metric = figures[0][2]  # e.g. worst_auroc_correct_only
    weakest = max if worst_op(metric.split("_", 1)[1]) == "max" else min
    value, attack, _, strict = weakest(figures)
    how = "strictly held out" if strict else "held out, not strictly: the search saw it"
    return head + f"; {family}'s weakest held-out attack: {attack}, {metric} {value:.3f} ({how})"


def render_warnings(warnings: Sequence[str], *, command: str) -> str:
    """The warnings as one block for the terminal ('' when there are none)."""
    if not warnings:
        return ""
    lines = [
        f"bdx-study: warning: {command}: this recipe is applied OUTSIDE the domain it was validated on; its "
        "defaults and figures may not hold here:"
    ]
    lines += [f"  - {w}" for w in warnings]
    return "\n".join(lines)
