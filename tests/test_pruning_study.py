"""Exact pruning in real studies (Ray Tune, MLflow, Optuna, Parquet): the same seeded TPE search
run without and with it proposes the same configs and picks the same defaults, with fewer victim
evaluations; pruned trials are kept as results everywhere a user looks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from bdx_study.cli import main as cli
from bdx_study.selection import is_pruned, select
from bdx_study.space import load_space
from bdx_study.tables import StudyTables
from bdx_study.trials.launch import launch

from .conftest import tiny_study, write_study

VICTIMS = 4


def _doc(tmp_path: Path, name: str, pruning: str) -> dict[str, Any]:
    """12 TPE trials (10 random start-up ones, then 2 TPE proposes), one at a time, on 4 victims;
    the best config refitted once."""
    doc = tiny_study(tmp_path, name=name, search__sampler="tpe", search__num_trials=12, search__max_concurrent=1)
    doc["victims"]["seeds"] = [0, 1]
    doc["victims"]["attacks"] = [{"name": "badnet", "poison_rate": 0.1}, {"name": "blend", "poison_rate": 0.1}]
    doc["search"].update(seed=3, pruning={"kind": pruning}, refit={"top_k": 1, "repeats": 1})
    return doc


def _trials(spec: Any) -> pd.DataFrame:
    return StudyTables(spec.study_dir).read("trials").to_pandas()


def _proposed(df: pd.DataFrame) -> list[str]:
    """The configs the search proposed, in the order the trials ran."""
    first = df.sort_values("started_at").groupby("trial_id", sort=False).first().sort_values("started_at")
    return [json.dumps(json.loads(p), sort_keys=True) for p in first["params"]]


def _picked(spec: Any, df: pd.DataFrame) -> str:
    obj = spec.search.objective
    pick, _ = select(df, obj.metric, obj.aggregate, spec.search.constraint.max_clean_acc_drop)
    return str(df[df["trial_id"] == pick.trial_id]["params"].iloc[0])


def test_exact_pruning_same_search_same_defaults_fewer_fits(ray_cluster: Any, tmp_path: Path, capsys: Any) -> None:
    specs = {}
    for kind in ("none", "exact"):
        path = write_study(tmp_path, _doc(tmp_path, f"p-{kind}", kind), f"{kind}.yaml")
        specs[kind] = load_space(path)
        result = launch(specs[kind], source=path)
        assert result.num_errors == 0 and result.num_trials == 12
    full, pruned_df = _trials(specs["none"]), _trials(specs["exact"])
    assert _proposed(full) == _proposed(pruned_df)  # TPE proposed the same 12 configs, in the same order
    assert _picked(specs["none"], full) == _picked(specs["exact"], pruned_df)  # the same defaults
    pruned = pruned_df[is_pruned(pruned_df)]
    assert not is_pruned(full).any() and pruned["trial_id"].nunique() >= 1
    assert len(pruned_df) < len(full)  # victim evaluations skipped (fits: the studies share a stage cache)
    # a pruned trial keeps the rows of the victims it saw, in order, and its plan
    for _, rows in pruned.groupby("trial_id"):
        assert len(rows) < VICTIMS and sorted(rows["victim_step"]) == list(range(1, len(rows) + 1))
        assert (rows["victims_planned"] == VICTIMS).all()
    complete = pruned_df[~is_pruned(pruned_df)]
    assert (complete.groupby("trial_id").size() == VICTIMS).all()
    refits = StudyTables(specs["exact"].study_dir).read("refits").to_pandas()  # refits never prune
    assert len(refits) == VICTIMS and not is_pruned(refits).any()
    _check_analyze(specs["exact"], tmp_path, pruned, capsys)
    _check_mlflow(specs["exact"], pruned)


def _check_analyze(spec: Any, tmp_path: Path, pruned: pd.DataFrame, capsys: Any) -> None:
    capsys.readouterr()
    assert cli(["analyze", "--space", str(tmp_path / "exact.yaml")]) == 0
    out = capsys.readouterr().out
    n = pruned["trial_id"].nunique()
    assert f"Pruning (exact; exact: none of them could have been picked or refitted): {n} of 12 trials" in out
    study = optuna.load_study(
        study_name=f"{spec.study.name}-badexpert", storage=f"sqlite:///{spec.study_dir}/optuna.db"
    )
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.PRUNED) == n and len(states) == 12
    for t in study.trials:  # progress over victims: one intermediate value per victim seen
        seen = (
            VICTIMS
            if t.state == optuna.trial.TrialState.COMPLETE
            else len(pruned[pruned["trial_id"] == t.user_attrs["trial_id"]])
        )
        assert sorted(t.intermediate_values) == list(range(1, seen + 1))
        if t.state == optuna.trial.TrialState.PRUNED:  # plotted by optuna-dashboard: its last value, as Optuna gives
            assert t.value == t.intermediate_values[seen]
    recipe = (spec.study_dir / "recipe.yaml").read_text()
    assert not any(tid in recipe for tid in pruned["trial_id"].unique())


def _check_mlflow(spec: Any, pruned: pd.DataFrame) -> None:
    client = MlflowClient(spec.tracking.uri)
    exp = client.get_experiment_by_name(spec.experiment_name)
    runs = client.search_runs([exp.experiment_id], "tags.`bdx.kind` = 'trial'", max_results=100)
    by_status = {r.data.tags["bdx.trial_id"]: r for r in runs}
    assert len(by_status) == 12 and all(r.info.status == "FINISHED" for r in runs)  # results, not failures
    stopped = {t for t, r in by_status.items() if r.data.tags.get("bdx.status") == "pruned"}
    assert stopped == set(pruned["trial_id"])
    for tid in stopped:
        run = by_status[tid]
        rows = pruned[pruned["trial_id"] == tid]
        assert run.data.tags["bdx.victims"] == f"{len(rows)}/{VICTIMS}"
        assert f" pruned {len(rows)}/{VICTIMS} badexpert-{tid}" in run.info.run_name, run.info.run_name
        last = rows.sort_values("victim_step")["victim_name"].iloc[-1]
        assert run.data.tags["bdx.stopped_at"] == last
        history = client.get_metric_history(run.info.run_id, "running/objective")
        assert sorted(m.step for m in history) == list(range(1, len(rows) + 1))
