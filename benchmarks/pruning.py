"""Benchmark of trials that stop early (``search.pruning``), side by side in one run.

    python benchmarks/pruning.py [--workdir DIR] [--trials N] [--seeds K] [--out docs/pruning.md]

The study: a scaled-down copy of the zoo that fits a 2-core machine (digits, small CNN, eight
victims: seven attacks of different trigger kinds and a clean victim, trained as the tests' tiny
study trains them; BaDExpert's learning rates, unlearning epochs and ensemble searched). Victims
are trained once and shared by every run; each run has its own stage cache, so fits are priced
in full.

1. **Exact pruning, same defaults.** The same seeded TPE study (one trial at a time) launched
   twice with ``bdx-study``'s own ``launch``: ``pruning: none`` and ``pruning: exact``. Prints
   both wall times (the whole launch), the component fits (stages fitted, from the tables), the
   ratios, and whether ``analyze``'s selection rule picks the same config.
2. **Search efficiency.** For each of ``--seeds`` seeds, four searches of ``--trials`` trials
   in process (the searcher and trial code of a launch, without Ray Tune's scheduling): TPE and
   random, each with and without exact pruning. Per seed, the target is the best objective
   (selection split) random search without pruning finds with the whole budget, less 0.005;
   printed: the trials and seconds each search needs to reach it, and the best-so-far curves
   against trials and against wall time (``docs/pruning.png``).
Writes the figures to ``--out`` (keeping its hand-written notes; ``--launch-only``: part 1 only,
printed). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import write_keeping_tail  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_INIT", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ATTACKS = ["badnet", "badnet_all2all", "blend", "trojan", "wanet", "lf", "adaptive_blend", "none"]
TOLERANCE = 0.005


def study_doc(root: Path, name: str, trials: int, pruning: str, sampler: str = "tpe", seed: int = 0) -> dict[str, Any]:
    """The benchmark's study: the tests' tiny digits setting (small victims and fits) with eight
    victims, BaDExpert's learning rates, unlearning epochs and ensemble searched."""
    return {
        "study": {"name": name, "storage": str(root / "storage" / name)},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "bench-pruning"},
        "data": {"reserve_size": 120, "eval_size": 200, "train_size": 400},
        "victims": {
            "datasets": ["digits"],
            "architectures": ["small_cnn"],
            "attacks": [{"name": a} for a in ATTACKS],
            "poison_rates": [0.1],
            "seeds": [0],
            "training": {"epochs": 4, "lr": 2.0e-3},
        },
        "protocol": {"clean_set_size": 100, "target_fpr": 0.1},
        "detectors": {
            "badexpert": {
                "unlearn_lr": {"dist": "loguniform", "low": 1.0e-4, "high": 1.0e-3},
                "unlearn_epochs": {"dist": "int", "low": 1, "high": 3},
                "unlearn_batch_size": 32,
                "aux_lr": {"dist": "loguniform", "low": 0.01, "high": 0.1},
                "aux_epochs": 2,
                "aux_milestones": [1],
                "ensemble_alpha": {"dist": "uniform", "low": 1.0, "high": 4.0},
                "ensemble_beta": {"dist": "uniform", "low": 0.3, "high": 0.7},
            }
        },
        "search": {
            "sampler": sampler,
            "num_trials": trials,
            "max_concurrent": 1,
            "seed": seed,
            "objective": {"metric": "auroc_correct_only", "aggregate": "worst"},
            "constraint": {"max_clean_acc_drop": 0.15},
            "pruning": {"kind": pruning},
        },
        "resources": {"cpu": 1, "gpu": 0},
    }


def spec_of(doc: dict[str, Any]) -> Any:
    from bdx_study.space import parse_space

    return parse_space(doc, f"<benchmark {doc['study']['name']}>")


def train_victims(root: Path, trials: int) -> Path:
    """Train the victims once (Ray tasks); every run copies the cache."""
    from bdx_study.trials.victim_stage import prepare_victims

    spec = spec_of(study_doc(root, "victims", trials, "none"))
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    cache, _ = prepare_victims(spec)
    return cache.root


def with_victims(spec: Any, victims: Path) -> None:
    dest = spec.storage_root() / "victims"
    if not dest.exists():
        shutil.copytree(victims, dest)


def chosen(spec: Any) -> dict[str, Any]:
    from bdx_study.selection import select
    from bdx_study.tables import StudyTables

    df = StudyTables(spec.study_dir).read("trials").to_pandas()
    obj = spec.search.objective
    pick, _ = select(df, obj.metric, obj.aggregate, spec.search.constraint.max_clean_acc_drop)
    rows = df[df["trial_id"] == pick.trial_id]
    return {"params": json.loads(rows["params"].iloc[0]), "score": pick.score}


