"""The victim cache: keyed by the config's hash, trained once, corrupted entries retrained."""

from __future__ import annotations

from pathlib import Path

from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimCache, VictimConfig


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


def test_trained_once_and_corruption_retrains(tmp_path: Path) -> None:
    cache = VictimCache(tmp_path / "victims")
    cfg = _cfg()
    rec, trained = cache.get_or_train(cfg)
    assert trained and rec.path == tmp_path / "victims" / cfg.key
    assert 0.0 <= rec.clean_acc <= 1.0 and 0.0 <= rec.attack_success <= 1.0
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
