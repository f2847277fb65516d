"""The victim cache: keyed by the config's hash, trained once, corrupted entries retrained; the
attack's learned state and per-dataset artifacts stored beside the victims."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdx_study.victims import (
    ARTIFACTS_DIR,
    AttackSpec,
    DataConfig,
    TrainingConfig,
    VictimCache,
    VictimConfig,
    attack_success_rate,
)


def _cfg(**kw: object) -> VictimConfig:
    base: dict[str, object] = {
        "dataset": "digits",
        "architecture": "small_cnn",
        "attack": AttackSpec(name="badnet", params={"poison_rate": 0.1}),
        "training": TrainingConfig(epochs=1),
        "data": DataConfig(train_size=200, reserve_size=100),
    }
    base.update(kw)
    return VictimConfig.model_validate(base)


def test_key_follows_what_the_victim_is_trained_on() -> None:
    a = _cfg()
    assert a.key == _cfg().key
    # where the files lie and how the held-out part is divided do not change the victim
    assert a.key == _cfg(data=DataConfig(train_size=200, reserve_size=300, eval_size=50, root="/x")).key
    # the training data, seed, attack and recipe do
    assert a.key != _cfg(seed=1).key
    assert a.key != _cfg(data=DataConfig(train_size=300, reserve_size=100)).key
    assert a.key != _cfg(attack=AttackSpec(name="badnet", params={"poison_rate": 0.2})).key
    assert a.key != _cfg(training=TrainingConfig(epochs=2)).key


def test_key_hashes_resolved_attack_params() -> None:
    """Defaults depend on the input size, so the key hashes them resolved: a default written out
    is the same victim, and the same params on another dataset resolve differently."""
    implicit = _cfg(attack=AttackSpec(name="badnet", params={}))
    explicit = _cfg(attack=AttackSpec(name="badnet", params={"poison_rate": 0.05}))  # digits' default
    assert implicit.key == explicit.key
    assert implicit.identity()["attack"]["resolved"]["poison_rate"] == 0.05
    fm = _cfg(dataset="fashion_mnist", attack=AttackSpec(name="badnet", params={}))
    assert fm.identity()["attack"]["resolved"]["poison_rate"] == 0.01


def test_trained_once_and_corruption_retrains(tmp_path: Path) -> None:
    cache = VictimCache(tmp_path / "victims")
    cfg = _cfg()
    rec, trained = cache.get_or_train(cfg)
    assert trained and rec.path == tmp_path / "victims" / cfg.key
    assert 0.0 <= rec.clean_acc <= 1.0 and 0.0 <= rec.attack_success <= 1.0
    assert not rec.attack_state.exists()  # a fixed trigger has no learned state
    mtime = rec.weights.stat().st_mtime_ns
    again, trained = cache.get_or_train(cfg)
    assert not trained and again.weights.stat().st_mtime_ns == mtime

    blob = bytearray(rec.weights.read_bytes())
    blob[-1] ^= 0xFF  # one flipped byte: the hash check fails, the entry is retrained
    rec.weights.write_bytes(bytes(blob))
    assert cache.load(cfg) is None
    fixed, trained = cache.get_or_train(cfg)
    assert trained and fixed.weights_sha256 == rec.weights_sha256  # same config, same seed: same weights
    assert not [p for p in (tmp_path / "victims").iterdir() if p.name.startswith(".")]  # no leftovers


def test_training_controlled_attack_state_saved_with_the_victim(tmp_path: Path) -> None:
    """TrojanNN's trigger is optimized against the victim during training: it is stored with the
    victim, load_attack() restores it, and the stored ASR is reproduced from the cache."""
    cache = VictimCache(tmp_path / "victims")
    cfg = _cfg(
        attack=AttackSpec(name="trojannn", params={"trigger_steps": 5}),
        training=TrainingConfig(epochs=2, batch_size=50),
    )
    with pytest.raises(ValueError, match="trojannn.*load it with the victim"):
        cfg.build_attack().apply_trigger(torch.rand(2, 1, 16, 16))  # an untrained trigger is refused
    rec, _ = cache.get_or_train(cfg)
    assert rec.attack_state.is_file()
    attack = rec.load_attack()
    test = cfg.data.test_portion("digits")
    assert attack_success_rate(rec.load_model(), attack, test) == pytest.approx(rec.attack_success)
    # a corrupted attack state invalidates the entry like corrupted weights do
    blob = bytearray(rec.attack_state.read_bytes())
    blob[-1] ^= 0xFF
    rec.attack_state.write_bytes(bytes(blob))
    assert cache.load(cfg) is None


def test_attack_artifacts_cached_once_per_dataset(tmp_path: Path) -> None:
    """ISSBA's encoder is trained once for the training set and shared by victims of any seed."""
    cache = VictimCache(tmp_path / "victims")
    attack = AttackSpec(name="issba", params={"encoder_steps": 3, "encoder_width": 4})
    for seed in (0, 1):
        # enough steps to beat chance: a victim no better than chance is refused, not cached
        training = TrainingConfig(epochs=10, batch_size=50, lr=3e-3)
        cache.get_or_train(_cfg(attack=attack, seed=seed, training=training))
    entries = sorted(p.name for p in (tmp_path / "victims" / ARTIFACTS_DIR).iterdir())
    assert len(entries) == 1 and entries[0].startswith("issba_encoder-")


def test_static_and_data_checks() -> None:
    with pytest.raises(ValueError, match="vgg16_bn.*1x16x16.*3x32x32"):
        _cfg(architecture="vgg16_bn").check()
    with pytest.raises(ValueError, match="badnet.*patch_size 17"):
        _cfg(attack=AttackSpec(name="badnet", params={"patch_size": 17})).check()
    _cfg().check()
    # clean-label: 0.5 of 200 images must all come from the target class (about 20 images)
    cfg = _cfg(attack=AttackSpec(name="sig", params={"poison_rate": 0.5}))
    cfg.check()
    with pytest.raises(ValueError, match=r"sig.*needs 100 images of target class 0.*has \d+"):
        cfg.check_data()
