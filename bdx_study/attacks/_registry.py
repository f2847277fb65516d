"""The attack registry, what it checks of a class at registration, and the torch-free checks of
an attack against an input shape and a training set (what ``bdx-study validate`` runs).

Every attack module registers its class with :func:`register_attack`; the package imports its
built-in modules (every public module of :mod:`bdx_study.attacks`) when it is imported, and
they import no torch, so the registry is complete without it. A class that breaks the contract
(:mod:`bdx_study.attacks._base`) is refused here, with one TypeError listing what it lacks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import ValidationError

from bdx_study._registry import Registry
from bdx_study.attacks._base import Attack, AttackParams, AttackRecipe

ATTACKS: Registry[type[Attack]] = Registry("attack")

_PACKAGE = __name__.rpartition(".")[0]  # the built-ins' package: bdx_study.attacks


def _built_in(cls: type) -> bool:
    return cls.__module__.rpartition(".")[0] == _PACKAGE


def _trains_something(cls: type[Attack]) -> bool:
    return cls.prepare is not Attack.prepare or cls.training_hook is not Attack.training_hook


def contract_gaps(cls: Any) -> list[str]:
    """What ``cls`` lacks to be registered as an attack (empty: nothing); the rules are in
    :mod:`bdx_study.attacks._base`'s docstring."""
    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        return ["to be a subclass of bdx_study.attacks.Attack"]
    gaps = []
    if inspect.isabstract(cls):
        gaps.append(f"an implementation of {', '.join(sorted(cls.__abstractmethods__))}")
    params = cls.Params
    if not (isinstance(params, type) and issubclass(params, AttackParams)):
        return [*gaps, "Params: a subclass of AttackParams"]
    for table in ("reference_rates", "reference_cover_rates"):
        if 32 not in getattr(cls, table):
            gaps.append(f"{table}[32] (the rate for every input size the table does not name)")
    if _built_in(cls):
        if params is AttackParams:
            gaps.append("Params: its own parameter model, with its recipe (what validation checks without torch)")
        if "Adaptation:" not in (cls.__doc__ or ""):
            gaps.append('a docstring with an "Adaptation:" paragraph (the recipe at 16x16, 28x28 and 32x32)')
        if cls.quick_params is None and _trains_something(cls):
            gaps.append("quick_params (it trains something: the small budgets the contract tests use, {} if none)")
    if cls.quick_params is not None:
        try:
            params.model_validate(dict(cls.quick_params))
        except ValidationError as e:
            errors = ", ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            gaps.append(f"quick_params that {params.__name__} accepts ({errors})")
    return gaps


def register_attack(name: str) -> Callable[[type[Attack]], type[Attack]]:
    """Class decorator: register an Attack subclass under ``name`` (and set its ``name``).
    A class that breaks the contract is a TypeError naming it and what it lacks; a name that is
    registered already is a ValueError."""

    def deco(cls: type[Attack]) -> type[Attack]:
        gaps = contract_gaps(cls)
        if gaps:
            what = getattr(cls, "__qualname__", repr(cls))
            raise TypeError(f"attack {name!r}: {what} lacks " + "; ".join(gaps))
        ATTACKS.register(name)(cls)
        cls.name = name
        return cls

    return deco


def list_attacks() -> list[str]:
    return ATTACKS.names()


def attack_params(name: str) -> type[AttackParams]:
    """The Params model of attack ``name`` (unknown names raise, listing the known ones)."""
    return ATTACKS.get(name).Params


def user_attack(name: str) -> bool:
    """Whether ``name`` was registered by user code rather than built in: its checks may live in
    its own class (constructor, ``check_data``) rather than in its recipe."""
    return not _built_in(ATTACKS.get(name))


def _params(cls: type[Attack], params: Mapping[str, Any] | AttackParams) -> AttackParams:
    return cls.Params.model_validate(dict(params) if isinstance(params, Mapping) else params)


def create_attack(
    name: str, params: Mapping[str, Any] | AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int
) -> Attack:
    """Build attack ``name``; ``params`` are validated by its Params model (unknown keys fail)."""
    cls = ATTACKS.get(name)
    return cls(_params(cls, params), input_shape, num_classes, seed)


def attack_recipe(
    name: str, params: Mapping[str, Any] | AttackParams, input_shape: tuple[int, int, int], num_classes: int
) -> AttackRecipe:
    """The recipe ``create_attack(name, params, input_shape, num_classes, seed)`` builds its
    attack from: the same validation of ``params`` (a pydantic ValidationError) and the same
    checks (ValueError), torch-free."""
    cls = ATTACKS.get(name)
    return _params(cls, params).recipe(
        name,
        input_shape,
        num_classes,
        reference_rates=cls.reference_rates,
        reference_cover_rates=cls.reference_cover_rates,
    )


def check_attack(
    name: str,
    params: Mapping[str, Any] | AttackParams,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
) -> None:
    """Raise what ``create_attack(name, params, input_shape, num_classes, seed)`` raises at
    construction (unknown or invalid params, a target outside the classes, a trigger that does
    not fit the input, ...): a built-in's recipe, without torch; a user's attack is built, as
    its checks may be in its constructor."""
    if user_attack(name):
        create_attack(name, params, input_shape, num_classes, seed)
        return
    attack_recipe(name, params, input_shape, num_classes)


def attack_identity(
    name: str,
    params: Mapping[str, Any] | AttackParams,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int,
) -> dict[str, Any]:
    """``create_attack(name, params, input_shape, num_classes, seed).identity()``: the attack's
    part of the victim key (the params with defaults resolved), torch-free for the built-ins.
    Raises what :func:`check_attack` raises."""
    recipe = attack_recipe(name, params, input_shape, num_classes)
    cls = ATTACKS.get(name)
    if user_attack(name) and cls.identity is not Attack.identity:  # a user's attack that adds to its identity
        return cls(recipe.params, input_shape, num_classes, seed).identity()
    return recipe.identity(seed)


def check_attack_data(
    name: str,
    params: Mapping[str, Any] | AttackParams,
    input_shape: tuple[int, int, int],
    num_classes: int,
    train_shape: Sequence[int],
    labels: np.ndarray,
) -> None:
    """:func:`check_attack`, then what the attack's ``check_data`` raises for a training set of
    ``train_shape`` (C, H, W) images with int ``labels`` (N,): a shape mismatch, too few images
    of the classes the attack draws its poisons or covers from. Built-ins only: a user's attack
    (:func:`user_attack`) checks data in its own class, which may read the images, so check it
    on the tensors training uses (``VictimConfig.check_data``)."""
    if user_attack(name):
        raise TypeError(f"attack {name!r} is registered by user code: check its data with VictimConfig.check_data")
    attack_recipe(name, params, input_shape, num_classes).check_data(train_shape, np.asarray(labels, dtype=np.int64))
