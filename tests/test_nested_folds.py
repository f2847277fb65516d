"""Strictly held-out validation: with ``search.nested_folds`` every held-out group gets a search of
its own that never sees that group's victims; the pick is measured on them afterwards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from bdx_study.cli import main as cli
from bdx_study.folds import fold_spec, held_out_victims
from bdx_study.selection import select
from bdx_study.space import load_space
from bdx_study.tables import StudyTables
from bdx_study.trials.launch import launch

from .conftest import tiny_study, write_study


def test_a_folds_search_never_sees_its_held_out_victims(ray_cluster: Any, tmp_path: Path, capsys: Any) -> None:
    doc = tiny_study(
        tmp_path,
        name="nested",
        victims__attacks=[{"name": "badnet", "poison_rate": 0.1}, {"name": "blend", "poison_rate": 0.1}],
        search__num_trials=2,
        search__sampler="tpe",
        search__nested_folds=["attack"],
    )
    path = write_study(tmp_path, doc)
    spec = load_space(path)
    result = launch(spec, source=path)
    assert result.num_errors == 0
    assert "2 nested fold(s)" in capsys.readouterr().out
    obj = spec.search.objective
    for held in ("badnet", "blend"):
        fs = fold_spec(spec, "attack", held)
        held_ids = {v.key for v in held_out_victims(spec, "attack", held)}
        fold_ids = {v.key for v in fs.victim_configs()}
        assert held_ids and fold_ids and not held_ids & fold_ids
        tables = StudyTables(fs.study_dir)
        trials = tables.read("trials").to_pandas()
        # the fold's search: every row, every per-sample score and every reported result is of
        # the fold's own victims only
        assert set(trials["victim_id"]) == fold_ids
        assert set(tables.read("scores").to_pandas()["victim_id"]) == fold_ids
        held_names = {v.name for v in held_out_victims(spec, "attack", held)}
        for report in (fs.study_dir / "artifacts").glob("*/report.json"):
            if report.parent.name.startswith("heldout-"):
                continue
            assert not any(k.split("/")[0] in held_names for k in json.loads(report.read_text()))
        # its pick, by the selection rule on the fold's trials, measured on the held-out victims
        pick, _ = select(trials, obj.metric, obj.aggregate, spec.search.constraint.max_clean_acc_drop)
        heldout = tables.read("heldout").to_pandas()
        assert set(heldout["trial_id"]) == {pick.trial_id} and set(heldout["victim_id"]) == held_ids
    # the folds' trials are tracked, tagged with their fold
    runs = MlflowClient(result.tracking_uri).search_runs(
        [result.experiment_id], filter_string="tags.`bdx.kind` = 'trial'", max_results=100
    )
    assert sorted(r.data.tags.get("bdx.fold", "") for r in runs).count("") == 2
    assert {r.data.tags.get("bdx.fold") for r in runs} >= {"nested.fold-attack-badnet", "nested.fold-attack-blend"}

    assert cli(["analyze", "--space", str(path)]) == 0
    out = capsys.readouterr().out
    assert "strictly held out: nested" in out and "NOT strictly held out: TPE" in out
    recipe = yaml.safe_load((spec.study_dir / "recipe.yaml").read_text())
    folds = recipe["detectors"]["badexpert"]["evidence"]["held_out"]["folds"]
    nested = [f for f in folds if f["why"].startswith("nested")]
    assert {f["held_out"] for f in nested} == {"attack=badnet", "attack=blend"}
    assert all(f["strictly_held_out"] for f in nested)
    assert not any(f["strictly_held_out"] for f in folds if not f["why"].startswith("nested"))
    for f in nested:
        lo, hi = f["held_out_ci95"]
        assert lo <= f["held_out_worst_auroc_correct_only"] <= hi

    # a resume keeps the folds that are done: nothing is searched again
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "studies").glob("nested.fold-*/tables/parts/*/*")}
    again = launch(spec, source=path, resume=True)
    assert again.num_errors == 0
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "studies").glob("nested.fold-*/tables/parts/*/*")}
    assert after == before