def fits(spec: Any) -> tuple[int, int, int]:
    """(components fitted, trials, of them pruned) of a study, from its tables."""
    from bdx_study.selection import is_pruned
    from bdx_study.tables import StudyTables

    df = StudyTables(spec.study_dir).read("trials").to_pandas()
    pruned = df[is_pruned(df)]["trial_id"].nunique()
    return int(df["stages_fitted"].sum()), int(df["trial_id"].nunique()), int(pruned)


def part_one(root: Path, victims: Path, trials: int) -> dict[str, Any]:
    """The same seeded TPE study launched without and with exact pruning."""
    from bdx_study.trials.launch import launch

    out: dict[str, Any] = {}
    for kind in ("none", "exact"):
        spec = spec_of(study_doc(root, f"launch-{kind}", trials, kind))
        with_victims(spec, victims)
        t = time.perf_counter()
        result = launch(spec)
        seconds = time.perf_counter() - t
        fitted, n, pruned = fits(spec)
        out[kind] = {"seconds": seconds, "fits": fitted, "trials": n, "pruned": pruned, "errors": result.num_errors}
        out[kind].update(chosen(spec))
    return out


def in_process(root: Path, victims: Path, trials: int, sampler: str, pruning: str, seed: int) -> list[dict[str, Any]]:
    """One search in this process: the study's searcher and trial code, one trial at a time."""
    from bdx_study.trials.context import StudyContext
    from bdx_study.trials.search import FamilySearcher
    from bdx_study.trials.trainable import execute_trial

    spec = spec_of(study_doc(root, f"{sampler}-{pruning}-s{seed}", trials, pruning, sampler, seed))
    ctx = StudyContext(spec, spec.study_dir, victims, tuple(spec.victim_configs()), spec.storage_root() / "stages")
    searcher = FamilySearcher(spec)
    records = []
    for n in range(spec.num_trials):
        tid = f"t{n:03d}"
        config = searcher.suggest(tid)
        t = time.perf_counter()
        report = execute_trial(ctx, tid, config, progress=lambda r, tid=tid: searcher.on_trial_result(tid, r))
        seconds = time.perf_counter() - t
        searcher.on_trial_complete(tid, report)
        records.append(
            {"seconds": seconds, "objective": report["objective"], "pruned": bool(report["pruned"])}
            | {"fits": report["stages_fitted"], "feasible": bool(report["feasible"])}
        )
    return records


