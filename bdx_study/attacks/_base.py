"""The attack contract (per ../shared/reference/attacks.md), in pixel space [0, 1], images (N, C, H, W).

An attack is one module of :mod:`bdx_study.attacks` (or of a user's package) holding three
things: a parameter model (a subclass of :class:`AttackParams`), its recipe (a subclass of
:class:`AttackRecipe`, named by ``Params.Recipe``) and the :class:`Attack` subclass registered
with ``@register_attack(name)``. This module imports no torch (the tensors' methods import it on
first use), so an attack module that follows suit is importable without torch: that is how
``bdx-study validate`` reads names, parameters, checks and identities in well under a second.

An attack's **recipe** is everything about one attack instance that is known without building
its trigger: the params with every default the input shape decides resolved (poison and cover
rates, patch sizes and positions, amplitudes), and every check that the shape, the classes or
the training labels must pass. :class:`Attack` builds its recipe first and its tensors from it;
``check_attack`` and ``check_attack_data`` build the recipe alone. Each check has this one home.

An attack instance is a trigger fixed by (input shape, params, seed). A victim's training uses
it in this order (``bdx_study.victims.train_victim``):

1. ``create_attack(name, params, input_shape, num_classes, seed)``: unknown params, a trigger
   larger than the image or a target outside the classes fail here (ValueError), in the recipe;
2. ``check_data(train)``: data that cannot carry the attack fails here (e.g. a clean-label
   target class with fewer images than the poison count): the recipe's ``check_data``;
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

``register_attack`` checks the class against this contract and raises one TypeError naming the
class and everything it lacks. Every attack (a user's too): a concrete subclass of
:class:`Attack` (``apply_trigger`` implemented), ``Params`` a subclass of :class:`AttackParams`,
reference rate tables with a 32 entry (the rate for every input size the table does not name),
and ``quick_params``, when given, valid ``Params``. A built-in (a module of this package) also
needs its own ``Params`` model (its recipe is what ``validate`` checks without torch), a
docstring whose "Adaptation:" paragraph says how the reference recipe was carried to 16x16,
28x28 and 32x32 inputs, and, if it trains something (overrides ``prepare`` or
``training_hook``), ``quick_params`` (``{}`` when there is no budget to shrink). A user's attack
may keep its checks in its own constructor and ``check_data`` instead of its recipe: validation
then builds it, with torch.

Every trigger is generated from a seed; no third-party images or models are used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bdx_study._lazy import LazyModule

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from bdx_study.attacks._store import ArtifactStore
    from bdx_study.data import ImageData
else:
    torch = LazyModule("torch")

__all__ = [
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
    "check_placement",
    "class_indices",
    "corner_positions",
    "count_classes",
    "draw",
    "scaled",
    "seeded_init",
]

# ------------------------------------------------------------------------------ recipes (no tensors)


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


# ------------------------------------------------------------------------------ the attack (tensors)


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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


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
    and training data (torch-free); ``reference_rates`` / ``reference_cover_rates`` map the
    input side (16, 28, 32; others use 32) to the default poison / cover rate (read from
    ``Params`` unless the class sets its own); ``random_trigger`` says whether a different seed
    gives a different trigger; ``controls_training`` whether the attack trains through a
    :class:`TrainingHook`; ``quick_params`` (None: not given) are params that shrink what the
    attack trains (steps, epochs) to a few iterations, the trigger's recipe otherwise unchanged:
    what the contract tests build it with. What ``register_attack`` requires of a class is in
    the module docstring.
    """

    Params: ClassVar[type[AttackParams]] = AttackParams
    reference_rates: ClassVar[Mapping[int, float]] = AttackParams.reference_rates
    reference_cover_rates: ClassVar[Mapping[int, float]] = AttackParams.reference_cover_rates
    random_trigger: ClassVar[bool] = False
    controls_training: ClassVar[bool] = False
    quick_params: ClassVar[Mapping[str, Any] | None] = None
    name: ClassVar[str] = ""
    recipe: AttackRecipe

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class that sets ``Params`` takes its reference tables from it (unless it sets its own)."""
        super().__init_subclass__(**kwargs)
        params = cls.__dict__.get("Params")
        if isinstance(params, type) and issubclass(params, AttackParams):  # else register_attack refuses it
            for table in ("reference_rates", "reference_cover_rates"):
                if table not in cls.__dict__:
                    setattr(cls, table, getattr(params, table))

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


def class_indices(y: Tensor, classes: list[int] | int) -> Tensor:
    """Indices of samples whose label is in ``classes``."""
    cls = torch.tensor([classes] if isinstance(classes, int) else classes, dtype=y.dtype)
    return torch.isin(y, cls).nonzero().flatten()


def draw(pool: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """``k`` indices drawn uniformly without replacement from ``pool``, sorted."""
    return pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values


def seeded_init(module_factory: Callable[[], Any], seed: int) -> Any:
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
