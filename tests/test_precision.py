"""The GPU data path and the precision option, checked on the CPU.

- ``training.fit`` gathers and augments batches on the data's device; on the CPU it must give
  the same weights, bit for bit, as the host loop it replaced (same draws from ``gen``, same
  order), also with an attack's training hook (which keeps getting CPU indices);
- ``precision`` (fp32 | bf16) and ``channels_last`` train a victim and fit BaDExpert on the CPU;
- their defaults leave every victim key and stage key as it was (caches stay valid), a set
  value changes them, a bad value fails naming the key;
- MLflow sees them: trial params, victim params and tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from bdx_study.data import ImageData, augment_batch, dataset_info, defender_split, load_splits, to_uint8
from bdx_study.detectors import FitContext, create_detector
from bdx_study.detectors.badexpert import BaDExpertParams
from bdx_study.protocol import ProtocolConfig
from bdx_study.space import SpaceError, parse_space
from bdx_study.stages import StageStore
from bdx_study.training import fit
from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimConfig, train_victim

from .conftest import tiny_study

ROOT = Path(__file__).resolve().parents[1]
DIGITS_VICTIM = VictimConfig(dataset="digits", architecture="small_cnn", attack=AttackSpec(name="badnet"))
ABLATION_VICTIM = VictimConfig(
    dataset="cifar10",
    architecture="resnet18",
    attack=AttackSpec(name="blend", params={"poison_rate": 0.003, "alpha": 0.2}),
    training=TrainingConfig(
        optimizer="sgd", lr=0.1, epochs=100, milestones=(50, 75), batch_size=128, weight_decay=1e-4
    ),
)
# Keys computed by the code before `precision` and `channels_last` existed (commit f2ff5ed).
OLD_KEYS = [(DIGITS_VICTIM, "d1089af67a13b10d"), (ABLATION_VICTIM, "cd6cc25cf5d4c484")]
OLD_STAGE_KEYS = {"expert": "0bb8de116e1532c9aeb2", "auxiliary": "0cc05c9c4a3be4c33877"}  # DIGITS_VICTIM, defaults


def old_rule_key(config: VictimConfig) -> str:
    """The victim key as it was computed before the new fields: the whole dump, new fields absent."""
    d = config.model_dump(mode="json", exclude={"data"})
    for name in ("precision", "channels_last"):
        d["training"].pop(name)
    d["data"] = config.data.identity()
    d["attack"] = {"name": config.attack.name, "resolved": config.build_attack().identity()}
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(("config", "old_key"), OLD_KEYS, ids=["digits", "cifar-ablation"])
def test_default_victim_key_is_unchanged(config: VictimConfig, old_key: str) -> None:
    assert config.training.precision == "fp32" and config.training.channels_last is False
    assert config.key == old_rule_key(config) == old_key
    assert "precision" not in config.identity()["training"]


def test_set_precision_or_layout_changes_the_victim_key() -> None:
    def with_training(**update: Any) -> VictimConfig:
        return DIGITS_VICTIM.model_copy(update={"training": DIGITS_VICTIM.training.model_copy(update=update)})

    keys = {
        DIGITS_VICTIM.key,
        with_training(precision="bf16").key,
        with_training(channels_last=True).key,
        with_training(precision="bf16", channels_last=True).key,
    }
    assert len(keys) == 4
    assert with_training(precision="bf16").identity()["training"]["precision"] == "bf16"


def test_default_stage_keys_are_unchanged_and_set_values_change_both_components() -> None:
    protocol = ProtocolConfig()
    default = create_detector("badexpert", {})
    for comp, old in OLD_STAGE_KEYS.items():
        assert {"precision", "channels_last"} <= set(BaDExpertParams.component_fields(comp))
        assert "precision" not in default.params.component_params(comp)
        assert StageStore.component_key(default, comp, DIGITS_VICTIM.key, protocol) == old
    for update in ({"precision": "bf16"}, {"channels_last": True}):
        family = create_detector("badexpert", update)
        for comp, old in OLD_STAGE_KEYS.items():
            assert family.params.component_params(comp)[next(iter(update))] == next(iter(update.values()))
            assert StageStore.component_key(family, comp, DIGITS_VICTIM.key, protocol) != old


def test_bad_values_fail_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="precision"):
        TrainingConfig(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="channels_last"):
        TrainingConfig(channels_last="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="precision"):
        BaDExpertParams(precision="bf8")  # type: ignore[arg-type]
    doc = tiny_study(tmp_path)
    doc["victims"]["training"]["precision"] = "fp16"
    with pytest.raises(SpaceError, match=r"victims\.training\.precision"):
        parse_space(doc, "study.yaml")
    doc = tiny_study(tmp_path)
    doc["detectors"]["badexpert"]["precision"] = "half"
    with pytest.raises(SpaceError, match="precision"):
        parse_space(doc, "study.yaml")


# ------------------------------------------------------------------------------ the CPU path


def host_loop(
    model: nn.Module, data: ImageData, opt: torch.optim.Optimizer, *, gen: torch.Generator, **kw: Any
) -> None:
    """``training.fit``'s loop before the GPU-resident data path (batches indexed and augmented
    on the host, then copied): the reference the CPU path must match bit for bit."""
    loss_fn = nn.CrossEntropyLoss()
    hook, info = kw.get("hook"), kw.get("augment")
    if hook is not None:
        hook.start(model, opt, torch.device("cpu"))
    for epoch in range(kw["epochs"]):
        if hook is not None:
            hook.start_epoch(model, epoch, kw["epochs"])
        model.train()
        perm = torch.randperm(len(data), generator=gen)
        for start in range(0, len(data), kw["batch_size"]):
            idx = perm[start : start + kw["batch_size"]]
            x, y, extra = data.images(idx), data.y[idx], None
            if hook is not None:
                x, y, extra, _, _ = hook.batch(x, y, idx, gen)
            if info is not None:
                x = augment_batch(x, info, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if extra is not None:
                loss = loss + extra
            loss.backward()
            opt.step()
            if hook is not None:
                hook.after_step()
    if hook is not None:
        hook.finish()


@pytest.mark.parametrize(
    ("attack", "storage"),
    [("badnet", torch.uint8), ("bpp", torch.float32)],
    ids=["data-poisoning-uint8", "training-hook-float32"],
)
def test_cpu_fit_matches_the_host_loop_bit_for_bit(attack: str, storage: torch.dtype) -> None:
    torch.set_num_threads(1)
    cfg = VictimConfig(dataset="digits", architecture="small_cnn", attack=AttackSpec(name=attack))
    splits = load_splits("digits", reserve_size=300, train_size=256)
    poisoned = cfg.build_attack().poison(splits.train).data
    if storage == torch.uint8:  # what the file loaders give
        poisoned = ImageData(to_uint8(poisoned.x), poisoned.y)
    assert poisoned.pixels.dtype == storage
    weights = []
    for loop in (host_loop, fit):
        torch.manual_seed(0)
        model = cfg.build_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(3)
        hook = cfg.build_attack().training_hook()
        assert (hook is not None) == (attack == "bpp")
        loop(model, poisoned, opt, gen=gen, epochs=2, batch_size=64, augment=splits.info, hook=hook)
        weights.append(model.state_dict())
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_augment_draws_come_from_the_cpu_generator() -> None:
    """The same draws on any device: the batch's device only does the cropping and flipping."""
    info = dataset_info("cifar10")
    x = torch.rand(8, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    a = augment_batch(x, info, gen)
    after = torch.rand(1, generator=gen)
    gen2 = torch.Generator().manual_seed(0)
    for draw in (lambda: torch.randint(0, 9, (8,), generator=gen2), lambda: torch.rand(8, generator=gen2)):
        draw()
    torch.rand(8, generator=gen2)
    assert torch.equal(after, torch.rand(1, generator=gen2))  # three draws of n, nothing else
    assert a.shape == x.shape and a.is_contiguous()


# ------------------------------------------------------------------------------ bf16 / channels_last on the CPU


def tiny_victim(**training: Any) -> VictimConfig:
    return VictimConfig(
        dataset="digits",
        architecture="small_cnn",
        attack=AttackSpec(name="badnet", params={"poison_rate": 0.1}),
        training=TrainingConfig(epochs=3, lr=2e-3, **training),
        data=DataConfig(reserve_size=300, train_size=400),
    )


def test_bf16_channels_last_victim_trains_on_cpu() -> None:
    torch.set_num_threads(1)
    cfg = tiny_victim(precision="bf16", channels_last=True)
    model, metrics, _ = train_victim(cfg, device=torch.device("cpu"))
    fp32, _, _ = train_victim(tiny_victim(), device=torch.device("cpu"))
    assert metrics["clean_acc"] > 0.3  # learned something (chance: 0.1)
    for name, p in model.state_dict().items():
        assert p.dtype == fp32.state_dict()[name].dtype  # weights stay float32 under autocast
        assert p.is_contiguous(), name  # channels_last only while training
    assert any(not torch.equal(p, fp32.state_dict()[k]) for k, p in model.state_dict().items())


def test_badexpert_fits_in_bf16_channels_last_on_cpu() -> None:
    torch.set_num_threads(1)
    cfg = tiny_victim()
    model, _, _ = train_victim(cfg, device=torch.device("cpu"))
    splits = cfg.data.splits("digits")
    finetune, holdout = defender_split(splits.reserve, 200, 0.25)
    ctx = FitContext(model=model.eval(), clean=finetune, holdout=holdout, info=splits.info, device=torch.device("cpu"))
    small = {"unlearn_batch_size": 32, "aux_epochs": 2, "aux_milestones": [1]}
    states = {}
    for label, extra in (("fp32", {}), ("bf16", {"precision": "bf16", "channels_last": True})):
        family = create_detector("badexpert", {**small, **extra})
        states[label] = {c: family.fit(c, ctx) for c in family.components}
        for fitted in states[label].values():
            assert all(torch.isfinite(t).all() and t.is_contiguous() for t in fitted.tensors.values())
    for comp in ("expert", "auxiliary"):
        a, b = states["fp32"][comp].tensors, states["bf16"][comp].tensors
        assert any(not torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ MLflow


def test_precision_is_in_trial_params_and_victim_tags(tmp_path: Path) -> None:
    from bdx_study.trials.parent_run import victim_run_fields
    from bdx_study.trials.tracking import trial_params

    doc = tiny_study(tmp_path)
    doc["detectors"]["badexpert"]["precision"] = "bf16"
    doc["victims"]["training"]["channels_last"] = True
    spec = parse_space(doc, "study.yaml")
    params = trial_params(spec, {"detector": "badexpert", "unlearn_lr": 1e-4, "aux_lr": 0.1})
    assert params["precision"] == "bf16" and params["channels_last"] is False
    (victim,) = spec.victim_configs()
    vparams, tags = victim_run_fields(victim)
    assert vparams["training.precision"] == "fp32" and vparams["training.channels_last"] is True
    assert tags == {"bdx.precision": "fp32", "bdx.channels_last": "true"}


# ------------------------------------------------------------------------------ benchmarks/gpu.py


def test_gpu_benchmark_without_cuda_says_so_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DEV", None)
    env.pop("SMOKE", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "needs CUDA" in out.stdout


def test_gpu_benchmark_projection_counts_fits_by_stage_keys_without_ray_mlflow_optuna() -> None:
    """The projection of the shipped ablation (216 configs x 9 victims): per victim, 18 distinct
    experts (unlearn_lr x unlearn_epochs x clean_set_size) and 6 auxiliary models (aux_lr x
    clean_set_size) with the stage cache, 216 of each without; none of Ray, MLflow or Optuna is
    imported on the way (a GPU machine may lack them)."""
    env = {**os.environ, "SMOKE": "1", "DEV": "cpu"}
    env.pop("OUT", None)
    out = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "benchmarks" / "gpu.py"), "project"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
    assert "bdx_study" in imported and "torch" in imported
    assert not imported & {"ray", "mlflow", "optuna"}
    line = next(x for x in out.stdout.splitlines() if x.startswith("project: "))
    counts = json.loads(line.removeprefix("project: "))["counts_per_victim"]
    assert (counts["victims"], counts["trials"]) == (9, 216)
    assert counts["components"]["expert"]["fits_with_cache"] == 18
    assert counts["components"]["auxiliary"]["fits_with_cache"] == 6
    assert counts["components"]["expert"]["fits_without_cache"] == 216
