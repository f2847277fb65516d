"""The typed configs a study is made of, apart from the code that runs them: the evaluation
protocol every detector family shares (:class:`ProtocolConfig`, run by :mod:`bdx_study.protocol`)
and what determines a victim model (:class:`VictimConfig` with its data, training and attack
parts, trained and cached by :mod:`bdx_study.victims`).

Nothing here imports torch: reading and checking a study file (``bdx-study validate``) needs
these models, the registries' names and their torch-free specs, never an implementation.
Methods that act on tensors (building the attack or the model, cutting the data) import
their implementation when called.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from bdx_study._config import Precision, RowModel, StrictModel
from bdx_study.archs import ARCHITECTURES, check_input_shape
from bdx_study.attacks import ATTACKS, attack_identity, check_attack
from bdx_study.data import DATASETS, DataError, dataset_info, load_labels, resolve_root, split_indices
from bdx_study.metrics import conformal_threshold, fit_threshold

if TYPE_CHECKING:
    from bdx_study.archs import Classifier
    from bdx_study.attacks import Attack
    from bdx_study.data import ImageData, Splits


class ProtocolConfig(RowModel):
    """Settings every family of a study is evaluated under. Field names are the names used in
    YAML, MLflow and Parquet."""

    clean_set_size: int = Field(300, ge=2, description="|D_c|, reserved clean images (paper: 2,000 on CIFAR-10)")
    calibration_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of D_c held out to calibrate the threshold (when calibration_size is null)"
    )
    calibration_size: int | None = Field(
        None,
        ge=1,
        description="a separate calibration budget of reserved images beyond D_c, so families fit on all of D_c "
        "(the reference's setting); null = calibrate on calibration_fraction of D_c",
    )
    clean_set_seed: int = Field(
        0, ge=0, description="which reserved images form D_c: 0 = the first ones, else a seeded draw (refits)"
    )
    target_fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate the threshold targets (paper: 1%)")
    threshold_rule: Literal["conformal", "quantile"] = Field(
        "conformal", description="conformal: FPR <= target in expectation; quantile: the paper's interpolated quantile"
    )

    @property
    def calibration_images(self) -> int:
        """How many clean images the threshold is calibrated on (before keeping correct ones)."""
        if self.calibration_size is not None:
            return self.calibration_size
        return round(self.clean_set_size * self.calibration_fraction)

    @property
    def reserve_needed(self) -> int:
        return self.clean_set_size + (self.calibration_size or 0)

    def defender_split(self, reserve: ImageData) -> tuple[ImageData, ImageData]:
        """(finetune part, calibration part) of the defender's reserved clean pool."""
        if self.reserve_needed > len(reserve):
            raise DataError(
                f"clean_set_size {self.clean_set_size} + calibration_size {self.calibration_size or 0} exceed the "
                f"{len(reserve)} reserved images"
            )
        import torch  # the reserve is tensors: torch is loaded already

        if self.clean_set_seed == 0:
            order = torch.arange(len(reserve))
        else:
            order = torch.randperm(len(reserve), generator=torch.Generator().manual_seed(self.clean_set_seed))
        if self.calibration_size is None:
            dc = reserve.take(order[: self.clean_set_size])
            from bdx_study.data import defender_split

            return defender_split(dc, self.clean_set_size, self.calibration_fraction)
        n = self.clean_set_size
        return reserve.take(order[:n]), reserve.take(order[n : n + self.calibration_size])

    def clean_set_identity(self) -> dict[str, Any]:
        """What decides which images a family fits on (and calibrates on)."""
        return self.model_dump(include={"clean_set_size", "calibration_fraction", "calibration_size", "clean_set_seed"})

    def threshold(self, calibration_scores: np.ndarray) -> float:
        """The threshold from the scores of correctly classified clean calibration inputs."""
        if self.threshold_rule == "quantile":
            return fit_threshold(calibration_scores, self.target_fpr)
        return conformal_threshold(calibration_scores, self.target_fpr)


