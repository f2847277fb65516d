"""The stage cache: each fitted component is fitted once per distinct set of the parameters it
depends on, found again by any process, verified by hash, refitted when corrupt; scoring-only
knobs cost no refit; concurrent trials wait for one fit instead of fitting twice."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bdx_study.detectors import create_detector
from bdx_study.protocol import ProtocolConfig
from bdx_study.stages import DetectorRun, LoadedVictim, StageStore, count_passes, run_detector

from .test_detectors import CONTRACT_PARAMS

CPU = torch.device("cpu")
PROTOCOL = ProtocolConfig(clean_set_size=300, calibration_fraction=0.5, target_fpr=0.1)
BADEXPERT = CONTRACT_PARAMS["badexpert"]


def _run(planted: dict[str, Any], store: StageStore, name: str = "badexpert", **params: Any) -> DetectorRun:
    v = planted["patch"]
    return run_detector(
        store,
        create_detector(name, {**CONTRACT_PARAMS.get(name, {}), **params}),
        PROTOCOL,
        LoadedVictim(v["config"].key, v["model"], planted["splits"], v["attack"], planted["data"].layout()),
        device=CPU,
    )


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_dir() and not p.name.startswith(".") and p.name != "model")


def test_scoring_knobs_reuse_fits(planted: dict[str, Any], tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    first = _run(planted, store, ensemble_alpha=1.0)
    assert first.fitted_now == 2 and store.fits == 2
    again = _run(planted, store, ensemble_alpha=4.0, ensemble_beta=0.3)  # scoring only
    assert again.fitted_now == 0 and store.fits == 2
    assert again.stage_keys == first.stage_keys
    assert not np.array_equal(again.evaluation.samples["score"], first.evaluation.samples["score"])
    # the same scores as a run without any cache
    bare = _run(planted, StageStore(None), ensemble_alpha=4.0, ensemble_beta=0.3)
    np.testing.assert_array_equal(again.evaluation.samples["score"], bare.evaluation.samples["score"])
    assert again.evaluation.threshold == bare.evaluation.threshold
    # a new auxiliary lr refits M' only
    aux = _run(planted, store, aux_lr=0.05)
    assert aux.fitted_now == 1 and store.fits == 3
    assert aux.stage_keys["expert"] == first.stage_keys["expert"]
    assert aux.stage_keys["auxiliary"] != first.stage_keys["auxiliary"]
    assert len(_entries(tmp_path)) == 3


def test_found_by_another_process_and_verified(planted: dict[str, Any], tmp_path: Path) -> None:
    first = _run(planted, StageStore(tmp_path))
    other = StageStore(tmp_path)  # nothing in memory: read from disk
    again = _run(planted, other)
    assert again.fitted_now == 0 and other.fits == 0
    np.testing.assert_array_equal(again.evaluation.samples["score"], first.evaluation.samples["score"])
    meta = json.loads(next(tmp_path.glob("*/badexpert-expert-*/stage.json")).read_text())
    assert meta["params"]["unlearn_lr"] == BADEXPERT["unlearn_lr"] and "ensemble_alpha" not in meta["params"]
    assert meta["clean_set"] == PROTOCOL.clean_set_identity()

    # a corrupt state is detected by its hash and fitted again, to the same result
    state = next(tmp_path.glob("*/badexpert-expert-*/state.safetensors"))
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")
    fresh = StageStore(tmp_path)
    rerun = _run(planted, fresh)
    assert rerun.fitted_now == 1 and fresh.fits == 1
    np.testing.assert_array_equal(rerun.evaluation.samples["score"], first.evaluation.samples["score"])

    # corrupt outputs are computed again (no refit)
    outputs = next(tmp_path.glob("*/badexpert-auxiliary-*/outputs-*.safetensors"))
    outputs.write_bytes(b"garbage")
    fresh = StageStore(tmp_path)
    with count_passes() as cost:
        rerun = _run(planted, fresh)
    assert rerun.fitted_now == 0 and cost.forward > 0
    np.testing.assert_array_equal(rerun.evaluation.samples["score"], first.evaluation.samples["score"])


def test_model_predictions_once_per_victim(planted: dict[str, Any], tmp_path: Path) -> None:
    _run(planted, StageStore(tmp_path), "scale_up")
    with count_passes() as cost:
        run = _run(planted, StageStore(tmp_path), "scale_up", standardize="class")
    assert cost.forward == 0  # M's predictions and SCALE-UP's outputs both came from the cache
    assert run.fitted_now == 0
    assert run.costs["forward_passes_per_input"] == 1 + 5  # M's own forward + the 5 default scales


def test_count_passes_counts_forward_and_backward(planted: dict[str, Any]) -> None:
    model = planted["patch"]["model"]
    x = torch.rand(7, 1, 16, 16)
    with count_passes() as cost:
        model(x)
        model(x[:3]).sum().backward()
    assert cost.forward == 10 and cost.backward == 3
    model.zero_grad(set_to_none=True)


def _fit_in_child(args: tuple[str, dict[str, Any]]) -> int:
    root, planted = args
    torch.set_num_threads(1)
    return _run(planted, StageStore(root)).fitted_now


def test_concurrent_trials_fit_once(planted: dict[str, Any], tmp_path: Path) -> None:
    """Two processes need the same components at once: one fits, the other waits and loads."""
    ctx = multiprocessing.get_context("fork")
    # close + join, not the context manager's terminate: a SIGTERM handler inherited from an
    # earlier test's Ray (ray.init installs one) can keep a terminated fork worker alive
    pool = ctx.Pool(2)
    try:
        fitted = pool.map(_fit_in_child, [(str(tmp_path), planted)] * 2)
    finally:
        pool.close()
        pool.join()
    assert sum(fitted) == 2  # each of the two components fitted once, by one of the two
    assert len(_entries(tmp_path)) == 2


def test_the_worker_cache_builds_each_value_once_per_identity(tmp_path: Path) -> None:
    """A worker keeps what trials share (splits by their data config, stage stores by folder) and
    forgets one kind on request."""
    from bdx_study.configs import AttackSpec, DataConfig, VictimConfig
    from bdx_study.trials.trainable import WorkerCache

    cache = WorkerCache()
    store = cache.stage_store(None)
    assert cache.stage_store(None) is store and cache.stage_store(tmp_path) is not store
    data = DataConfig(reserve_size=120, eval_size=200, train_size=400)
    cfg = VictimConfig(dataset="digits", architecture="small_cnn", attack=AttackSpec(name="badnet"), data=data)
    splits = cache.splits(cfg)
    assert cache.splits(cfg.model_copy(update={"seed": 1})) is splits  # another victim on the same data
    other = cache.splits(cfg.model_copy(update={"data": data.model_copy(update={"split_seed": 1})}))
    assert other is not splits and not torch.equal(other.reserve.y, splits.reserve.y)
    cache.clear("stage_store")
    assert cache.stage_store(None) is not store and cache.splits(cfg) is splits