def best_so_far(records: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(best objective of the complete trials after each trial, wall seconds after each)."""
    best, clock, curve, times = -float("inf"), 0.0, [], []
    for r in records:
        clock += r["seconds"]
        if not r["pruned"]:
            best = max(best, r["objective"])
        curve.append(best)
        times.append(clock)
    return curve, times


def reach(records: list[dict[str, Any]], target: float) -> tuple[int | None, float | None]:
    """Trials and seconds a search needs to reach ``target``; None if it never does."""
    curve, times = best_so_far(records)
    for i, (b, t) in enumerate(zip(curve, times, strict=True)):
        if b >= target:
            return i + 1, t
    return None, None


ARMS = [("random", "none"), ("random", "exact"), ("tpe", "none"), ("tpe", "exact")]


def part_two(root: Path, victims: Path, trials: int, seeds: int) -> dict[str, Any]:
    runs: dict[str, list[list[dict[str, Any]]]] = {f"{s}+{p}": [] for s, p in ARMS}
    for seed in range(seeds):
        for sampler, pruning in ARMS:
            t = time.perf_counter()
            runs[f"{sampler}+{pruning}"].append(in_process(root, victims, trials, sampler, pruning, seed))
            print(f"seed {seed} {sampler}+{pruning}: {time.perf_counter() - t:.0f} s", flush=True)
    return runs


def _target(runs: dict[str, list[list[dict[str, Any]]]], seed: int) -> float:
    return best_so_far(runs["random+none"][seed])[0][-1] - TOLERANCE


def efficiency_rows(runs: dict[str, list[list[dict[str, Any]]]]) -> list[str]:
    """Per seed, the trials and seconds each search needs to reach the target; per search, the
    median over seeds of those as ratios to random search without pruning."""
    seeds = len(runs["random+none"])
    lines = [
        "| seed | target | " + " | ".join(f"{a}: trials, s" for a in runs) + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    ratios: dict[str, list[tuple[float, float]]] = {a: [] for a in runs}
    for s in range(seeds):
        base_n, base_t = reach(runs["random+none"][s], _target(runs, s))
        cells = []
        for arm, rs in runs.items():
            n, t = reach(rs[s], _target(runs, s))
            cells.append(f"{n}, {t:.0f}" if n is not None and t is not None else "not reached")
            if n is not None and t is not None and base_n and base_t:
                ratios[arm].append((n / base_n, t / base_t))
        lines.append(f"| {s} | {_target(runs, s):.4f} | " + " | ".join(cells) + " |")
    lines.append("")
    for arm, rs in runs.items():
        reached = sum(reach(run, _target(runs, i))[0] is not None for i, run in enumerate(rs))
        med = "n/a"
        if ratios[arm]:
            med = (
                f"{statistics.median(r[0] for r in ratios[arm]):.2f} (trials), "
                f"{statistics.median(r[1] for r in ratios[arm]):.2f} (seconds)"
            )
        total = statistics.mean(sum(r["seconds"] for r in run) for run in rs)
        fitted = statistics.mean(sum(r["fits"] for r in run) for run in rs)
        pruned = statistics.mean(sum(r["pruned"] for r in run) for run in rs)
        lines.append(
            f"- {arm}: reached the target in {reached}/{seeds} seeds; median over seeds of what it needed to reach "
            f"it / what random+none needed: {med}; whole budget, mean over seeds: {total:.0f} s, "
            f"{fitted:.0f} component fits, {pruned:.1f} trials pruned"
        )
    return lines


def plot(runs: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm, rs in runs.items():
        curves = [best_so_far(r) for r in rs]
        ys = np.array([c[0] for c in curves])
        ys[~np.isfinite(ys)] = np.nan
        x = np.arange(1, ys.shape[1] + 1)
        style = "-" if arm.endswith("exact") else "--"
        a.plot(x, np.nanmean(ys, axis=0), style, label=arm)
        for y, t in curves:
            b.step(t, y, style, where="post", alpha=0.35, color=a.lines[-1].get_color())
    a.set_xlabel("trials")
    b.set_xlabel("wall seconds (one trial at a time, one thread)")
    for ax in (a, b):
        ax.set_ylabel("best worst-case AUROC so far\n(selection split, complete trials)")
    a.legend(fontsize=7)
    a.set_title("mean over seeds", fontsize=9)
    b.set_title("each seed", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(one: dict[str, Any], runs: dict[str, Any], args: argparse.Namespace, seconds: float) -> list[str]:
    none, exact = one["none"], one["exact"]
    same = json.dumps(none["params"], sort_keys=True) == json.dumps(exact["params"], sort_keys=True)
    lines = [
        "# Pruning benchmark",
        "",
        f"`python benchmarks/pruning.py --trials {args.trials} --seeds {args.seeds}` on {platform.node()} "
        f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), {time.strftime('%Y-%m-%d')}, "
        f"{seconds / 60:.0f} min in all. Study: digits, small CNN, {len(ATTACKS)} victims "
        f"({', '.join(ATTACKS)}), BaDExpert's learning rates, unlearning epochs and ensemble searched, "
        f"{args.trials} trials a search, one at a time; constraint: clean-accuracy drop <= 0.15.",
        "",
        "## 1. Exact pruning: same defaults, less work (the same seeded TPE study launched twice)",
        "",
        "| pruning | wall s (launch) | component fits | trials pruned | picked config's worst-case AUROC (selection) |",
        "|---|---|---|---|---|",
    ]
    for kind, r in one.items():
        lines.append(f"| {kind} | {r['seconds']:.0f} | {r['fits']} | {r['pruned']}/{r['trials']} | {r['score']:.4f} |")
    lines += [
        "",
        f"Ratios exact / none: wall {exact['seconds'] / none['seconds']:.2f}, component fits "
        f"{exact['fits'] / max(none['fits'], 1):.2f}. Same chosen defaults: **{same}**.",
        "",
        f"## 2. Search efficiency over {args.seeds} seeds (in process, {args.trials} trials each)",
        "",
        f"Target per seed: the best objective random search without pruning finds in {args.trials} trials, less "
        f"{TOLERANCE}. Cells: trials and wall seconds a search needs to reach it.",
        "",
        *efficiency_rows(runs),
        "",
        "![best so far against trials and wall time](pruning.png)",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--launch-only", action="store_true", help="part 1 only: print its figures, write nothing")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "pruning.md")
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bdx-pruning-"))
    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, logging_level=logging.WARNING)
    victims = train_victims(root, args.trials)
    one = part_one(root, victims, args.trials)
    print(json.dumps(one, indent=1, default=str), flush=True)
    if args.launch_only:
        return
    runs = part_two(root, victims, args.trials, args.seeds)
    (root / "runs.json").write_text(json.dumps(runs))
    plot(runs, args.out.parent / "pruning.png")
    lines = report(one, runs, args, time.perf_counter() - start)
    print("\n".join(lines))
    write_keeping_tail(args.out, lines, "## Notes", "\n## Notes\n\n(written by hand)\n")


if __name__ == "__main__":
    main()
