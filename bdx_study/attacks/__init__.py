"""Backdoor attacks (a registry), per ../shared/reference/attacks.md; the contract is in
:mod:`bdx_study.attacks._base`. One module per attack or attack family registers itself:

- patches: ``badnet``, ``badnet_all2all``, ``trojan``, ``tact`` (:mod:`.patch`);
- blends: ``blend``, ``adaptive_blend`` (:mod:`.blend`), ``adaptive_patch`` (:mod:`.adaptive_patch`);
- clean-label: ``sig``, ``clean_label`` (:mod:`.clean_label`);
- warping: ``wanet`` (:mod:`.wanet`); frequency: ``lf``, ``ftrojan`` (:mod:`.frequency`);
- generator-based: ``issba`` (:mod:`.issba`), ``dynamic`` (:mod:`.dynamic`);
- training-controlled: ``bpp`` (:mod:`.bpp`), ``trojannn`` (:mod:`.trojannn`), ``dynamic``.

Importing this package does not import torch: the built-ins are declared (name, module, Params
model) in :mod:`._registry` and their module is imported on the first ``ATTACKS.get(name)``;
each attack's params, checks and identity are in its torch-free recipe module, :mod:`.recipes`.
So :func:`attack_params`, :func:`check_attack`, :func:`check_attack_data` and
:func:`attack_identity` (what ``bdx-study validate`` and the victim keys need) run without
torch, and the torch names below are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bdx_study._lazy import lazy_exports
from bdx_study.attacks._registry import (
    ATTACKS,
    BUILTIN_ATTACKS,
    attack_identity,
    attack_params,
    check_attack,
    check_attack_data,
    list_attacks,
    register_attack,
    user_attack,
)
from bdx_study.attacks.recipes import AttackParams, CoverParams

if TYPE_CHECKING:
    from bdx_study.attacks._base import (
        Attack,
        AttackContext,
        HookBatch,
        PoisonedSet,
        TrainingControlledAttack,
        TrainingHook,
        create_attack,
    )
    from bdx_study.attacks._store import ArtifactStore
    from bdx_study.attacks._triggers import patch_blend

__all__ = [
    "ATTACKS",
    "ArtifactStore",
    "Attack",
    "AttackContext",
    "AttackParams",
    "CoverParams",
    "HookBatch",
    "PoisonedSet",
    "TrainingControlledAttack",
    "TrainingHook",
    "attack_identity",
    "attack_params",
    "check_attack",
    "check_attack_data",
    "create_attack",
    "list_attacks",
    "patch_blend",
    "register_attack",
    "user_attack",
]

_LAZY = {  # name -> the module that defines it (they import torch)
    **dict.fromkeys(
        [
            "Attack",
            "AttackContext",
            "HookBatch",
            "PoisonedSet",
            "TrainingControlledAttack",
            "TrainingHook",
            "create_attack",
        ],
        "bdx_study.attacks._base",
    ),
    "ArtifactStore": "bdx_study.attacks._store",
    "patch_blend": "bdx_study.attacks._triggers",
}


# the torch names on first use; the attack modules too (``bdx_study.attacks.patch``)
__getattr__ = lazy_exports(__name__, _LAZY, submodules={module for module, _ in BUILTIN_ATTACKS.values()})
