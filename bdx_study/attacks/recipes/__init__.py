"""The torch-free half of the attacks: each attack's parameter model and recipe (its defaults
resolved for an input shape, and its checks of shape, classes and training labels; see
:mod:`bdx_study.attacks.recipes._base`). One module here per implementation module of
:mod:`bdx_study.attacks`, which builds the attack's tensors from the recipe."""

from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe, CoverParams, by_side

__all__ = ["AttackParams", "AttackRecipe", "CoverParams", "by_side"]
