"""What `analyze` says about the search itself: fANOVA importance of the searched settings, and a
multi-objective (NSGA-II) search with its Pareto front."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bdx_study.cli import main as cli
from bdx_study.space import load_space
from bdx_study.trials.launch import launch

from .conftest import tiny_study, write_study


def test_nsga2_search_importance_and_pareto_front(ray_cluster: Any, tmp_path: Path, capsys: Any) -> None:
    doc = tiny_study(
        tmp_path,
        name="multi",
        search__sampler="nsga2",
        search__num_trials=6,
        search__objectives=[
            {"metric": "auroc_correct_only", "aggregate": "worst"},
            {"metric": "clean_acc_drop", "aggregate": "worst"},
            {"metric": "fit_seconds", "aggregate": "mean"},
        ],
    )
    doc["detectors"]["badexpert"]["ensemble_alpha"] = {"dist": "uniform", "low": 1.0, "high": 4.0}
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    result = launch(spec, source=path)
    assert result.num_errors == 0 and result.num_trials == 6
    capsys.readouterr()
    assert cli(["analyze", "--space", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Pareto front of the multi-objective search" in out
    assert "Hyperparameter importance (fANOVA" in out
    folder = spec.study_dir / "analysis"
    front = pd.read_parquet(folder / "pareto.parquet")
    cols = ["worst/auroc_correct_only", "worst/clean_acc_drop", "mean/fit_seconds"]
    assert len(front) == 6 and front["pareto_front"].any()
    vals = front[cols].to_numpy() * np.array([1.0, -1.0, -1.0])  # higher = better on each
    for i, on in enumerate(front["pareto_front"]):
        dominated = np.any(np.all(vals >= vals[i], axis=1) & np.any(vals > vals[i], axis=1))
        assert on == (not dominated)
    importance = pd.read_csv(folder / "importance.csv")
    assert set(importance["param"]) <= {"unlearn_lr", "aux_lr", "ensemble_alpha"} and len(importance) >= 2
    assert np.isclose(importance["importance"].sum(), 1.0, atol=1e-6)
    # how many trials it rests on and how stable it is (bootstrap resamples of the trials)
    assert (importance["trials"] == 6).all() and (importance["importance_sd"] >= 0).all()
    assert "badexpert (6 trials): " in out and " +- " in out
    assert (folder / "pareto.png").stat().st_size > 0 and (folder / "importance.png").stat().st_size > 0


def test_the_papers_two_figures(ray_cluster: Any, tmp_path: Path, capsys: Any) -> None:
    """B's unlearning curve (logged per trial as stepped MLflow metrics, plotted by analyze) and
    AUROC against |D_c| from a study that varies it."""
    from mlflow.tracking import MlflowClient

    doc = tiny_study(tmp_path, name="figures", search__sampler="grid", search__num_trials=None)
    doc["protocol"]["clean_set_size"] = {"dist": "choice", "values": [60, 100]}
    doc["detectors"]["badexpert"] = {
        "unlearn_lr": 5e-4,
        "unlearn_epochs": 3,
        "unlearn_batch_size": 16,
        "unlearn_curve_points": 20,
        "aux_lr": 0.05,
        "aux_epochs": 2,
        "aux_milestones": [1],
    }
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    result = launch(spec, source=path)
    assert result.num_errors == 0 and result.num_trials == 2
    client = MlflowClient(result.tracking_uri)
    run = client.search_runs([result.experiment_id], filter_string="tags.`bdx.kind` = 'trial'", max_results=1)[0]
    victim = spec.victim_configs()[0].name
    history = client.get_metric_history(run.info.run_id, f"{victim}/expert_curve/clean_acc")
    assert len(history) >= 3 and [m.step for m in history] == sorted(m.step for m in history)
    assert history[0].step == 0
    capsys.readouterr()
    assert cli(["analyze", "--space", str(path)]) == 0
    assert "best config per |D_c|" in capsys.readouterr().out
    folder = spec.study_dir / "analysis"
    table = pd.read_csv(folder / "auroc_vs_clean_set_size.csv")
    assert list(table["clean_set_size"]) == [60, 100]
    assert (table["worst_auroc_correct_only"] <= table["mean_auroc_correct_only"]).all()
    for name in ("unlearning_curve.png", "auroc_vs_clean_set_size.png"):
        assert (folder / name).stat().st_size > 0
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "analysis")}
    assert {"analysis/unlearning_curve.png", "analysis/auroc_vs_clean_set_size.png"} <= logged
