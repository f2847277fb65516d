"""A killed driver resumes without re-running finished trials or retraining victims; fractional
GPU trials pack onto one (logical) GPU and run on the CPU when no CUDA device exists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from bdx_study.space import load_space
from bdx_study.trials.launch import launch

from .conftest import tiny_study, write_study


@pytest.mark.slow
def test_killed_driver_resumes_without_rerunning(ray_cluster: Any, tmp_path: Path) -> None:
    n = 5
    doc = tiny_study(tmp_path, name="killed", search__num_trials=n, search__max_concurrent=1)
    doc["victims"]["seeds"] = [0, 1]  # two victims: exact pruning (the default) can stop a trial after one
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    study_dir = spec.storage_root() / "studies" / "killed"
    parts = study_dir / "tables" / "parts" / "trials"
    env = dict(os.environ)
    env.pop("TUNE_DISABLE_AUTO_INIT", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bdx_study.cli", "launch", "--space", str(path)],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 2:
            assert proc.poll() is None, "the study ended before it could be interrupted"
            time.sleep(0.2)
        assert len(list(parts.glob("*.parquet"))) >= 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert 2 <= len(finished) < n
    victims = spec.storage_root() / "victims"
    weights = {p: p.stat().st_mtime_ns for p in victims.glob("*/model.safetensors")}
    assert len(weights) == 2

    result = launch(spec, source=path, resume=True)
    assert result.num_errors == 0
    assert result.num_trials == n
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    for name, mtime in finished.items():  # finished trials were kept, not re-run
        assert after[name] == mtime
    assert len(after) >= n
    assert {p: p.stat().st_mtime_ns for p in victims.glob("*/model.safetensors")} == weights  # not retrained
    table = pq.read_table(study_dir / "tables" / "trials.parquet").to_pandas()
    assert not table.duplicated(["trial_id", "victim_id"]).any()
    # finished and pruned trials alike kept once: a complete trial has both victims, a pruned one fewer
    for _, rows in table.groupby("trial_id"):
        assert rows["pruned"].nunique() == 1 and len(rows) == (1 if rows["pruned"].iloc[0] else 2)
    runs = MlflowClient(result.tracking_uri).search_runs(
        [result.experiment_id], filter_string="tags.`bdx.kind` = 'trial'", max_results=100
    )
    ids = [r.data.tags["bdx.trial_id"] for r in runs]
    assert len(ids) == len(set(ids))  # no duplicate MLflow run for a resumed trial
    assert {p.removesuffix(".parquet") for p in after} <= set(ids)


@pytest.mark.slow
def test_four_quarter_gpu_trials_pack_on_one_gpu(ray_cluster: Any, tmp_path: Path) -> None:
    """Scheduling side only (no CUDA here): 4 trials asking for 0.25 GPU each must all run at
    once on a cluster with one logical GPU; each waits at a barrier until all four are in."""
    import ray
    from ray import tune

    from bdx_study.space import parse_space
    from bdx_study.trials.tuner import trial_resources

    spec = parse_space(tiny_study(tmp_path, resources={"cpu": 0.5, "gpu": 0.25}), "inline")
    res = trial_resources(spec)
    assert res == {"cpu": 0.5, "gpu": 0.25}

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self) -> None:
            self.n = 0

        def arrive(self) -> int:
            self.n += 1
            return self.n

        def count(self) -> int:
            return self.n

    barrier = Barrier.options(name="bdx-test-barrier").remote()  # type: ignore[attr-defined]

    def trial(config: dict[str, Any]) -> None:
        b = ray.get_actor("bdx-test-barrier")
        ray.get(b.arrive.remote())
        deadline = time.time() + 60
        while ray.get(b.count.remote()) < 4 and time.time() < deadline:
            time.sleep(0.1)
        from bdx_study.training import pick_device

        tune.report(
            {
                "together": float(ray.get(b.count.remote()) >= 4),
                "gpus": float(len(ray.get_gpu_ids())),
                "cpu_device": float(pick_device(prefer_gpu=True).type == "cpu"),
            }
        )

    grid = tune.Tuner(
        tune.with_resources(trial, res),
        tune_config=tune.TuneConfig(num_samples=4, max_concurrent_trials=4),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="pack", verbose=0),
    ).fit()
    assert grid.num_errors == 0
    for r in grid:
        assert r.metrics["together"] == 1.0  # all four ran concurrently on the single GPU
        assert r.metrics["gpus"] == 1.0  # each saw the one GPU id
        assert r.metrics["cpu_device"] == 1.0  # and fell back to the CPU: no CUDA here
    ray.kill(barrier)


@pytest.mark.slow
def test_gpu_study_runs_on_cpu_without_cuda(ray_cluster: Any, tmp_path: Path) -> None:
    doc = tiny_study(tmp_path, name="gpu", search__num_trials=2, resources={"cpu": 0.5, "gpu": 0.25})
    path = write_study(tmp_path, doc)
    result = launch(load_space(path), source=path)
    assert result.num_errors == 0
    table = pq.read_table(result.study_dir / "tables" / "trials.parquet").to_pandas()
    assert set(table["device"]) == {"cpu"}
    assert set(table["gpu_ids"]) == {"0"}


@pytest.mark.slow
def test_tracking_outage_then_resume_logs_everything(ray_cluster: Any, tmp_path: Path, capsys: Any) -> None:
    """MLflow unreachable at launch: trials still finish into Parquet with a warning; a resume
    once the store is back logs every finished trial exactly once."""
    store = tmp_path / "store"
    store.write_text("")  # a file where the store's folder should be: MLflow cannot reach it
    doc = tiny_study(tmp_path, name="outage", search__num_trials=2)
    doc["tracking"]["uri"] = f"sqlite:///{store / 'mlflow.db'}"
    path = write_study(tmp_path, doc)
    from bdx_study.space import SpaceError

    with pytest.raises(SpaceError, match=r"tracking\.uri: MLflow at .* cannot be reached.*tracking\.required"):
        launch(load_space(path), source=path)  # the default: an unreachable store is refused at once
    assert not (tmp_path / "runs" / "studies" / "outage").exists()  # nothing was written
    doc["tracking"]["required"] = False
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    first = launch(spec, source=path)
    assert first.num_errors == 0 and first.parent_run_id is None
    assert "unavailable" in capsys.readouterr().out
    parts = spec.study_dir / "tables" / "parts" / "trials"
    assert len(list(parts.glob("*.parquet"))) == 2

    store.unlink()
    store.mkdir()  # the store is back
    again = launch(spec, source=path, resume=True)
    assert "logged 2 finished trial(s) MLflow was missing" in capsys.readouterr().out
    runs = MlflowClient(again.tracking_uri).search_runs(
        [again.experiment_id], filter_string="tags.`bdx.kind` = 'trial'", max_results=100
    )
    assert sorted(r.data.tags["bdx.trial_id"] for r in runs) == sorted(p.stem for p in parts.glob("*.parquet"))
    assert all(r.info.status == "FINISHED" and "worst/auroc_correct_only" in r.data.metrics for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == again.parent_run_id for r in runs)


@pytest.mark.slow
def test_resume_refuses_an_edited_study_file(ray_cluster: Any, tmp_path: Path) -> None:
    from bdx_study.space import SpaceError

    doc = tiny_study(tmp_path, name="edited", search__num_trials=1)
    path = write_study(tmp_path, doc)
    launch(load_space(path), source=path)
    doc["detectors"]["badexpert"]["aux_epochs"] = 3
    edited = write_study(tmp_path, doc, "edited.yaml")
    import pytest

    with pytest.raises(SpaceError, match="differs from the one this study was launched with in detectors"):
        launch(load_space(edited), source=edited, resume=True)
