"""Victim models: one backdoored classifier per victim config, trained once and cached under a
hash of that config (any node that sees the cache folder finds it again).

Cache layout: ``<cache>/<key>/model.safetensors`` and ``victim.json`` (config, metrics, sha256
of the weights), plus ``attack.safetensors`` when training taught the attack something (its
generators, an optimized trigger, an encoder; see :meth:`VictimRecord.load_attack`). What attacks
train once per dataset (ISSBA's encoder, the clean-label surrogate) is kept beside the victims in
``<cache>/attack-artifacts/``. Entries are written to a temporary folder and renamed into place, so
a cache entry is either complete or absent; a corrupted entry fails its hash check and is retrained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file

from bdx_study._config import StrictModel
from bdx_study._io import sha256_file
from bdx_study.archs import ARCHITECTURES, Classifier, check_input_shape, create_model
from bdx_study.attacks import ATTACKS, ArtifactStore, Attack, AttackContext, create_attack
from bdx_study.data import DATASETS, ImageData, Splits, dataset_info, load_splits, load_test_portion
from bdx_study.training import Precision, accuracy, fit, pick_device, predict_data

ARTIFACTS_DIR = "attack-artifacts"  # under the victim cache: what attacks train once per dataset


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
        return load_test_portion(dataset, root=self.root, download=self.download)

    def splits(self, dataset: str) -> Splits:
        return load_splits(
            dataset,
            root=self.root,
            reserve_size=self.reserve_size,
            eval_size=self.eval_size,
            selection_fraction=self.selection_fraction,
            train_size=self.train_size,
            split_seed=self.split_seed,
            download=self.download,
        )


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
        ATTACKS.get(v)  # raises with the known names
        return v


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
        DATASETS.get(v)
        return v

    @field_validator("architecture")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        ARCHITECTURES.get(v)
        return v

    def identity(self) -> dict[str, Any]:
        """What the key hashes: the config (less where the data lies and how the held-out part is
        divided) and the attack's resolved parameters (its defaults depend on the input size)."""
        d = self.model_dump(mode="json", exclude={"data"})
        d["data"] = self.data.identity()
        d["training"] = self.training.identity()
        d["attack"] = {"name": self.attack.name, "resolved": self.build_attack().identity()}
        return d

    @property
    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """Readable and unique within a study: dataset-arch-attack-seed-key."""
        return f"{self.dataset}-{self.architecture}-{self.attack.name}-s{self.seed}-{self.key[:6]}"

    def build_attack(self) -> Attack:
        info = dataset_info(self.dataset)
        return create_attack(self.attack.name, self.attack.params, info.input_shape, info.num_classes, self.seed)

    def build_model(self) -> Classifier:
        info = dataset_info(self.dataset)
        return create_model(self.architecture, info.input_shape, info.num_classes, info.mean, info.std)

    def check(self) -> None:
        """The checks that need no data: the attack's params against the dataset's shape and
        classes, and the architecture against the dataset's input shape (ValueError)."""
        self.build_attack()
        check_input_shape(self.architecture, dataset_info(self.dataset).input_shape)

    def check_data(self) -> None:
        """Load the victim's training split and let the attack check it (e.g. a clean-label
        target class with too few images): ValueError naming the attack, target and counts;
        a missing data root raises DataError naming the dataset and where it looked."""
        self.build_attack().check_data(self.data.splits(self.dataset).train)


@dataclass(frozen=True)
class VictimRecord:
    """A trained, cached victim: where its weights are and what it measured."""

    config: VictimConfig
    path: Path  # the cache entry's folder
    clean_acc: float  # on the dataset's whole test portion
    attack_success: float  # on triggered test inputs that count toward ASR; nan for 'none'
    train_seconds: float
    weights_sha256: str

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def attack_state(self) -> Path:
        return self.path / "attack.safetensors"

    def load_model(self, device: torch.device | str = "cpu") -> Classifier:
        model = self.config.build_model()
        model.load_state_dict(load_file(self.weights, device=str(device)))
        return model.to(device).eval()

    def load_attack(self) -> Attack:
        """The victim's attack as it was trained: the config's attack plus what training taught
        it (generators, an optimized trigger, an encoder). Use this, not
        ``config.build_attack()``, for test-time triggers: attacks with learned state refuse to
        apply an untrained trigger."""
        attack = self.config.build_attack()
        if self.attack_state.is_file():
            attack.load_state_dict(load_file(self.attack_state))
        return attack


def attack_success_rate(model: torch.nn.Module, attack: Attack, data: ImageData) -> float:
    """Share of the inputs that count toward attack success whose triggered version the model
    assigns the attack label (nan when none counts, e.g. a clean victim)."""
    mask = attack.counts_toward_asr(data.y)
    if not bool(mask.any()):
        return float("nan")
    counted = data.take(mask.nonzero().flatten())
    pred = predict_data(model, counted, transform=attack.apply_trigger)
    return float((pred == attack.attack_label(counted.y)).float().mean())


