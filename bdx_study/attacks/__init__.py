"""Backdoor attacks (a registry), per ../shared/reference/attacks.md; the contract is in
:mod:`bdx_study.attacks._base`. One module per attack or attack family registers itself:

- patches: ``badnet``, ``badnet_all2all``, ``trojan``, ``tact`` (:mod:`.patch`);
- blends: ``blend``, ``adaptive_blend`` (:mod:`.blend`), ``adaptive_patch`` (:mod:`.adaptive_patch`);
- clean-label: ``sig``, ``clean_label`` (:mod:`.clean_label`);
- warping: ``wanet`` (:mod:`.wanet`); frequency: ``lf``, ``ftrojan`` (:mod:`.frequency`);
- generator-based: ``issba`` (:mod:`.issba`), ``dynamic`` (:mod:`.dynamic`);
- training-controlled: ``bpp`` (:mod:`.bpp`), ``trojannn`` (:mod:`.trojannn`), ``dynamic``.
"""

from bdx_study.attacks import (  # noqa: F401  (registration)
    adaptive_patch,
    blend,
    bpp,
    clean_label,
    dynamic,
    frequency,
    issba,
    patch,
    trojannn,
    wanet,
)
from bdx_study.attacks._base import (
    ATTACKS,
    Attack,
    AttackContext,
    AttackParams,
    CoverParams,
    HookBatch,
    PoisonedSet,
    TrainingControlledAttack,
    TrainingHook,
    create_attack,
    list_attacks,
    register_attack,
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
    "create_attack",
    "list_attacks",
    "patch_blend",
    "register_attack",
]
