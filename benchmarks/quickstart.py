"""Benchmark of the quickstart: wall time and peak memory of the README's first command, and
the study machinery's overhead per trial.

    python benchmarks/quickstart.py [--workdir DIR] [--space FILE]

1. Runs `bdx-study quickstart` in a fresh working directory (victims are trained, nothing is
   cached) and samples the resident memory of its whole process tree (driver, Ray, workers)
   every 0.2 s.
2. Reads the study's Parquet tables and re-runs the computation of every trial bare (same
   configs, same cached victims, one thread, no Ray, no MLflow, no Parquet, no plot, no stage
   cache) to get the overhead of the study machinery, two ways:
   - per trial: a trial's wall time as Tune measured it (time_total_s, from the trainable's
     start to its report) over the bare computation of the same config;
   - study level: the driver's wall time of Tuner.fit (actor start-up, scheduling, MLflow
     logging, experiment snapshots included) over the bare computation of all trials divided
     by the number of parallel trial slots.
Prints the figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def run_tree(cmd: list[str], cwd: Path) -> tuple[float, int, int]:
    """(wall seconds, peak tree RSS bytes, return code) of ``cmd``."""
    start = time.perf_counter()
    with open(cwd / "quickstart.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        peak = max(peak, total)
        time.sleep(0.2)
    return time.perf_counter() - start, peak, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--space", default=None, help="study file (default: the embedded quickstart)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bdx-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "bdx_study.cli", "quickstart"] + (["--space", args.space] if args.space else [])
    print(
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; python {platform.python_version()}"
    )
    print(f"command: {' '.join(cmd)}  (cwd {work})")
    wall, peak, rc = run_tree(cmd, work)
    print(f"quickstart: exit {rc}, wall {wall:.1f} s, peak memory (process tree RSS) {peak / 2**30:.2f} GiB")
    if rc != 0:
        print((work / "quickstart.log").read_text()[-3000:])
        return rc
    overhead(work, args.space)
    return 0


def tune_times(study_dir: Path) -> dict[str, float]:
    """Each trial's wall time as Tune measured it (time_total_s of its last result)."""
    times = {}
    for result_file in (study_dir / "tune").glob("*/result.json"):
        lines = result_file.read_text().strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            times[last["trial_id"]] = last["time_total_s"]
    return times


def overhead(work: Path, space: str | None) -> None:
    """Re-run every trial's computation bare and print the study machinery's overhead."""
    import pandas as pd
    import torch

    from bdx_study.space import builtin_space, load_space
    from bdx_study.tables import StudyTables
    from bdx_study.trials.context import StudyContext
    from bdx_study.trials.trainable import bare_trial_seconds

    torch.set_num_threads(1)
    spec = load_space(space or builtin_space("quickstart"))
    spec = spec.model_copy(
        update={"study": spec.study.model_copy(update={"storage": str((work / spec.study.storage).resolve())})}
    )
    study_dir = spec.storage_root() / "studies" / spec.study.name
    per_trial = StudyTables(study_dir).read("trials").to_pandas().groupby("trial_id").first()
    ctx = StudyContext(spec, study_dir, spec.storage_root() / "victims", tuple(spec.victim_configs()))

    def config(tid: str) -> dict[str, object]:
        """The trial's sampled values, as the searcher gave them."""
        row = per_trial.loc[tid]
        params = {**json.loads(row["params"]), **{k: row[k] for k in ("clean_set_size", "calibration_fraction")}}
        return {"detector": row["detector"], **{k: params.get(k, row.get(k)) for k in spec.searched(row["detector"])}}

    bare_trial_seconds(ctx, config(per_trial.index[0]))  # warm-up: loads victims and data once
    bare = {tid: bare_trial_seconds(ctx, config(tid)) for tid in per_trial.index}
    tuned = tune_times(study_dir)
    ratios = [tuned[t] / bare[t] for t in bare if t in tuned]
    inner = [per_trial.loc[t, "trial_seconds"] / bare[t] for t in bare]
    ids = json.loads((study_dir / "study.json").read_text())
    concurrency = min(spec.search.max_concurrent, os.cpu_count() or 1)
    ideal = sum(bare.values()) / concurrency
    print(
        f"bare defense computation: {sum(bare.values()):.0f} s for {len(bare)} configs x {len(ctx.victims)} victims "
        f"(one thread each), i.e. {ideal:.0f} s on {concurrency} parallel slots"
    )
    print(
        f"per trial (Tune's time_total_s / bare), median of {len(ratios)}: {statistics.median(ratios):.2f} "
        f"(max {max(ratios):.2f}); inside the trainable only: {statistics.median(inner):.2f}"
    )
    print(
        f"study level (driver's Tuner.fit wall {ids['tune_fit_seconds']:.0f} s / ideal {ideal:.0f} s): "
        f"{ids['tune_fit_seconds'] / ideal:.2f}  [includes actor start-up, scheduling, MLflow logging]; "
        "target <= 1.2"
    )
    if "after_tune_seconds" in ids:
        print(f"after Tuner.fit (refits of the best configs, nested folds): {ids['after_tune_seconds']:.0f} s")
    victims = pd.read_parquet(study_dir / "tables" / "victims.parquet")
    print(f"victims: {len(victims)} trained, {victims['train_seconds'].sum():.0f} s of training in all")


if __name__ == "__main__":
    raise SystemExit(main())
