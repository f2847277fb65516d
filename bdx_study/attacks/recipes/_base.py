"""The torch-free half of the attack contract: parameter models and recipes.

An attack's **recipe** is everything about one attack instance that is known without building
its trigger: the params with every default the input shape decides resolved (poison and cover
rates, patch sizes and positions, amplitudes), and every check that the shape, the classes or
the training labels must pass. :class:`~bdx_study.attacks.Attack` builds its recipe first and
its tensors from it; ``check_attack`` and ``check_attack_data`` build the recipe alone, which is
how ``bdx-study validate`` checks a study without importing torch. Each check has this one home.

Every Params model names its recipe class (``Params.Recipe``) and the reference rate tables
its attack resolves ``null`` rates from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


def by_side(table: Mapping[int, float], side: int) -> float:
    """A per-input-size reference value: the entry for this side, else the 32x32 one."""
    return table.get(side, table[32])


def scaled(n32: int, side: int, minimum: int = 1) -> int:
    """A length given for 32x32 inputs, scaled to ``side`` (rounded, at least ``minimum``)."""
    return max(minimum, round(n32 * side / 32))


def check_placement(shape: tuple[int, int, int], size: tuple[int, int], top: int, left: int) -> None:
    """Raise ValueError unless a ``size`` (h, w) patch at (top, left) lies inside a ``shape`` image."""
    _, h, w = shape
    ph, pw = size
    if top < 0 or left < 0 or top + ph > h or left + pw > w:
        raise ValueError(f"a {ph}x{pw} patch at ({top}, {left}) does not fit a {h}x{w} image")


def corner_positions(shape: tuple[int, int, int], size: int, margin: int = 0) -> list[tuple[int, int]]:
    """(top, left) of four ``size`` x ``size`` patches ``margin`` pixels from each corner: top
    left, top right, bottom left, bottom right (the toolbox's badnet_patch4)."""
    _, h, w = shape
    lo, hi_r, hi_c = margin, h - margin - size, w - margin - size
    return [(lo, lo), (lo, hi_c), (hi_r, lo), (hi_r, hi_c)]


def count_classes(labels: np.ndarray, classes: Sequence[int] | int) -> int:
    """How many of ``labels`` are in ``classes``."""
    return int(np.isin(labels, [classes] if isinstance(classes, int) else list(classes)).sum())


class AttackRecipe:
    """One attack instance as far as it is known without tensors (see the module docstring).

    Built from (name, params, input shape, classes): checks the target, resolves the rates
    (``null`` = the reference table's entry for the input side), then calls :meth:`resolve`,
    where each attack resolves and checks its own parameters. :meth:`check_data` checks a
    training set given as its image shape and labels; :meth:`identity` is the attack's part of
    the victim key. Errors are ValueErrors naming the attack.
    """

    params: AttackParams

    def __init__(
        self,
        name: str,
        params: AttackParams,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        reference_rates: Mapping[int, float] | None = None,
        reference_cover_rates: Mapping[int, float] | None = None,
    ) -> None:
        self.name = name
        self.params = params
        if params.target >= num_classes:
            raise self.fail(f"target {params.target} must be < num_classes {num_classes}")
        c, h, w = input_shape
        self.input_shape: tuple[int, int, int] = (int(c), int(h), int(w))
        self.num_classes = num_classes
        rates = type(params).reference_rates if reference_rates is None else reference_rates
        covers = type(params).reference_cover_rates if reference_cover_rates is None else reference_cover_rates
        side = self.input_shape[1]
        rate = params.poison_rate
        self.poison_rate: float = by_side(rates, side) if rate is None else rate
        cover = getattr(params, "cover_rate", None)
        self.cover_rate: float = by_side(covers, side) if cover is None else cover
        self.resolve()

    def fail(self, message: str) -> ValueError:
        return ValueError(f"attack {self.name!r}: {message}")

    def resolve(self) -> None:
        """Resolve this attack's shape-dependent defaults and check them (``raise self.fail(...)``)."""

    def seed_for(self, victim_seed: int) -> int:
        """The trigger and poison-index seed: the params' own, else the victim's."""
        return victim_seed if self.params.seed is None else self.params.seed

    def identity(self, victim_seed: int) -> dict[str, Any]:
        """Everything that fixes this attack's trigger and poisoning once the shape is known:
        the params with defaults resolved (part of the victim key). Attacks add what else
        they resolve."""
        d = self.params.model_dump(mode="json")
        d.update(poison_rate=self.poison_rate, seed=self.seed_for(victim_seed))
        if "cover_rate" in d:
            d["cover_rate"] = self.cover_rate
        return d

    def check_data(self, shape: Sequence[int], labels: np.ndarray) -> None:
        """Raise ValueError if a training set of images ``shape`` (C, H, W) and int ``labels`` (N,)
        cannot carry this attack (e.g. too few images of a class the recipe draws from). Data
        poisoning with uniform indices fits any data."""
        got = tuple(int(s) for s in shape)
        if got != self.input_shape:
            raise self.fail(f"built for inputs {self.input_shape}, got training images {got}")


class AttackParams(BaseModel):
    """Parameters shared by every attack; subclasses add their trigger's parameters.

    ``reference_rates`` / ``reference_cover_rates`` map the input side (16, 28, 32; others use
    32) to the attack's default poison / cover rate; ``Recipe`` resolves and checks the params
    for an input shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    reference_rates: ClassVar[Mapping[int, float]] = {16: 0.05, 28: 0.01, 32: 0.003}
    reference_cover_rates: ClassVar[Mapping[int, float]] = {32: 0.0}
    Recipe: ClassVar[type[AttackRecipe]] = AttackRecipe

    poison_rate: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="fraction of the whole training set poisoned (training-controlled attacks: of every "
        "training batch); null = the attack's reference rate for the input size",
    )
    target: int = Field(0, ge=0, description="target class of the all-to-one backdoor")
    seed: int | None = Field(None, description="trigger and poison-index seed; null = the victim's seed")

    def recipe(
        self,
        name: str,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        reference_rates: Mapping[int, float] | None = None,
        reference_cover_rates: Mapping[int, float] | None = None,
    ) -> AttackRecipe:
        """This attack's recipe for ``input_shape`` (raises ValueError on what cannot work);
        the tables default to this model's."""
        return self.Recipe(
            name,
            self,
            input_shape,
            num_classes,
            reference_rates=reference_rates,
            reference_cover_rates=reference_cover_rates,
        )


class CoverParams(AttackParams):
    """Attacks with cover (regularization) samples: triggered, but keeping their true labels."""

    cover_rate: float | None = Field(
        None, ge=0.0, lt=1.0, description="fraction of the training set used as cover samples; null = reference"
    )
