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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bdx_study.metrics import LOWER_IS_BETTER

Shape = tuple[int, int, int]


@dataclass(frozen=True)
class ShippedStudy:
    """A study file under search_spaces/ and the victims it runs (tests/test_domain.py checks
    this table against the files that are present)."""

    file: str
    datasets: tuple[str, ...]
    input_shape: Shape
    architectures: tuple[str, ...]
    families: tuple[str, ...]  # detector families it tunes; () = BaDExpert only
    what: str


SHIPPED_STUDIES: tuple[ShippedStudy, ...] = (
    ShippedStudy(
        "quickstart.yaml",
        ("digits",),
        (1, 16, 16),
        ("small_cnn",),
        ("badexpert", "ted", "committee"),
        "digits 16x16, small CNN: BaDExpert, TED and their committee",
    ),
    ShippedStudy(
        "compare.yaml",
        ("digits",),
        (1, 16, 16),
        ("small_cnn",),
        ("badexpert", "strip", "scale_up"),
        "digits 16x16, small CNN: BaDExpert, STRIP and SCALE-UP",
    ),
    ShippedStudy(
        "compare-all.yaml",
        ("digits",),
        (1, 16, 16),
        ("small_cnn",),
        (
            "badexpert",
            "cognitive_distillation",
            "frequency",
            "ibd_psc",
            "scale_up",
            "sentinet",
            "strip",
            "teco",
            "ted",
        ),
        "digits 16x16, small CNN: all nine detector families",
    ),
    ShippedStudy(
        "zoo.yaml", ("fashion_mnist",), (1, 28, 28), ("small_cnn",), (), "Fashion-MNIST 28x28, small CNN, every attack"
    ),
    ShippedStudy(
        "zoo-committee.yaml",
        ("fashion_mnist",),
        (1, 28, 28),
        ("small_cnn",),
        ("badexpert", "ted", "committee"),
        "Fashion-MNIST 28x28, small CNN, every attack: BaDExpert, TED and their committee, held-out folds",
    ),
    ShippedStudy("paper-cifar10.yaml", ("cifar10",), (3, 32, 32), ("resnet18",), (), "CIFAR-10 32x32, ResNet-18"),
)


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

    def closeness(s: ShippedStudy) -> tuple[int, int, int, int, int]:
        same_data = int(dataset is not None and dataset in s.datasets)
        same_shape = int(shape is not None and shape == s.input_shape)
        same_channels = int(shape is not None and shape[0] == s.input_shape[0])
        size_gap = -abs(shape[1] * shape[2] - s.input_shape[1] * s.input_shape[2]) if shape is not None else 0
        tunes = s.families or ("badexpert",)
        family = 2 if detector is None or detector in tunes else 0
        family += int(len(tunes) <= 3)  # the smaller study that tunes it: cheaper to run
        return (same_data + same_shape, same_channels, size_gap, int(architecture in s.architectures), family)

    best = max(SHIPPED_STUDIES, key=closeness)
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
    tunes = study.families or ("badexpert",)
    add = f", adding {detector} under detectors:" if detector is not None and detector not in tunes else ""
    if architecture is not None and architecture not in study.architectures:
        return f"run {where} with victims.architectures: [{architecture}]{add}"
    return f"run {where} instead{add}"


def check_domain(
    recipe: dict[str, Any],
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
    study = recipe.get("study")
    dom = recipe.get("domain")
    instead = suggestion(
        dataset=dataset,
        architecture=architecture,
        input_shape=input_shape,
        detector=detector or recipe.get("default_detector"),
        recipe_study=study,
    )
    if not isinstance(dom, dict):
        return [
            f"the recipe (study {study}) states no domain (it was written by an older bdx-study): nothing says it "
            f"holds for this model; run `bdx-study analyze` on its study again, or {instead}"
        ]
    shape = tuple(int(s) for s in input_shape)
    shapes = [tuple(int(v) for v in s) for s in dom.get("input_shapes") or []]
    out: list[str] = []

    def outside(what: str, validated: str) -> None:
        out.append(f"{what}: the recipe (study {study}) was validated on {validated} only; {instead}")

    if dataset is not None and dataset not in (dom.get("datasets") or []):
        outside(f"dataset {dataset}", f"dataset(s) {_fmt_list(dom.get('datasets') or [])}")
    if architecture not in (dom.get("architectures") or []):
        outside(f"architecture {architecture}", f"architecture(s) {_fmt_list(dom.get('architectures') or [])}")
    if shape not in shapes:
        outside(f"input shape {_fmt_shape(shape)}", f"input shape(s) {_fmt_list([_fmt_shape(s) for s in shapes])}")
    if num_classes not in (dom.get("num_classes") or []):
        outside(f"{num_classes} classes", f"class count(s) {_fmt_list(dom.get('num_classes') or [])}")
    if attack is not None and attack not in (dom.get("attacks") or []):
        out.append(
            f"attack {attack}: the recipe (study {study}) was validated on attack(s) "
            f"{_fmt_list(dom.get('attacks') or [])} only; add {{name: {attack}}} to victims.attacks of its study, or "
            "run search_spaces/zoo.yaml (every attack, on Fashion-MNIST)"
        )
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def unseen_triggers(recipe: dict[str, Any], detector: str | None = None) -> str:
    """One line on what the domain check cannot see: the trigger kind a user's model carries.
    A recipe knows the attacks it was tuned on, nothing more; the line names them and the
    family's weakest held-out attack with its figure (its evidence of how defaults transfer to an
    attack they were not tuned on)."""
    family = detector or recipe.get("default_detector")
    dom = recipe.get("domain") if isinstance(recipe.get("domain"), dict) else {}
    attacks = _fmt_list((dom or {}).get("attacks") or [])
    entry = (recipe.get("detectors") or {}).get(family) or {}
    folds = ((entry.get("evidence") or {}).get("held_out") or {}).get("folds") or []
    head = (
        f"unchecked: the recipe was tuned on attacks {attacks}; no check can see which trigger a model carries, "
        "and a trigger unlike these may go undetected"
    )
    figures = []
    not_figures = ("held_out_ci95", "held_out_victims", "held_out_worst_clean_acc_drop")
    for f in folds:
        key = next((k for k in f if k.startswith("held_out_") and k not in not_figures), None)
        if key is None or not str(f.get("held_out", "")).startswith("attack=") or not _is_number(f.get(key)):
            continue
        attack = str(f["held_out"]).removeprefix("attack=")
        figures.append((float(f[key]), attack, key, bool(f.get("strictly_held_out"))))
    if not figures:
        return head + f" (the recipe has no held-out-attack evidence for {family}: its study had one attack)"
    metric = figures[0][2].removeprefix("held_out_")  # e.g. worst_auroc_correct_only
    lower_is_better = metric.split("_", 1)[1] in LOWER_IS_BETTER
    value, attack, _, strict = (max if lower_is_better else min)(figures)
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
