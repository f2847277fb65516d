"""Backdoor attacks (a registry), per ../shared/reference/attacks.md; the contract is in
:mod:`bdx_study.attacks._base`. One module per attack or attack family holds its parameter
model, its recipe and its Attack class, registered with ``@register_attack(name)``:

- patches: ``none``, ``badnet``, ``badnet_all2all``, ``trojan``, ``tact`` (:mod:`.patch`);
- blends: ``blend``, ``adaptive_blend`` (:mod:`.blend`), ``adaptive_patch`` (:mod:`.adaptive_patch`);
- clean-label: ``sig``, ``clean_label`` (:mod:`.clean_label`);
- warping: ``wanet`` (:mod:`.wanet`); frequency: ``lf``, ``ftrojan`` (:mod:`.frequency`);
- generator-based: ``issba`` (:mod:`.issba`), ``dynamic`` (:mod:`.dynamic`);
- training-controlled: ``bpp`` (:mod:`.bpp`), ``trojannn`` (:mod:`.trojannn`), ``dynamic``.

Importing this package imports every public module in it (a new attack is one new file) and no
torch: the attack modules use torch inside their methods only, and their networks live in
private helper modules (``_nets``, ``_surrogate``) imported when an attack trains. So
:func:`attack_params`, :func:`check_attack`, :func:`check_attack_data` and
:func:`attack_identity` (what ``bdx-study validate`` and the victim keys need) run without torch.
"""

from __future__ import annotations

import importlib
import pkgutil

from bdx_study.attacks._base import (
    Attack,
    AttackContext,
    AttackParams,
    AttackRecipe,
    CoverParams,
    HookBatch,
    PoisonedSet,
    TrainingControlledAttack,
    TrainingHook,
)
from bdx_study.attacks._registry import (
    ATTACKS,
    attack_identity,
    attack_params,
    check_attack,
    check_attack_data,
    create_attack,
    list_attacks,
    register_attack,
    user_attack,
)
from bdx_study.attacks._store import ArtifactStore
from bdx_study.attacks._triggers import patch_blend

__all__ = [
    "ATTACKS",
    "ArtifactStore",
    "Attack",
    "AttackContext",
    "AttackParams",
    "AttackRecipe",
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

for _module in pkgutil.iter_modules(__path__):  # the built-ins register themselves on import
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
