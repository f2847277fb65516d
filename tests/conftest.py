"""Shared fixtures: one local Ray cluster per test session (2 CPUs and one *logical* GPU, so
fractional-GPU scheduling is exercised on CPU-only machines), and study files written to tmp."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TUNE_DISABLE_AUTO_INIT", "1")


SLOW_FIXTURES = frozenset({"ray_cluster"})  # fixtures that start Ray (or a server): their tests are `slow`


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts Ray through a fixture `slow` (modules that start clusters or
    servers themselves carry ``pytestmark = pytest.mark.slow``)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_cluster() -> Any:
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, object_store_memory=200 * 2**20, logging_level="WARNING")
    yield ray
    ray.shutdown()


def tiny_study(tmp: Path, name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A study that runs in seconds: digits, small CNN, 3-epoch victims on 400 images."""
    doc: dict[str, Any] = {
        "study": {"name": name, "storage": str(tmp / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": f"exp-{name}"},
        "data": {"reserve_size": 120, "eval_size": 200, "train_size": 400},
        "victims": {
            "datasets": ["digits"],
            "architectures": ["small_cnn"],
            "attacks": [{"name": "badnet", "poison_rate": 0.1}],
            "seeds": [0],
            "training": {"epochs": 4, "lr": 2.0e-3},
        },
        "protocol": {"clean_set_size": 100, "target_fpr": 0.1},
        "detectors": {
            "badexpert": {
                "unlearn_lr": {"dist": "loguniform", "low": 1.0e-4, "high": 1.0e-3},
                "aux_lr": {"dist": "choice", "values": [0.05, 0.1]},
                "unlearn_batch_size": 32,
                "aux_epochs": 2,
                "aux_milestones": [1],
            }
        },
        "search": {"sampler": "random", "num_trials": 3, "max_concurrent": 2, "seed": 0},
        "resources": {"cpu": 1, "gpu": 0},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            doc[section][field] = value
        else:
            doc[section] = value
    return doc


def write_study(tmp: Path, doc: dict[str, Any], filename: str = "study.yaml") -> Path:
    path = tmp / filename
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="session")
def planted() -> dict[str, Any]:
    """Two tiny digits victims with planted triggers (a BadNet patch and a noise Blend; small
    CNN, 400 training images at 10% poison, a few seconds each), trained through the real victim
    code, with their splits: what the detector contract tests score."""
    import torch

    from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimConfig, train_victim

    torch.set_num_threads(1)
    data = DataConfig(reserve_size=300, eval_size=200, train_size=400)
    out: dict[str, Any] = {"data": data, "splits": data.splits("digits")}
    for kind, attack in (
        ("patch", AttackSpec(name="badnet")),
        ("blend", AttackSpec(name="blend", params={"alpha": 0.2})),
    ):
        params = {**attack.params, "poison_rate": 0.1}
        cfg = VictimConfig(
            dataset="digits",
            architecture="small_cnn",
            attack=attack.model_copy(update={"params": params}),
            training=TrainingConfig(epochs=6, lr=2e-3),
            data=data,
        )
        model, metrics, attack_obj = train_victim(cfg, device=torch.device("cpu"))
        out[kind] = {"config": cfg, "model": model.eval(), "attack": attack_obj, "metrics": metrics}
    return out
