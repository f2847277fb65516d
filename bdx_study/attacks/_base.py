"""The attack contract (per ../shared/reference/attacks.md), in pixel space [0, 1], images (N, C, H, W).

An attack instance is a trigger fixed by (input shape, params, seed). A victim's training uses
it in this order (``bdx_study.victims.train_victim``):

1. ``create_attack(name, params, input_shape, num_classes, seed)``: unknown params, a trigger
   larger than the image or a target outside the classes fail here (ValueError);
2. ``check_data(train)``: data that cannot carry the attack fails here (e.g. a clean-label
   target class with fewer images than the poison count). These checks (and ``identity``)
   are the attack's torch-free recipe's (:mod:`bdx_study.attacks.recipes`): the attack
   builds its recipe first, ``check_attack`` / ``check_attack_data`` build it alone;
3. ``prepare(train, context)``: fits what the trigger needs before training (a surrogate and
   its PGD, a steganography encoder, a mask generator); most attacks need nothing;
4. ``poison(train)``: the fixed poisoned training set: which indices carry the trigger
   (``poison_indices``), which carry it but keep their labels (``cover_indices``);
5. ``training_hook()``: for attacks that control training (WaNet's noise mode, BppAttack,
   input-aware, TrojanNN), a :class:`TrainingHook` that ``training.fit`` calls on every batch;
6. ``state_dict()``: what training taught the trigger (generators, an optimized patch), saved
   with the victim and restored with ``load_state_dict``;
7. ``apply_trigger(x)`` (test time), ``counts_toward_asr(y)`` and ``attack_label(y)``: which
   evaluation inputs count toward attack success, and the label that counts as success.

Every trigger is generated from a seed; no third-party images or models are used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from bdx_study.attacks._registry import ATTACKS, list_attacks, register_attack
from bdx_study.attacks._store import ArtifactStore
from bdx_study.attacks.recipes._base import AttackParams, AttackRecipe, CoverParams, by_side
from bdx_study.data import ImageData

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "AttackParams",
    "AttackRecipe",
    "CoverParams",
    "HookBatch",
    "PoisonedSet",
    "TrainingControlledAttack",
    "TrainingHook",
    "batch_counts",
    "by_side",
    "class_indices",
    "create_attack",
    "draw",
    "list_attacks",
    "register_attack",
    "seeded_init",
]


def _empty_index() -> Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class PoisonedSet:
    data: ImageData  # the full training set after poisoning
    poison_indices: Tensor  # indices into data that carry the trigger and the attack's label
    cover_indices: Tensor = field(default_factory=_empty_index)  # triggered (or perturbed), labels kept


@dataclass(frozen=True)
class AttackContext:
    """Where and how ``prepare`` runs: an artifact store for what is cached per dataset (None =
    train in memory every time) and the device to train on."""

    store: ArtifactStore | None = None
    device: torch.device = torch.device("cpu")


class HookBatch(NamedTuple):
    x: Tensor  # the batch to train on, float [0, 1]
    y: Tensor  # its labels
    extra_loss: Tensor | None = None  # added to the classifier's cross-entropy (e.g. a generator's loss)
    n_poison: int = 0  # how many of the batch carry the trigger and the attack's label
    n_cover: int = 0  # how many carry a trigger (or cross/negative pattern) with their true label


class TrainingHook(ABC):
    """Per-batch control of a victim's training, for attacks that control training.

    ``training.fit`` calls ``start`` once before the first step (with the classifier's optimizer,
    whose schedule the attack's own optimizers may follow), ``start_epoch`` before every
    epoch, ``batch`` on every mini-batch (float [0, 1] on the training device, before the
    trainer's augmentation; ``idx`` are the batch's training-set indices, a CPU tensor even when
    training runs on a GPU), ``after_step`` after
    every optimizer step, and ``finish`` once at the end. Randomness comes from ``gen`` (a CPU
    generator), so training stays reproducible under its seed.
    """

    def start(  # noqa: B027  (optional)
        self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
    ) -> None:
        """Before the first step (move generators to ``device``, build optimizers)."""

    def start_epoch(self, model: nn.Module, epoch: int, epochs: int) -> None:  # noqa: B027  (optional)
        """Before epoch ``epoch`` (0-based) of ``epochs``."""

    @abstractmethod
    def batch(self, x: Tensor, y: Tensor, idx: Tensor, gen: torch.Generator) -> HookBatch:
        """The batch to train on instead of (x, y)."""

    def after_step(self) -> None:  # noqa: B027  (optional)
        """After the classifier's optimizer step (step the attack's own optimizers)."""

    def finish(self) -> None:  # noqa: B027  (optional)
        """After the last step (generators back to the CPU, eval mode)."""


class Attack(ABC):
    """One attack instance: a trigger fixed by (input shape, params, seed).

    Class attributes describe the recipe: ``Params``, the parameter model, whose ``Recipe``
    resolves the params' defaults for the input shape and holds every check of shape, classes
    and training data (torch-free, see :mod:`bdx_study.attacks.recipes`); ``reference_rates`` /
    ``reference_cover_rates`` map the input side (16, 28, 32; others use 32) to the default
    poison / cover rate (read from ``Params`` unless the class sets its own);
    ``random_trigger`` says whether a different seed gives a different trigger;
    ``controls_training`` whether the attack trains through a :class:`TrainingHook`.
    """

    Params: ClassVar[type[AttackParams]] = AttackParams
    reference_rates: ClassVar[Mapping[int, float]] = AttackParams.reference_rates
    reference_cover_rates: ClassVar[Mapping[int, float]] = AttackParams.reference_cover_rates
    random_trigger: ClassVar[bool] = False
    controls_training: ClassVar[bool] = False
    name: ClassVar[str] = ""
    recipe: AttackRecipe

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class that sets ``Params`` takes its reference tables from it (unless it sets its own)."""
        super().__init_subclass__(**kwargs)
        if "Params" in cls.__dict__:
            for table in ("reference_rates", "reference_cover_rates"):
                if table not in cls.__dict__:
                    setattr(cls, table, getattr(cls.Params, table))

    def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        self.recipe = params.recipe(
            self.name,
            input_shape,
            num_classes,
            reference_rates=self.reference_rates,
            reference_cover_rates=self.reference_cover_rates,
        )
        self.params = params
        self.input_shape: tuple[int, int, int] = self.recipe.input_shape
        self.num_classes = num_classes
        self.seed = self.recipe.seed_for(seed)
        self.target = params.target
        self.poison_rate: float = self.recipe.poison_rate
        self.cover_rate: float = self.recipe.cover_rate
        self.prepared = False

    # ---------------------------------------------------------------- identity and randomness

    def identity(self) -> dict[str, Any]:
        """Everything that fixes this attack's trigger and poisoning once the shape is known:
        the params with defaults resolved (part of the victim key): the recipe's."""
        return self.recipe.identity(self.seed)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator fixed by the attack's seed; offsets separate independent draws
        (1: poison indices, 2: trigger pattern, 3: per-image randomness of poisoning)."""
        return torch.Generator().manual_seed(self.seed * 1000 + offset)

    def fail(self, message: str) -> ValueError:
        return ValueError(f"attack {self.name!r}: {message}")

    # ---------------------------------------------------------------- before training

    def check_data(self, train: ImageData) -> None:
        """Raise ValueError if ``train`` cannot carry this attack (e.g. too few images of a class
        the recipe draws from): the recipe's :meth:`~AttackRecipe.check_data`."""
        self.recipe.check_data(train.shape, train.y.cpu().numpy())

    def prepare(self, train: ImageData, context: AttackContext | None = None) -> None:
        """Fit what the trigger needs before the victim trains (no-op for most attacks)."""
        self.prepared = True

    def select(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(poison indices, cover indices), disjoint and sorted: ``int(N * poison_rate)`` drawn
        uniformly from the whole training set (target class included), then
        ``int(N * cover_rate)`` from the rest."""
        n = len(y)
        k, kc = int(n * self.poison_rate), int(n * self.cover_rate)
        perm = torch.randperm(n, generator=self.generator(1))
        return perm[:k].sort().values, perm[k : k + kc].sort().values

    def poison(self, data: ImageData) -> PoisonedSet:
        """The poisoned training set: poison images get :meth:`poison_images` and
        :meth:`poison_labels`; cover images get :meth:`cover_images` and keep their labels."""
        self.check_data(data)
        if not self.prepared:
            self.prepare(data)
        pidx, cidx = self.select(data.y)
        gen = self.generator(3)
        xs, ys = [], []
        if len(pidx):
            xs.append(self.poison_images(data.images(pidx), gen))
            ys.append(self.poison_labels(data.y[pidx]))
        if len(cidx):
            xs.append(self.cover_images(data.images(cidx), gen))
            ys.append(data.y[cidx])
        if not xs:
            return PoisonedSet(data, pidx, cidx)
        idx = torch.cat([pidx, cidx])
        return PoisonedSet(data.with_rows(idx, torch.cat(xs), torch.cat(ys)), pidx, cidx)

    def poison_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Poisoned training images from clean ones (default: :meth:`train_trigger`)."""
        return self.train_trigger(x)

    def cover_images(self, x: Tensor, gen: torch.Generator) -> Tensor:
        """Cover images from clean ones; they keep their labels (default: the poison images' trigger)."""
        return self.poison_images(x, gen)

    def poison_labels(self, y: Tensor) -> Tensor:
        """Labels poisoned training images get (default: the attack label, i.e. the target)."""
        return self.attack_label(y)

    def training_hook(self) -> TrainingHook | None:
        """Per-batch control of training, for attacks that control it; None for data poisoning."""
        return None

    # ---------------------------------------------------------------- learned state

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that training taught the trigger (saved with the victim); empty for fixed triggers."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise self.fail(f"has no learned state, got {sorted(state)}")

    # ---------------------------------------------------------------- test time

    @abstractmethod
    def apply_trigger(self, x: Tensor) -> Tensor:
        """Return ``x`` (N, C, H, W) in [0, 1] with the test-time trigger, in [0, 1]."""

    def train_trigger(self, x: Tensor) -> Tensor:
        """The trigger stamped on poisoned training images; the test-time one unless overridden."""
        return self.apply_trigger(x)

    def counts_toward_asr(self, y: Tensor) -> Tensor:
        """Boolean mask of evaluation inputs whose triggered version counts toward attack success
        (all-to-one: true class != target)."""
        return y != self.target

    def attack_label(self, y: Tensor) -> Tensor:
        """The label that counts as attack success for inputs of true class ``y``."""
        return torch.full_like(y, self.target)


def create_attack(
    name: str, params: dict[str, Any], input_shape: tuple[int, int, int], num_classes: int, seed: int
) -> Attack:
    """Build attack ``name``; ``params`` are validated by its Params model (unknown keys fail)."""
    cls = ATTACKS.get(name)
    return cls(cls.Params.model_validate(params), input_shape, num_classes, seed)


def class_indices(y: Tensor, classes: list[int] | int) -> Tensor:
    """Indices of samples whose label is in ``classes``."""
    cls = torch.tensor([classes] if isinstance(classes, int) else classes, dtype=y.dtype)
    return torch.isin(y, cls).nonzero().flatten()


def draw(pool: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """``k`` indices drawn uniformly without replacement from ``pool``, sorted."""
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values


def seeded_init(module_factory: Any, seed: int) -> Any:
    """Build a module with weights drawn from ``seed`` without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module_factory()


class TrainingControlledAttack(Attack):
    """An attack that poisons through its :class:`TrainingHook` rather than a fixed poisoned set:
    ``poison`` leaves the data as it is (no indices), ``poison_rate`` (and ``cover_rate``) are
    shares of every training batch."""

    controls_training = True

    def select(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return _empty_index(), _empty_index()

    @abstractmethod
    def training_hook(self) -> TrainingHook:
        """The hook that poisons training batches."""


def batch_counts(n: int, poison_rate: float, cover_rate: float = 0.0) -> tuple[int, int]:
    """(poisoned, cover) samples of a batch of ``n``: int(n * rate) each, together at most n."""
    k = min(n, int(n * poison_rate))
    return k, min(n - k, int(n * cover_rate))
