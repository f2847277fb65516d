"""A real tiny comparison study end to end (BaDExpert, STRIP, SCALE-UP and a committee of BaDExpert
and STRIP on the same victims): local Ray, SQLite MLflow store, Optuna, Parquet; then analyze,
export, detect for every family, and the MLflow pyfunc model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from bdx_study import Detector
from bdx_study.cli import main as cli
from bdx_study.space import load_space
from bdx_study.trials.launch import launch

from .conftest import tiny_study, write_study

FAMILIES = ("badexpert", "strip", "scale_up", "committee")
N_TRIALS = 7  # badexpert 3, strip 1 (nothing searched), scale_up 1, committee 2


@pytest.fixture(scope="module")
def study(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("e2e")
    doc = tiny_study(
        tmp,
        victims__attacks=[{"name": "badnet", "poison_rate": 0.1}, {"name": "none"}],
        search__num_trials=3,
        search__refit={"top_k": 1, "repeats": 2},
        search__pruning={"kind": "none"},  # these tests read whole trials; pruned ones: test_pruning_study.py
    )
    doc["detectors"]["strip"] = {"num_images": 8}
    doc["detectors"]["scale_up"] = {"scales": [3, 7]}
    doc["detectors"]["committee"] = {  # BaDExpert's unlearning lr searched inside the committee
        "members": {"badexpert": dict(doc["detectors"]["badexpert"], aux_lr=0.1), "strip": {"num_images": 8}},
        "combine": "min_p",
    }
    doc["search"]["num_trials"] = {"badexpert": 3, "scale_up": 1, "committee": 2}
    path = write_study(tmp, doc)
    spec = load_space(path)
    result = launch(spec, source=path)
    return {"tmp": tmp, "path": path, "spec": spec, "result": result, "doc": doc}


def test_study_finishes(study: dict[str, Any]) -> None:
    r = study["result"]
    assert r.num_errors == 0
    assert r.num_trials == N_TRIALS
    assert r.best["objective"] is not None


def test_mlflow_holds_study_trials_and_victims(study: dict[str, Any]) -> None:
    r = study["result"]
    client = MlflowClient(r.tracking_uri)
    assert r.tracking_uri.startswith("sqlite:////")
    runs = client.search_runs([r.experiment_id], max_results=100)
    by_kind: dict[str, list[Any]] = {}
    for run in runs:
        by_kind.setdefault(run.data.tags.get("bdx.kind", "?"), []).append(run)
    assert len(by_kind["study"]) == 1
    assert len(by_kind["victim"]) == 2
    trials = by_kind["trial"]
    assert len(trials) == N_TRIALS
    assert len({t.data.tags["bdx.trial_id"] for t in trials}) == N_TRIALS
    for t in trials + by_kind["victim"]:
        assert t.data.tags["mlflow.parentRunId"] == r.parent_run_id
    families = [t.data.tags["bdx.detector"] for t in trials]
    assert sorted(families) == sorted(["badexpert"] * 3 + ["strip", "scale_up"] + ["committee"] * 2)
    for t in trials:
        assert t.info.status == "FINISHED"
        assert t.data.params["detector"] == t.data.tags["bdx.detector"]
        # params are named exactly as in the YAML (searched and fixed), protocol settings included
        assert {"clean_set_size", "target_fpr", "seed"} <= set(t.data.params)
        if t.data.tags["bdx.detector"] == "badexpert":
            assert {"unlearn_lr", "aux_lr", "unlearn_batch_size"} <= set(t.data.params)
            assert float(t.data.params["unlearn_lr"]) > 0
        if t.data.tags["bdx.detector"] == "committee":  # each member's settings under its own name
            assert {"members.badexpert.unlearn_lr", "members.strip.num_images", "combine"} <= set(t.data.params)
        m = t.data.metrics
        assert 0.0 <= m["worst/auroc_correct_only"] <= 1.0
        assert "mean/auroc_all_inputs" in m
        assert m["mean/forward_passes_per_input"] >= 1
        assert any(k.endswith("/auroc_correct_only") and "badnet" in k for k in m)
        artifacts = {a.path for a in client.list_artifacts(t.info.run_id, "plots")}
        artifacts |= {a.path for a in client.list_artifacts(t.info.run_id, "scores")}
        assert "plots/trial.png" in artifacts
        assert any(a.startswith("scores/") and a.endswith(".parquet") for a in artifacts)
    victim_metrics = [v.data.metrics for v in by_kind["victim"]]
    assert all("clean_acc" in m for m in victim_metrics)


def test_parquet_tables(study: dict[str, Any]) -> None:
    tables = study["result"].study_dir / "tables"
    trials = pq.read_table(tables / "trials.parquet").to_pandas()
    assert len(trials) == N_TRIALS * 2  # one row per trial x victim
    assert not trials.duplicated(["trial_id", "victim_id"]).any()
    assert sorted(trials.groupby("trial_id")["detector"].first().value_counts().items()) == [
        ("badexpert", 3),
        ("committee", 2),
        ("scale_up", 1),
        ("strip", 1),
    ]
    for col in [
        "detector",
        "params",
        "stage_keys",
        "forward_passes_per_input",
        "score_seconds_per_input",
        "unlearn_lr",
        "num_images",
        "scales",
        "aux_lr",
        "clean_set_size",
        "auroc_correct_only",
        "auroc_all_inputs",
        "tpr_at_threshold_correct_only",
        "tpr_at_1pct_fpr_correct_only",
        "tpr_at_5pct_fpr_all_inputs",
        "fpr_at_threshold_correct_only",
        "clean_acc_before",
        "clean_acc_after",
        "attack_success_before",
        "attack_success_after",
        "threshold",
        "attack",
        "victim_seed",
        "objective",
    ]:
        assert col in trials.columns, col
    backdoored = trials[trials.attack == "badnet"]
    assert backdoored["auroc_correct_only"].between(0, 1).all()
    clean = trials[trials.attack == "none"]
    assert clean["auroc_correct_only"].isna().all()  # no triggered inputs: undefined, not faked
    scores = pq.read_table(tables / "scores.parquet").to_pandas()
    assert set(scores["split"]) == {"calibration", "reference", "selection", "evaluation"}
    assert set(scores[scores.split == "reference"]["detector"]) == {"committee"}  # its clean scales' images
    assert not scores[scores.split.isin(["calibration", "reference"])]["triggered"].any()
    assert scores.groupby("trial_id").ngroups == N_TRIALS
    assert set(scores["detector"]) == set(FAMILIES)
    # the per-sample table reproduces the per-victim metrics, each from its own split's rows
    # (AUROC from continuous scores): evaluation -> reported columns, selection -> selection_*
    from sklearn.metrics import roc_auc_score

    for family in FAMILIES:
        row = backdoored[backdoored.detector == family].iloc[0]
        s = scores[(scores.trial_id == row.trial_id) & (scores.victim_id == row.victim_id)]
        for split, column in (("evaluation", "auroc_correct_only"), ("selection", "selection_auroc_correct_only")):
            part = s[s.split == split]
            neg = part[~part.triggered & (part.pred == part.label)].score
            pos = part[part.triggered & (part.pred == part.attack_label)].score
            y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
            assert roc_auc_score(y, np.r_[neg, pos]) == pytest.approx(row[column])
        # the threshold was fitted on calibration rows: at most target_fpr of correct ones lie above it
        cal = s[(s.split == "calibration") & (s.pred == s.label)]
        assert (cal.score > row.threshold).mean() <= row.target_fpr + 0.02
    # the search optimized the selection split, never the evaluation split
    per_trial = trials.groupby("trial_id")
    assert np.allclose(per_trial["objective"].first(), per_trial["selection_auroc_correct_only"].min())


@pytest.mark.slow
def test_victims_trained_once_across_trials_and_studies(study: dict[str, Any], capsys: Any) -> None:
    spec = study["spec"]
    cache = spec.storage_root() / "victims"
    entries = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert len(entries) == 2  # two victims, however many trials used them
    mtimes = {p: (p / "model.safetensors").stat().st_mtime_ns for p in entries}
    doc = dict(study["doc"], study=dict(study["doc"]["study"], name="tiny-again"))
    doc["search"] = dict(doc["search"], num_trials=1)
    path = write_study(study["tmp"], doc, "again.yaml")
    again = launch(load_space(path), source=path)
    assert again.num_errors == 0
    out = capsys.readouterr().out
    assert "all 2 victim(s) found in the cache" in out
    assert {p: (p / "model.safetensors").stat().st_mtime_ns for p in entries} == mtimes


def test_analyze_export_detect(study: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    path = str(study["path"])
    assert cli(["analyze", "--space", path]) == 0
    out = capsys.readouterr().out
    assert "Comparison" in out and "unlearn_lr" in out
    for family in FAMILIES:
        assert f"== {family}: trial" in out  # each family's robust defaults, worst and mean on evaluation
    assert "95% bootstrap CI over evaluation inputs" in out and "over 3 fits (fresh seeds and D_c draws)" in out
    study_dir = study["result"].study_dir
    import yaml

    doc = yaml.safe_load((study_dir / "recipe.yaml").read_text())
    # the default detector: the selection rule across families, printed with the board that chose it
    board = doc["default_detector_chosen_by"]["board"]
    assert doc["default_detector"] == board[0]["detector"] and {r["detector"] for r in board} == set(FAMILIES)
    best = [r for r in board if r["feasible"]] or board
    assert board[0]["selection_worst_auroc_correct_only"] == max(r["selection_worst_auroc_correct_only"] for r in best)
    assert f"Default detector: {board[0]['detector']}" in out
    assert set(doc["detectors"]) == set(FAMILIES)
    trials = pq.read_table(study_dir / "tables" / "trials.parquet").to_pandas()
    from bdx_study.tables import StudyTables

    refits = StudyTables(study_dir).read("refits").to_pandas()
    # the recipe counts what it was made from: export refuses it once the tables hold more
    counts = {"trials": N_TRIALS, "refits": refits["trial_id"].nunique(), "heldout": 0}
    assert doc["made_from"] == StudyTables(study_dir).counts() == counts
    for family, entry in doc["detectors"].items():
        # the recipe carries the chosen trial's config exactly (export uses that very config)
        row = trials[trials.trial_id == entry["selection"]["chosen_trial"]].iloc[0]
        assert row.detector == family
        assert entry["defaults"] == json.loads(row.params)
        assert entry["protocol"]["clean_set_size"] == row.clean_set_size
        assert "held_out" in entry["evidence"]
        # refit uncertainty: the top config fitted twice more with fresh seeds and D_c draws
        mine = refits[refits.refit_of == row.trial_id]
        assert sorted(mine.refit_index.unique()) == [1, 2] and len(mine) == 2 * 2  # 2 refits x 2 victims
        assert sorted(json.loads(p)["seed"] for p in mine.drop_duplicates("trial_id").params) == [
            json.loads(row.params)["seed"] + 1,
            json.loads(row.params)["seed"] + 2,
        ]
        assert sorted(mine.drop_duplicates("trial_id").clean_set_seed) == [1, 2]
        unc = entry["evidence"]["uncertainty"]
        over = unc["worst_auroc_correct_only_over_fits"]
        assert over["fits"] == 3 and over["min"] <= over["mean"] <= over["max"]
        lo, hi = unc["worst_auroc_correct_only_bootstrap_95ci_over_evaluation_inputs"]
        assert lo <= entry["evidence"]["evaluation_worst_auroc_correct_only"] <= hi
        policy = entry["seed_policy"]
        assert policy["fit"] in {row.trial_id, *mine.trial_id}  # the median fit, not the luckiest
    comparison = pq.read_table(study_dir / "analysis" / "comparison.parquet").to_pandas()
    assert set(comparison["detector"]) == set(FAMILIES)
    assert len(comparison) == len(FAMILIES) * 2  # family x victim
    assert (study_dir / "analysis" / "comparison.csv").is_file()
    assert (study_dir / "analysis" / "comparison_roc.png").stat().st_size > 0
    client = MlflowClient(study["result"].tracking_uri)
    logged = {a.path for a in client.list_artifacts(study["result"].parent_run_id, "analysis")}
    assert {"analysis/comparison.csv", "analysis/recipe.yaml", "analysis/comparison_roc.png"} <= logged

    spec = study["spec"]
    victim = next(v for v in spec.victim_configs() if v.attack.name == "badnet")
    splits = victim.data.splits(victim.dataset)
    attack = victim.build_attack()
    triggered = attack.apply_trigger(splits.evaluation.x[attack.counts_toward_asr(splits.evaluation.y)])
    np.save(tmp_path / "trig.npy", triggered.numpy())
    for family in FAMILIES:
        bundle = tmp_path / f"bundle-{family}"
        assert cli(["export", "--space", path, "--detector", family, "--out", str(bundle)]) == 0
        det = Detector.load(bundle)
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert manifest["detector"] == family
        assert {k: v for k, v in manifest["params"].items() if k != "seed"} == {
            k: v for k, v in doc["detectors"][family]["defaults"].items() if k != "seed"
        }
        assert manifest["provenance"]["study"] == "tiny"
        assert manifest["provenance"]["mlflow"]["model_uri"]
        # the bundle holds the components the seed policy's fit was scored with (from the stage cache)
        assert manifest["provenance"]["components_from_stage_cache"]
        policy = doc["detectors"][family]["seed_policy"]
        assert manifest["params"]["seed"] == policy["seed"]
        assert manifest["protocol"]["clean_set_seed"] == policy["clean_set_seed"]
        source = trials if policy["fit"] in set(trials.trial_id) else refits
        row = source[(source.trial_id == policy["fit"]) & (source.victim_id == victim.key)].iloc[0]
        assert manifest["threshold"] == pytest.approx(row.threshold)
        assert manifest["provenance"]["stage_keys"] == json.loads(row.stage_keys)

        out_json = tmp_path / f"out-{family}.json"
        args = ["detect", "--detector", str(bundle), "--input", str(tmp_path / "trig.npy"), "--output", str(out_json)]
        assert cli(args) == 0
        res = json.loads(out_json.read_text())["results"]
        assert len(res) == len(triggered)
        direct = det.detect(triggered.numpy())
        assert [r["flagged"] for r in res] == direct.flagged.tolist()
        # the bundle scores the evaluation split's triggered inputs as that fit did
        kind = "scores" if source is trials else "refit_scores"
        scores = StudyTables(study_dir).read_part(kind, policy["fit"]).to_pandas()
        s = scores[scores.victim_id == victim.key]
        s = s[(s.split == "evaluation") & s.triggered].sort_values("sample_index")
        np.testing.assert_allclose(direct.score, s.score.to_numpy(), rtol=1e-5, atol=1e-6)

    # the MLflow pyfunc model serves the same scores as the bundle
    import mlflow

    manifest = json.loads((tmp_path / "bundle-badexpert" / "manifest.json").read_text())
    model = mlflow.pyfunc.load_model(manifest["provenance"]["mlflow"]["model_uri"])
    served = model.predict(triggered.numpy()[:16])
    direct = Detector.load(tmp_path / "bundle-badexpert").detect(triggered.numpy()[:16])
    np.testing.assert_allclose(served["score"].to_numpy(), direct.score, rtol=1e-6)


@pytest.mark.slow
def test_resume_of_finished_study_reruns_nothing(study: dict[str, Any]) -> None:
    spec = study["spec"]
    parts = study["result"].study_dir / "tables" / "parts" / "trials"
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    again = launch(spec, source=study["path"], resume=True)
    assert again.num_errors == 0
    assert {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")} == before


@pytest.mark.slow
def test_existing_study_without_resume_is_refused(study: dict[str, Any]) -> None:
    from bdx_study.space import SpaceError

    with pytest.raises(SpaceError, match="--resume"):
        launch(study["spec"], source=study["path"])


def _analyzed(study: dict[str, Any]) -> str:
    path = str(study["path"])
    if not (study["result"].study_dir / "recipe.yaml").is_file():
        assert cli(["analyze", "--space", path]) == 0
    return path


def test_export_and_detect_never_overwrite_what_they_did_not_write(study: dict[str, Any], tmp_path: Path) -> None:
    path = _analyzed(study)
    bundle = tmp_path / "mine"
    assert cli(["export", "--space", path, "--out", str(bundle), "--no-mlflow"]) == 0
    (bundle / "notes.txt").write_text("my notes")
    (bundle / "my_inputs").mkdir()
    np.save(bundle / "my_inputs" / "good.npy", np.zeros((2, 1, 16, 16), dtype=np.float32))
    manifest = (bundle / "manifest.json").read_bytes()
    assert cli(["export", "--space", path, "--out", str(bundle), "--no-mlflow"]) == 2  # no --force
    assert (bundle / "manifest.json").read_bytes() == manifest
    assert cli(["export", "--space", path, "--out", str(bundle), "--no-mlflow", "--force"]) == 0
    assert (bundle / "notes.txt").read_text() == "my notes"  # the user's files stay
    assert (bundle / "my_inputs" / "good.npy").is_file()
    Detector.load(bundle)

    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32))
    x_bytes = x.read_bytes()
    out = tmp_path / "flags.csv"
    out.write_text("precious")
    for target in (x, bundle / "manifest.json", bundle / "scores.csv", out, tmp_path):
        assert cli(["detect", "--detector", str(bundle), "--input", str(x), "--output", str(target)]) == 2
    assert x.read_bytes() == x_bytes and (bundle / "manifest.json").read_bytes() != b""
    assert out.read_text() == "precious"
    for target in (x, bundle / "manifest.json"):  # never, even with --force
        assert cli(["detect", "--detector", str(bundle), "--input", str(x), "--output", str(target), "--force"]) == 2
    assert x.read_bytes() == x_bytes
    Detector.load(bundle)  # intact
    assert cli(["detect", "--detector", str(bundle), "--input", str(x), "--output", str(out), "--force"]) == 0
    assert out.read_text().startswith("index,prediction,flagged,score")


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    files = {}
    files["empty"] = tmp / "empty.npy"
    files["empty"].write_bytes(b"")
    files["npz"] = tmp / "a.npz"
    np.savez(files["npz"], x=np.zeros((2, 1, 16, 16), dtype=np.float32))
    files["npz_renamed"] = tmp / "renamed.npy"
    files["npz_renamed"].write_bytes(files["npz"].read_bytes())
    files["strings"] = tmp / "strings.npy"
    np.save(files["strings"], np.array(["a", "b"]))
    files["structured"] = tmp / "structured.npy"
    np.save(files["structured"], np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]))
    files["objects"] = tmp / "objects.npy"
    np.save(files["objects"], np.array([{"x": 1}], dtype=object), allow_pickle=True)
    files["huge_header"] = tmp / "huge.npy"
    with open(files["huge_header"], "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 1, 16, 16)})
        f.write(b"\0" * 1024)
    files["folder"] = tmp / "folder.npy"
    files["folder"].mkdir()
    files["not_npy"] = tmp / "text.npy"
    files["not_npy"].write_text("hello")
    return files


def test_detect_refuses_bad_input_files_with_a_message(study: dict[str, Any], tmp_path: Path) -> None:
    import subprocess
    import sys

    path = _analyzed(study)
    bundle = tmp_path / "b"
    assert cli(["export", "--space", path, "--out", str(bundle), "--no-mlflow"]) == 0
    for name, f in _bad_inputs(tmp_path).items():
        p = subprocess.run(
            [sys.executable, "-m", "bdx_study.cli", "detect", "--detector", str(bundle), "--input", str(f)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2, (name, p.stdout, p.stderr)
        assert str(f) in p.stderr and "Traceback" not in p.stderr, (name, p.stderr)
    listed = bundle / "manifest.json"
    listed.write_text("[1, 2]")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "bdx_study.cli",
            "detect",
            "--detector",
            str(bundle),
            "--input",
            str(tmp_path / "empty.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "JSON object" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_optuna_storage_tells_the_truth(study: dict[str, Any], tmp_path: Path) -> None:
    """optuna.db (what optuna-dashboard opens) holds each family's trials in the order they ran,
    with their real start and end times, the objective as the search measured it on the selection
    split, the clean-accuracy constraint as Optuna's own (an infeasible trial shows as infeasible,
    not as COMPLETE with a penalty value), and user attributes named by their split."""
    import optuna

    from bdx_study.analysis.searches import write_optuna_study
    from bdx_study.space import Constraint

    _analyzed(study)
    spec = study["spec"]
    trials = pq.read_table(study["result"].study_dir / "tables" / "trials.parquet").to_pandas()
    rows = trials[trials.detector == "badexpert"].copy()

    def check(storage: str, table: Any, limit: float | None) -> list[Any]:
        opened = optuna.load_study(study_name=f"{spec.study.name}-badexpert", storage=storage)
        assert opened.metric_names == [spec.search.objective.selection_key]  # not "Objective 0"
        loaded = opened.trials
        assert len(loaded) == table.trial_id.nunique() == 3
        starts = [t.datetime_start for t in loaded]
        assert starts == sorted(starts)  # the order they ran
        for t in loaded:
            r = table[table.trial_id == t.user_attrs["trial_id"]]
            assert t.datetime_start.timestamp() == pytest.approx(r.started_at.min(), abs=1e-3)
            assert t.datetime_complete.timestamp() == pytest.approx(r.finished_at.max(), abs=1e-3)
            assert t.value == pytest.approx(r.selection_auroc_correct_only.min())  # measured, not penalized
            if limit is None:
                assert not t.system_attrs  # no constraint in the study: none recorded
            else:  # Optuna's named constraint, and the list optuna-dashboard reads
                (constraint,) = t.system_attrs["constraints"]
                assert constraint == pytest.approx(r.selection_clean_acc_drop.max() - limit)
                assert t.system_attrs["constraints:selection_clean_acc_drop"] == constraint
                assert (constraint <= 0) == bool(r.feasible.iloc[0])
            last = max(t.intermediate_values)  # the measured running objective: the value, at the end
            assert t.intermediate_values[last] == pytest.approx(t.value)
            for _, v in r[r.attack == "badnet"].iterrows():
                key = f"selection/{v.victim_name}/auroc_correct_only"
                assert t.user_attrs[key] == pytest.approx(v.selection_auroc_correct_only)
                assert t.user_attrs[f"evaluation/{v.victim_name}/auroc_correct_only"] == pytest.approx(
                    v.auroc_correct_only
                )
            assert not [k for k in t.user_attrs if "/" in k and k.split("/")[0] not in ("selection", "evaluation")]
        return loaded

    check(f"sqlite:///{study['result'].study_dir / 'optuna.db'}", rows, spec.search.constraint.max_clean_acc_drop)
    # a study with a clean-accuracy constraint, one trial beyond it as the search records it
    limit = 0.1
    constrained = spec.model_copy(
        update={"search": spec.search.model_copy(update={"constraint": Constraint(max_clean_acc_drop=limit)})}
    )
    tid = rows.trial_id.iloc[0]
    rows["selection_clean_acc_drop"] = rows["selection_clean_acc_drop"].clip(upper=limit - 0.05)
    rows["feasible"] = True
    rows.loc[rows.trial_id == tid, "selection_clean_acc_drop"] = limit + 0.2
    rows.loc[rows.trial_id == tid, "feasible"] = False
    rows.loc[rows.trial_id == tid, "objective"] -= 1.2
    path = write_optuna_study(rows, constrained, tmp_path / "optuna.db")
    loaded = check(f"sqlite:///{path}", rows, limit)
    bad = next(t for t in loaded if t.user_attrs["trial_id"] == tid)
    assert bad.state == optuna.trial.TrialState.COMPLETE and bad.value > 0  # the real figure
    assert bad.system_attrs["constraints"] == [pytest.approx(0.2)]  # > 0: Optuna's infeasible


def test_mlflow_views_name_the_winner_nest_refits_and_mark_searched_params(study: dict[str, Any]) -> None:
    """What a user sees in the MLflow UI: the study's run names its best trial (tag and a link in
    its description), refits are nested under their trial's run, each trial run says which of its
    params were searched, and the link launch prints opens on the trials sorted by the objective."""
    import urllib.parse

    from bdx_study.trials.tracking import runs_link

    r, spec = study["result"], study["spec"]
    client = MlflowClient(r.tracking_uri)
    runs = client.search_runs([r.experiment_id], f"tags.`bdx.study` = '{spec.study.name}'", max_results=200)
    trials = {t.data.tags["bdx.trial_id"]: t for t in runs if t.data.tags.get("bdx.kind") == "trial"}
    parent = client.get_run(r.parent_run_id)
    best = parent.data.tags["bdx.best_trial"]
    assert best == r.best["trial_id"] and parent.data.tags["bdx.best_trial_run"] == trials[best].info.run_id
    note = parent.data.tags["mlflow.note.content"]
    link = f"#/experiments/{r.experiment_id}/runs/{trials[best].info.run_id}?workflowType=machine_learning"
    assert note.startswith(f"Best trial: [{trials[best].info.run_name}]({link})"), note
    assert parent.info.run_name == f"{spec.study.name} | best: {trials[best].info.run_name}"  # the page's title
    refits = [t for t in runs if t.data.tags.get("bdx.kind") == "refit"]
    from bdx_study.tables import StudyTables

    stored = StudyTables(r.study_dir).read("refits").to_pandas()
    assert sorted(t.data.tags["bdx.refit_id"] for t in refits) == sorted(stored.trial_id.unique())
    for t in refits:
        of = t.data.tags["bdx.refit_id"].rsplit("-refit", 1)[0]
        assert t.data.tags["mlflow.parentRunId"] == trials[of].info.run_id  # under its trial, not the study
        assert t.info.status == "FINISHED" and "worst/auroc_correct_only" in t.data.metrics
    key = spec.search.objective.selection_key
    for tid, t in trials.items():
        family = t.data.tags["bdx.detector"]
        assert t.info.run_name.startswith(f"{t.data.metrics[key]:.4f} "), t.info.run_name  # seen first
        assert t.info.run_name.endswith(f" {family}-{tid}"), t.info.run_name
        assert (" infeasible " in t.info.run_name) == (t.data.metrics["feasible"] == 0), t.info.run_name
        assert t.data.tags["bdx.searched"] == ", ".join(sorted(spec.optuna_space(family)))
        assert "Searched:" in t.data.tags["mlflow.note.content"]
    assert trials_searched_unlearn_lr(trials)
    query = urllib.parse.parse_qs(runs_link(r.tracking_uri, r.experiment_id, "max", spec.study.name).split("?", 1)[1])
    assert query == {
        "searchFilter": [
            "tags.`bdx.kind` = 'trial' and tags.`bdx.status` = 'complete' and tags.`bdx.fold` IS NULL and "
            f"tags.`bdx.study` = '{spec.study.name}'"
        ],
        "orderByKey": ["metrics.`objective`"],
        "orderByAsc": ["false"],
        "workflowType": ["machine_learning"],
    }
    listed = client.search_runs([r.experiment_id], query["searchFilter"][0], max_results=200)  # the filter is valid
    own = {tid for tid, t in trials.items() if "bdx.fold" not in t.data.tags}  # not a nested fold's search
    assert {t.data.tags["bdx.trial_id"] for t in listed} == {
        tid for tid in own if trials[tid].data.tags.get("bdx.status") == "complete"
    }


def trials_searched_unlearn_lr(trials: dict[str, Any]) -> bool:
    """BaDExpert's trials mark unlearn_lr (searched) apart from unlearn_batch_size (fixed)."""
    tags = [
        t.data.tags["bdx.searched"].split(", ") for t in trials.values() if t.data.tags["bdx.detector"] == "badexpert"
    ]
    return all("unlearn_lr" in s and "unlearn_batch_size" not in s for s in tags)
