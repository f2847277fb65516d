"""Benchmark of the stage cache: a grid whose configs share fitted components.

    python benchmarks/stage_cache.py [--workdir DIR] [--ray]

The grid: BaDExpert with 2 unlearning lrs x 6 (alpha, beta) pairs (alpha in {1, 2, 4}, beta in
{0.3, 0.5}) = 12 configs, on 2 digits victims (small CNN, BadNet and Blend). Per victim it has 2
distinct experts and 1 distinct auxiliary model: 6 component fits in all, against 48 when every
trial fits its own.

1. **In process** (the trials' own code, ``run_trial``, one config after another, one thread):
   the whole grid with the stage cache on (a fresh cache) and off, and the *bare* time of the
   distinct fits plus the scoring: each distinct component fitted once and its outputs computed
   once (``family.fit`` + ``family.features``), plus the protocol's scoring of every config
   (``evaluate``). Target: cache-on wall <= 1.3 x bare.
2. With ``--ray``, the same grid as a real study (``launch``: Ray Tune, Optuna's grid sampler,
   MLflow, Parquet; 2 concurrent trials) with the cache on and off: fits performed (from the
   trials table's ``stages_fitted``) and the driver's wall time of ``Tuner.fit``.

Prints the figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

GRID = {"unlearn_lr": [2.0e-4, 4.0e-4], "ensemble_alpha": [1.0, 2.0, 4.0], "ensemble_beta": [0.3, 0.5]}


def study_doc(work: Path, name: str, stage_cache: bool) -> dict[str, Any]:
    return {
        "study": {"name": name, "storage": str(work / "runs"), "stage_cache": stage_cache},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-stage-cache"},
        "data": {"reserve_size": 400, "eval_size": None},
        "victims": {
            "datasets": ["digits"],
            "architectures": ["small_cnn"],
            "attacks": [{"name": "badnet"}, {"name": "blend", "alpha": 0.2}],
            "poison_rates": [0.05],
            "seeds": [0],
            "training": {"optimizer": "adam", "lr": 1.0e-3, "epochs": 40, "batch_size": 64},
        },
        "protocol": {"clean_set_size": 400, "calibration_fraction": 0.4, "target_fpr": 0.05},
        "detectors": {
            "badexpert": {
                **{k: {"dist": "choice", "values": v} for k, v in GRID.items()},
                "unlearn_epochs": 3,
                "unlearn_batch_size": 32,
                "aux_lr": 0.05,
            }
        },
        "search": {"sampler": "grid", "num_trials": None, "max_concurrent": 2, "seed": 0},
        "resources": {"cpu": 1, "gpu": 0},
    }


def configs() -> list[dict[str, Any]]:
    keys, grid = list(GRID), itertools.product(*GRID.values())
    return [{"detector": "badexpert", **dict(zip(keys, vals, strict=True))} for vals in grid]


def bare_seconds(spec: Any, cache_root: Path, victims: list[Any], grid: list[dict[str, Any]]) -> float:
    """Each distinct component fitted once and its outputs computed once, plus the scoring of
    every config from those outputs: the least the grid can cost."""
    import torch

    from bdx_study.detectors import FitContext, create_detector
    from bdx_study.protocol import evaluate, scoring_parts
    from bdx_study.stages import StageStore
    from bdx_study.training import predict_proba
    from bdx_study.trials import trainable

    cpu = torch.device("cpu")
    bare = 0.0
    for v in victims:
        loaded = trainable.CACHE.victim(cache_root, v, cpu)
        model, splits = loaded.model, loaded.splits
        _, _, protocol = spec.trial_config(grid[0])  # one protocol for the whole grid
        parts = scoring_parts(splits, loaded.attack, protocol)
        t = time.perf_counter()
        preds = {p.name: predict_proba(model, p.x).argmax(1) for p in parts}  # once per victim
        bare += time.perf_counter() - t
        finetune, cal = protocol.defender_split(splits.reserve)
        ctx_fit = FitContext(model=model, clean=finetune, holdout=cal, info=splits.info, device=cpu)
        done: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # component key -> outputs per part
        for c in grid:
            name, params, protocol = spec.trial_config(c)
            family = create_detector(name, params)
            feats: dict[str, dict[str, torch.Tensor]] = {p.name: {} for p in parts}
            for comp in family.components:
                key = StageStore.component_key(family, comp, v.key, protocol)
                if key not in done:
                    t = time.perf_counter()
                    fitted = family.fit(comp, ctx_fit)
                    done[key] = {p.name: family.features(comp, fitted, model, p.x, preds[p.name], cpu) for p in parts}
                    bare += time.perf_counter() - t
                for p in parts:
                    feats[p.name].update(done[key][p.name])
            t = time.perf_counter()
            evaluate(family, parts, preds, feats, protocol)
            bare += time.perf_counter() - t
    return bare


def in_process(work: Path) -> None:
    import torch

    from bdx_study.space import parse_space
    from bdx_study.trials import trainable
    from bdx_study.trials.context import StudyContext
    from bdx_study.victims import VictimCache

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    spec = parse_space(study_doc(work, "stage-cache", True), "benchmark")
    cache = VictimCache(spec.storage_root() / "victims")
    victims = spec.victim_configs()
    t = time.perf_counter()
    for v in victims:
        cache.get_or_train(v, device=cpu)
    print(f"victims: {len(victims)} ready ({time.perf_counter() - t:.0f} s; trained unless cached)")

    def context(stages: Path | None) -> StudyContext:
        return StudyContext(spec, spec.study_dir, cache.root, tuple(victims), stages)

    grid = configs()
    trainable.run_trial(context(None), grid[0], device=cpu)  # warm-up: loads victims and data once

    walls, fits = {}, {}
    for label, stages in (("on", work / f"stages-{time.time_ns()}"), ("off", None)):
        trainable.CACHE.clear("stage_store")
        ctx = context(stages)
        t = time.perf_counter()
        results = [trainable.run_trial(ctx, c, device=cpu) for c in grid]
        walls[label] = time.perf_counter() - t
        fits[label] = sum(run.fitted_now for r in results for _, run in r.runs)

    bare = bare_seconds(spec, cache.root, victims, grid)
    n = len(grid)
    print(f"grid: {n} configs x {len(victims)} victims = {n * len(victims)} evaluations")
    print(f"in process, stage cache on:  {fits['on']:3d} component fits, wall {walls['on']:6.1f} s")
    print(f"in process, stage cache off: {fits['off']:3d} component fits, wall {walls['off']:6.1f} s")
    print(
        f"bare (distinct fits + their outputs once + scoring of every config): {bare:.1f} s; "
        f"cache-on wall / bare = {walls['on'] / bare:.2f} (target <= 1.3); "
        f"cache off / cache on = {walls['off'] / walls['on']:.1f}x"
    )


def with_ray(work: Path) -> None:
    import pandas as pd

    from bdx_study.space import load_space
    from bdx_study.trials.launch import launch

    for label, on in (("on", True), ("off", False)):
        path = work / f"study-{label}.yaml"
        path.write_text(yaml.safe_dump(study_doc(work, f"stage-cache-{label}-{time.time_ns()}", on)))
        spec = load_space(path)
        result = launch(spec, source=path)
        ids = json.loads((result.study_dir / "study.json").read_text())
        trials = pd.read_parquet(result.study_dir / "tables" / "trials.parquet")
        print(
            f"study (Ray Tune, 2 concurrent trials), stage cache {label}: {trials['trial_id'].nunique()} trials, "
            f"{int(trials['stages_fitted'].sum())} component fits, Tuner.fit wall {ids['tune_fit_seconds']:.1f} s"
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None, help="folder for victims and caches (default: a new one)")
    ap.add_argument("--ray", action="store_true", help="also run the grid as a real study, cache on and off")
    args = ap.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="bdx-stage-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}; "
        f"workdir {work}"
    )
    in_process(work)
    if args.ray:
        with_ray(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
