"""Benchmark of the quickstart: wall time and peak memory of the README's first command, and
the study machinery's overhead per trial.

    python benchmarks/quickstart.py [--workdir DIR] [--space FILE] [--bare-trials N]

1. Runs `bdx-study quickstart` in a fresh working directory (victims are trained, nothing is
   cached) and samples the resident memory of its whole process tree (driver, Ray, workers)
   every 0.2 s.
2. Reads the study's Parquet tables and re-runs the defense computation of N of its trials bare
   (same configs, same cached victims, one thread, no Ray, no MLflow, no Parquet, no plot) to
   get the trial overhead: a trial's wall time (as Tune measured it: time_total_s, from the
   trainable's start to its report) over the bare computation of the same config.
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
    ap.add_argument("--bare-trials", type=int, default=4, help="trials whose computation is re-run bare")
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

    import pandas as pd
    import torch

    from bdx_study.space import builtin_space, load_space
    from bdx_study.tables import StudyTables
    from bdx_study.trials.context import StudyContext
    from bdx_study.trials.trainable import bare_defense_seconds

    torch.set_num_threads(1)
    spec = load_space(args.space or builtin_space("quickstart"))
    spec = spec.model_copy(
        update={"study": spec.study.model_copy(update={"storage": str((work / spec.study.storage).resolve())})}
    )
    study_dir = spec.storage_root() / "studies" / spec.study.name
    trials = StudyTables(study_dir).read("trials").to_pandas()
    victims = pd.read_parquet(study_dir / "tables" / "victims.parquet")
    tune_times = {}
    for result_file in (study_dir / "tune").glob("*/result.json"):
        lines = result_file.read_text().strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            tune_times[last["trial_id"]] = last["time_total_s"]
    ctx = StudyContext(spec, study_dir, spec.storage_root() / "victims", tuple(spec.victim_configs()))
    per_trial = trials.groupby("trial_id").first()
    sample = list(per_trial.index[: args.bare_trials])
    ratios, inner = [], []
    from bdx_study.defense import DefenseConfig

    bare_defense_seconds(ctx, spec.defense_config({}))  # warm-up: loads victims and data once
    for tid in sample:
        row = per_trial.loc[tid]
        cfg = DefenseConfig.model_validate(
            {
                k: (json.loads(row[k]) if isinstance(row[k], str) and row[k].startswith("[") else row[k])
                for k in DefenseConfig.model_fields
            }
        )
        bare = bare_defense_seconds(ctx, cfg)
        ratios.append(tune_times[tid] / bare)
        inner.append(row["trial_seconds"] / bare)
        print(
            f"trial {tid}: Tune wall {tune_times[tid]:.2f} s, inside trainable {row['trial_seconds']:.2f} s, "
            f"bare {bare:.2f} s -> overhead {tune_times[tid] / bare:.2f}"
        )
    span = trials["finished_at"].max() - trials["started_at"].min()
    print(
        f"trial overhead (Tune wall / bare), median of {len(ratios)}: {statistics.median(ratios):.2f} "
        f"(trainable-only {statistics.median(inner):.2f}); target <= 1.2"
    )
    print(
        f"victims: {len(victims)} trained, {victims['train_seconds'].sum():.0f} s of training in all; "
        f"defense trials: {per_trial.shape[0]} in {span:.0f} s of wall (first start to last finish)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
