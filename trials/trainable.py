"""The Ray Tune trainable: one trial = one BaDExpert config evaluated against every victim."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any

import pyarrow as pa
import ray
import torch
from ray import tune

from bdx_study.archs import Classifier
from bdx_study.data import Splits
from bdx_study.defense import DefenseConfig, Evaluation, evaluate_badexpert, fit_badexpert
from bdx_study.metrics import aggregate
from bdx_study.tables import StudyTables
from bdx_study.training import pick_device
from bdx_study.victims import VictimCache, VictimConfig

from .context import StudyContext, objective_value
from .plots import plot_confidence_planes

# Per-victim metrics also reported to Tune/MLflow as "<victim name>/<metric>" (all are in Parquet).
PER_VICTIM_REPORTED = (
    "auroc_correct_only",
    "auroc_all_inputs",
    "tpr_at_threshold_correct_only",
    "fpr_at_threshold_correct_only",
    "clean_acc_drop",
    "attack_success_after",
)


# Victims and splits are loaded once per worker process: Ray reuses trial actors.
_MODELS: dict[tuple[str, str, str], Classifier] = {}
_SPLITS: dict[str, Splits] = {}


def _victim_model(cache_root: str, config: VictimConfig, device: str) -> Classifier:
    key = (cache_root, config.key, device)
    if key not in _MODELS:
        record = VictimCache(cache_root).load(config)
        if record is None:
            raise RuntimeError(f"victim {config.name} is missing or corrupt in {cache_root}; relaunch to retrain it")
        _MODELS[key] = record.load_model(device)
    return _MODELS[key]


def _splits(config: VictimConfig) -> Splits:
    key = config.dataset + config.data.model_dump_json()
    if key not in _SPLITS:
        _SPLITS[key] = config.data.splits(config.dataset)
    return _SPLITS[key]


def run_defense(
    ctx: StudyContext, cfg: DefenseConfig, *, device: torch.device
) -> list[tuple[VictimConfig, Evaluation, dict[str, float]]]:
    """The bare computation of a trial: fit and evaluate BaDExpert on every victim."""
    out = []
    for victim in ctx.victims:
        model = _victim_model(str(ctx.victim_cache), victim, str(device))
        splits = _splits(victim)
        det, diag = fit_badexpert(model, splits, cfg, device=device)
        out.append((victim, evaluate_badexpert(det, splits, victim.build_attack(), device=device), diag))
    return out


def victim_columns(v: VictimConfig) -> dict[str, Any]:
    return {
        "victim_id": v.key,
        "victim_name": v.name,
        "dataset": v.dataset,
        "architecture": v.architecture,
        "attack": v.attack.name,
        "poison_rate": float(v.attack.params.get("poison_rate", 0.0)),
        "victim_seed": v.seed,
        "victim_epochs": v.training.epochs,
    }


def defense_trial(config: dict[str, Any], *, ctx: StudyContext) -> None:
    """Ray Tune function trainable. ``config`` holds the sampled hyperparameters; the study's fixed
    ones come from ``ctx``. Writes Parquet parts and a plot, then reports once."""
    start, started_at = time.perf_counter(), time.time()
    trial_id = tune.get_context().get_trial_id()
    artifacts = ctx.study_dir / "artifacts" / trial_id
    tables = StudyTables(ctx.study_dir)
    if trial_id in tables.finished_trials() and (artifacts / "report.json").is_file():
        # A restored study restarted a trial that had already finished (its result was written
        # after Tune's last experiment snapshot): report the stored result instead of re-running.
        tune.report(json.loads((artifacts / "report.json").read_text()))
        return
    torch.set_num_threads(max(1, math.floor(ctx.spec.resources.cpu)))
    device = pick_device(prefer_gpu=ctx.spec.resources.gpu > 0)
    cfg = ctx.spec.defense_config(config)
    results = run_defense(ctx, cfg, device=device)

    params = cfg.to_row()
    node = os.environ.get("RAY_NODE_ID") or socket.gethostname()
    rows, score_tables = [], []
    for victim, ev, diag in results:
        rows.append(
            {
                "study": ctx.name,
                "trial_id": trial_id,
                **victim_columns(victim),
                **params,
                **ev.metrics,
                **{f"selection_{k}": v for k, v in ev.selection_metrics.items()},
                **diag,
                "node": node,
                "device": str(device),
                "gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
                "started_at": started_at,
            }
        )
        n = len(ev.samples["score"])
        cols = {"trial_id": pa.array([trial_id] * n), "victim_id": pa.array([victim.key] * n)}
        cols.update({k: pa.array(v.tolist() if v.dtype == object else v) for k, v in ev.samples.items()})
        score_tables.append(pa.table(cols))
    aggregates = aggregate([ev.metrics for _, ev, _ in results])
    for key, value in aggregate([ev.selection_metrics for _, ev, _ in results]).items():
        how, _, metric = key.partition("/")
        aggregates[f"{how}/selection_{metric}"] = value
    objective, feasible = objective_value(ctx.spec, aggregates)

    plot_path = plot_confidence_planes(
        [(v.name, ev, cfg) for v, ev, _ in results], artifacts / "confidence_plane.png", title=f"trial {trial_id}"
    )
    elapsed = time.perf_counter() - start
    for r in rows:
        r.update(objective=objective, feasible=feasible, trial_seconds=elapsed, finished_at=time.time())
    report: dict[str, Any] = {"objective": objective, "feasible": float(feasible), "trial_seconds": elapsed}
    report.update(aggregates)
    for victim, ev, _ in results:
        for k in PER_VICTIM_REPORTED:
            val = ev.metrics.get(k, math.nan)
            if math.isfinite(val):
                report[f"{victim.name}/{k}"] = val
    report["scores_path"] = str(tables.part("scores", trial_id))
    report["plot_path"] = str(plot_path)
    report["node"] = node
    assert all(math.isfinite(v) for v in report.values() if isinstance(v, float)), "non-finite metric reported"
    (artifacts / "report.json").write_text(json.dumps(report))
    tables.write_trial(trial_id, rows, pa.concat_tables(score_tables))  # the trial counts as finished now
    tune.report(report)


def bare_defense_seconds(ctx: StudyContext, cfg: DefenseConfig, device: torch.device | None = None) -> float:
    """Wall time of the same defense computation outside Ray (for the overhead benchmark)."""
    t = time.perf_counter()
    run_defense(ctx, cfg, device=device or torch.device("cpu"))
    return time.perf_counter() - t


__all__ = ["bare_defense_seconds", "defense_trial", "run_defense", "victim_columns"]