class DataConfig(StrictModel):
    """Where the data comes from and how it is split (shared by all victims of a study)."""

    root: str | None = Field(None, description="data root; null = built-in (digits) or system locations")
    download: bool = Field(False, description="let torchvision download missing files (needs network)")
    reserve_size: int = Field(300, ge=2, description="defender's reserved clean pool, images from the test portion")
    eval_size: int | None = Field(
        None, ge=2, description="held-out images (selection + evaluation); null = the rest of the test portion"
    )
    selection_fraction: float = Field(
        0.5, gt=0, lt=1, description="share of held-out images the search selects on; the rest report results"
    )
    train_size: int | None = Field(None, ge=1, description="cap on the victim's training images; null = all")
    split_seed: int = Field(0, description="seed of the split permutation, fixed across the study")

    def identity(self) -> dict[str, Any]:
        """The fields that change the data a victim is trained on (not how the held-out part is
        divided, nor where the files lie): victims are shared by studies that split differently."""
        return self.model_dump(include={"train_size", "split_seed"})

    def layout(self) -> dict[str, Any]:
        """The fields that decide how the held-out test images are split (reserve, selection,
        evaluation): what scored inputs are, besides the victim itself."""
        return self.model_dump(include={"reserve_size", "eval_size", "selection_fraction", "split_seed"})

    def test_portion(self, dataset: str) -> ImageData:
        """The dataset's whole test portion: where a victim's own accuracy and ASR are measured."""
        from bdx_study.data import load_test_portion

        return load_test_portion(dataset, root=self.root, download=self.download)

    def _cut(self) -> dict[str, Any]:
        """The fields that cut the splits, as :func:`~bdx_study.data.split_indices` and
        :func:`~bdx_study.data.load_splits` take them (one spelling for both)."""
        return self.model_dump(include={"reserve_size", "eval_size", "selection_fraction", "train_size", "split_seed"})

    def splits(self, dataset: str) -> Splits:
        """The dataset's splits as tensors (what victims train and trials score on)."""
        from bdx_study.data import load_splits

        return load_splits(dataset, root=self.root, download=self.download, **self._cut())

    def train_labels(self, dataset: str) -> np.ndarray:
        """The labels of the victim's training split, cut as :meth:`splits` cuts it, without torch
        (what ``validate`` checks attacks on; no pixels are copied)."""
        train, test = load_labels(dataset, resolve_root(self.root), self.download)
        rows = split_indices(dataset, len(train.labels), len(test.labels), **self._cut()).train
        return train.labels if rows is None else train.labels[rows]


class TrainingConfig(StrictModel):
    """How the victim is trained (by the attacker; not a defense hyperparameter)."""

    epochs: int = Field(40, ge=1, description="passes over the (poisoned) training set")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam was stable on digits; SGD is the CIFAR recipe")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    batch_size: int = Field(64, ge=1, description="mini-batch size")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay")
    milestones: tuple[int, ...] = Field((), description="epochs at which lr is multiplied by 0.1")
    augment: bool = Field(True, description="random crop (and flip on CIFAR) while training")
    # How the arithmetic runs, not what is trained: two knobs, not one combined value, because they
    # are independent (channels_last also speeds fp32 convolutions on tensor cores; bf16 helps
    # layouts either way) and each can be measured alone. Both change the trained weights, so a
    # non-default value is part of the victim key; the defaults are left out of it (IDENTITY_IF_SET),
    # which keeps every key computed before these fields existed.
    precision: Precision = Field("fp32", description="fp32, or bf16: forward pass and loss under bf16 autocast")
    channels_last: bool = Field(False, description="weights and batches in channels_last layout while training")

    IDENTITY_IF_SET: ClassVar[tuple[str, ...]] = ("precision", "channels_last")  # keyed only when not default

    def identity(self) -> dict[str, Any]:
        """The recipe as the victim key hashes it: every field, less the IDENTITY_IF_SET ones
        left at their defaults (so keys made before those fields existed stay valid)."""
        d = self.model_dump(mode="json")
        for name in self.IDENTITY_IF_SET:
            default = type(self).model_fields[name].default
            # getattr's default: a config pickled by a version without the field (a driver
            # started before an upgrade, its workers after) is at the default
            if getattr(self, name, default) == default:
                d.pop(name, None)
        return d


