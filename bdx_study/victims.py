"""Victim models: one backdoored classifier per victim config, trained once and cached under a
hash of that config (any node that sees the cache folder finds it again).

Cache layout: ``<cache>/<key>/model.safetensors`` and ``victim.json`` (config, metrics, sha256
of the weights), plus ``attack.safetensors`` when training taught the attack something (its
generators, an optimized trigger, an encoder; see :meth:`VictimRecord.load_attack`). What attacks
train once per dataset (ISSBA's encoder, the clean-label surrogate) is kept beside the victims in
``<cache>/attack-artifacts/``. Entries are written to a temporary folder and renamed into place, so
a cache entry is either complete or absent; a corrupted entry fails its hash check and is retrained.

What determines a victim (:class:`VictimConfig`: dataset, architecture, attack, seed, training and
data settings) is declared in :mod:`bdx_study.configs`, which imports no torch; this module trains
and caches what it describes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bdx_study._io import sha256_file
from bdx_study.archs import Classifier
from bdx_study.attacks import ArtifactStore, Attack, AttackContext
from bdx_study.configs import AttackSpec, DataConfig, TrainingConfig, VictimConfig  # noqa: F401  (their home is configs)
from bdx_study.data import ImageData, dataset_info
from bdx_study.training import accuracy, fit, pick_device, predict_data

ARTIFACTS_DIR = "attack-artifacts"  # under the victim cache: what attacks train once per dataset


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