def train_victim(
    config: VictimConfig, *, device: torch.device | None = None, artifacts: ArtifactStore | None = None
) -> tuple[Classifier, dict[str, float], Attack]:
    """Poison the training split, train the victim, and measure clean accuracy and attack
    success. Returns (model, metrics, attack as trained). ``artifacts`` caches what the attack
    trains once per dataset (None: trained in memory)."""
    device = device or pick_device()
    start = time.perf_counter()
    splits = config.data.splits(config.dataset)
    attack = config.build_attack()
    attack.check_data(splits.train)
    attack.prepare(splits.train, AttackContext(store=artifacts, device=device))
    poisoned = attack.poison(splits.train)
    torch.manual_seed(config.seed)
    model = config.build_model().to(device)
    t = config.training
    opt: torch.optim.Optimizer
    if t.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(t.milestones), 0.1) if t.milestones else None
    gen = torch.Generator().manual_seed(config.seed)
    fit(
        model,
        poisoned.data,
        opt,
        epochs=t.epochs,
        batch_size=t.batch_size,
        gen=gen,
        augment=splits.info if t.augment else None,
        scheduler=sched,
        device=device,
        hook=attack.training_hook(),
        precision=t.precision,
        channels_last=t.channels_last,
    )
    model.eval()
    test = config.data.test_portion(config.dataset)
    metrics = {
        "clean_acc": accuracy(model, test, device=device),
        "attack_success": attack_success_rate(model, attack, test),
        "train_seconds": time.perf_counter() - start,
        "poisoned_count": float(len(poisoned.poison_indices)),
        "cover_count": float(len(poisoned.cover_indices)),
        "poison_rate": attack.poison_rate,
        "cover_rate": attack.cover_rate,
    }
    return model, metrics, attack


class VictimError(ValueError):
    """A victim that cannot serve a study (e.g. it learned nothing); never cached."""


CHANCE_MARGIN = 0.05  # a victim must beat chance (1 / classes) by more than this to be cached


def check_learned(config: VictimConfig, clean_acc: float) -> None:
    """Refuse a victim whose clean accuracy is no better than chance: a broken training recipe
    (e.g. a far too large learning rate) must not be cached as a valid victim for good."""
    chance = 1.0 / dataset_info(config.dataset).num_classes
    if not clean_acc > chance + CHANCE_MARGIN:
        t = config.training
        raise VictimError(
            f"victim {config.name} reached clean accuracy {clean_acc:.3f}, no better than chance ({chance:.3f}): "
            f"it learned nothing and is not cached; check victims.training (optimizer {t.optimizer}, lr {t.lr}, "
            f"epochs {t.epochs})"
        )


class VictimCache:
    """Content-addressed store of trained victims: ``<root>/<config key>/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def entry(self, config: VictimConfig) -> Path:
        return self.root / config.key

    @property
    def artifacts(self) -> ArtifactStore:
        """Where attacks keep what they train once per dataset (ISSBA encoders, surrogates)."""
        return ArtifactStore(self.root / ARTIFACTS_DIR)

    def load(self, config: VictimConfig) -> VictimRecord | None:
        """The cached record, or None when absent or when its weights fail the hash check."""
        folder = self.entry(config)
        meta_path = folder / "victim.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        weights = folder / "model.safetensors"
        if not weights.is_file() or sha256_file(weights) != meta["weights_sha256"]:
            return None
        attack_state = folder / "attack.safetensors"
        if "attack_sha256" in meta and (
            not attack_state.is_file() or sha256_file(attack_state) != meta["attack_sha256"]
        ):
            return None
        return VictimRecord(
            config=config,
            path=folder,
            clean_acc=meta["metrics"]["clean_acc"],
            attack_success=meta["metrics"]["attack_success"],
            train_seconds=meta["metrics"]["train_seconds"],
            weights_sha256=meta["weights_sha256"],
        )

    def get_or_train(self, config: VictimConfig, *, device: torch.device | None = None) -> tuple[VictimRecord, bool]:
        """Return (record, trained_now). Trains and stores the victim only when no valid entry exists."""
        record = self.load(config)
        if record is not None:
            return record, False
        model, metrics, attack = train_victim(config, device=device, artifacts=self.artifacts)
        check_learned(config, metrics["clean_acc"])
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{config.key}.", dir=self.root))
        tmp.chmod(0o755)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        meta: dict[str, Any] = {
            "key": config.key,
            "name": config.name,
            "config": config.model_dump(mode="json"),
            "metrics": metrics,
            "weights_sha256": sha256_file(tmp / "model.safetensors"),
        }
        state = attack.state_dict()
        if state:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / "attack.safetensors")
            meta["attack_sha256"] = sha256_file(tmp / "attack.safetensors")
        (tmp / "victim.json").write_text(json.dumps(meta, indent=2))
        final = self.entry(config)
        if final.exists() and self.load(config) is None:  # a corrupted entry: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process stored a valid entry meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        record = self.load(config)
        if record is None:
            raise RuntimeError(f"victim cache entry {final} could not be written")
        return record, True