class AttackSpec(StrictModel):
    name: str = Field(description="registered attack name")
    params: dict[str, Any] = Field(default_factory=dict, description="the attack's own parameters")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        ATTACKS.require(v)  # raises with the known names
        return v


GroupColumn = Literal["attack", "victim_seed", "architecture", "dataset"]
GROUP_COLUMNS: tuple[GroupColumn, ...] = ("attack", "victim_seed", "architecture", "dataset")  # victims' groups


class VictimConfig(StrictModel):
    """Everything that determines a victim model; its hash is the cache key."""

    dataset: str
    architecture: str
    attack: AttackSpec
    seed: int = Field(0, description="training seed; also the trigger seed unless the attack sets one")
    training: TrainingConfig = TrainingConfig()
    data: DataConfig = DataConfig()

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        DATASETS.require(v)
        return v

    @field_validator("architecture")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        ARCHITECTURES.require(v)
        return v

    def identity(self) -> dict[str, Any]:
        """What the key hashes: the config (less where the data lies and how the held-out part is
        divided) and the attack's resolved parameters (its defaults depend on the input size)."""
        d = self.model_dump(mode="json", exclude={"data"})
        d["data"] = self.data.identity()
        d["training"] = self.training.identity()
        info = dataset_info(self.dataset)
        resolved = attack_identity(self.attack.name, self.attack.params, info.input_shape, info.num_classes, self.seed)
        d["attack"] = {"name": self.attack.name, "resolved": resolved}
        return d

    @property
    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def group_value(self, column: GroupColumn) -> Any:
        """The victim's value of a group column (what a nested fold holds out)."""
        by_column = {"attack": self.attack.name, "victim_seed": self.seed, "architecture": self.architecture}
        return {**by_column, "dataset": self.dataset}[column]

    @property
    def name(self) -> str:
        """Readable and unique within a study: dataset-arch-attack-seed-key."""
        return f"{self.dataset}-{self.architecture}-{self.attack.name}-s{self.seed}-{self.key[:6]}"

    def build_attack(self) -> Attack:
        from bdx_study.attacks import create_attack

        info = dataset_info(self.dataset)
        return create_attack(self.attack.name, self.attack.params, info.input_shape, info.num_classes, self.seed)

    def build_model(self) -> Classifier:
        from bdx_study.archs import create_model

        info = dataset_info(self.dataset)
        return create_model(self.architecture, info.input_shape, info.num_classes, info.mean, info.std)

    def check_attack(self) -> None:
        """The attack's params against the dataset's shape and classes (ValueError); no torch."""
        info = dataset_info(self.dataset)
        check_attack(self.attack.name, self.attack.params, info.input_shape, info.num_classes, self.seed)

    def check_architecture(self) -> None:
        """The architecture against the dataset's input shape (ValueError); no torch."""
        check_input_shape(self.architecture, dataset_info(self.dataset).input_shape)

    def check(self) -> None:
        """The checks that need no data: :meth:`check_attack`, then :meth:`check_architecture`."""
        self.check_attack()
        self.check_architecture()

    def check_data(self) -> None:
        """Load the victim's training split and let the attack check it (e.g. a clean-label
        target class with too few images): ValueError naming the attack, target and counts;
        a missing data root raises DataError naming the dataset and where it looked."""
        self.build_attack().check_data(self.data.splits(self.dataset).train)
