"""The attack registry and the torch-free checks of an attack against an input shape and a
training set (what ``bdx-study validate`` runs).

The built-in attacks are declared here with their implementation module and their Params
model: their names and parameters are known without importing torch, and the module (which
registers the Attack class with :func:`register_attack`) is imported on the first
``ATTACKS.get(name)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bdx_study._registry import Registry
from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe
from bdx_study.attacks.recipes.adaptive_patch import AdaptivePatchParams
from bdx_study.attacks.recipes.blend import AdaptiveBlendParams, BlendParams
from bdx_study.attacks.recipes.bpp import BppParams
from bdx_study.attacks.recipes.clean_label import CleanLabelParams, SIGParams
from bdx_study.attacks.recipes.dynamic import DynamicParams
from bdx_study.attacks.recipes.frequency import FTrojanParams, LFParams
from bdx_study.attacks.recipes.issba import ISSBAParams
from bdx_study.attacks.recipes.patch import (
    BadNetAllToAllParams,
    BadNetParams,
    NoAttackParams,
    TaCTParams,
    TrojanParams,
)
from bdx_study.attacks.recipes.trojannn import TrojanNNParams
from bdx_study.attacks.recipes.wanet import WaNetParams

if TYPE_CHECKING:
    from bdx_study.attacks._base import Attack

ATTACKS: Registry[type[Attack]] = Registry("attack")

BUILTIN_ATTACKS: dict[str, tuple[str, type[AttackParams]]] = {  # name -> (module, Params)
    "none": ("patch", NoAttackParams),
    "badnet": ("patch", BadNetParams),
    "badnet_all2all": ("patch", BadNetAllToAllParams),
    "trojan": ("patch", TrojanParams),
    "tact": ("patch", TaCTParams),
    "blend": ("blend", BlendParams),
    "adaptive_blend": ("blend", AdaptiveBlendParams),
    "adaptive_patch": ("adaptive_patch", AdaptivePatchParams),
    "sig": ("clean_label", SIGParams),
    "clean_label": ("clean_label", CleanLabelParams),
    "wanet": ("wanet", WaNetParams),
    "lf": ("frequency", LFParams),
    "ftrojan": ("frequency", FTrojanParams),
    "issba": ("issba", ISSBAParams),
    "dynamic": ("dynamic", DynamicParams),
    "bpp": ("bpp", BppParams),
    "trojannn": ("trojannn", TrojanNNParams),
}
for _name, (_module, _params) in BUILTIN_ATTACKS.items():
    ATTACKS.declare(_name, f"bdx_study.attacks.{_module}", _params)


def register_attack(name: str) -> Any:
    """Class decorator: register an Attack subclass under ``name`` (and set its ``name``)."""

    def deco(cls: type[Attack]) -> type[Attack]:
        if ATTACKS.declared_module(name) == cls.__module__:  # a built-in: validation reads its declared Params
            declared = ATTACKS.spec(name)
            same_tables = all(
                getattr(cls, t) is getattr(declared, t) for t in ("reference_rates", "reference_cover_rates")
            )
            if cls.Params is not declared or not same_tables:
                raise TypeError(
                    f"attack {name!r}: {cls.__name__} must use the Params it is declared with "
                    f"({declared.__module__}.{declared.__qualname__}) and that model's reference rate tables "
                    "(what validation resolves defaults from)"
                )
        ATTACKS.register(name, cls.__module__)(cls)  # a user's class may not shadow a built-in
        cls.name = name
        return cls

    return deco


def list_attacks() -> list[str]:
    return ATTACKS.names()


def attack_params(name: str) -> type[AttackParams]:
    """The Params model of attack ``name``, without importing a built-in's implementation
    (unknown names raise, listing the known ones)."""
    spec = ATTACKS.spec(name)
    return spec if spec is not None else ATTACKS.get(name).Params


def user_attack(name: str) -> bool:
    """Whether ``name`` was registered by user code rather than declared: its checks may live in
    its own class (constructor, ``check_data``) rather than in a recipe."""
    ATTACKS.require(name)
    return ATTACKS.declared_module(name) is None


def attack_recipe(
    name: str, params: Mapping[str, Any] | AttackParams, input_shape: tuple[int, int, int], num_classes: int
) -> AttackRecipe:
    """The recipe ``create_attack(name, params, input_shape, num_classes, seed)`` builds its
    attack from: the same validation of ``params`` (a pydantic ValidationError) and the same
    checks (ValueError), torch-free."""
    model = attack_params(name)
    p = model.model_validate(dict(params) if isinstance(params, Mapping) else params)
    if not user_attack(name):  # a built-in's class uses its Params' tables (register_attack checks)
        return p.recipe(name, input_shape, num_classes)
    cls = ATTACKS.get(name)  # a user's Attack may set its own tables
    return p.recipe(
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
        cls = ATTACKS.get(name)  # the user's class imported torch already
        cls(
            cls.Params.model_validate(dict(params) if isinstance(params, Mapping) else params),
            input_shape,
            num_classes,
            seed,
        )
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
    if user_attack(name):  # a built-in's identity is its recipe's, loaded or not
        from bdx_study.attacks._base import Attack  # loaded with the user's class

        cls = ATTACKS.get(name)
        if cls.identity is not Attack.identity:  # a user's attack that adds to its identity
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
