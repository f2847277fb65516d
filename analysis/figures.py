"""The paper's two figures, reproduced from a study.

- **B's unlearning curve**: the backdoor expert's clean accuracy and attack success against its
  finetuning steps, per victim (recorded on the selection split while B was fitted; a
  diagnostic that never decided anything), for BaDExpert's robust defaults;
- **AUROC vs |D_c|**: for each clean-set size the study searched, the best config of that size
  (by the selection rule) and its AUROC on every victim's evaluation split: worst case, mean,
  and the range across victims. It needs a study that varies ``protocol.clean_set_size``; with
  a separate calibration budget (``protocol.calibration_size``) |D_c| is not confounded with
  the calibration set's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bdx_study._io import atomic_path
from bdx_study.objective import mean, worst
from bdx_study.selection import select
from bdx_study.space import StudySpec

from .robust import RobustDefaults


def plot_unlearning_curve(rd: RobustDefaults, path: Path) -> Path | None:
    curves = {}
    for _, row in rd.per_victim.iterrows():
        meta = json.loads(row["fit_meta"]) if isinstance(row.get("fit_meta"), str) else {}
        curve = meta.get("expert", {}).get("curve")
        if curve and np.isfinite(curve["attack_success"]).any():
            curves[row["victim_name"]] = curve
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.6, 3.2))
    for name, c in curves.items():
        axes[0].plot(c["step"], c["clean_acc"], marker=".", linewidth=1, label=name)
        axes[1].plot(c["step"], c["attack_success"], marker=".", linewidth=1, label=name)
    for ax, what in zip(axes, ("clean accuracy", "attack success"), strict=True):
        ax.set_xlabel("expert finetuning steps")
        ax.set_ylabel(f"B's {what} (selection split)")
        ax.set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=6)
    fig.suptitle(f"BaDExpert's backdoor expert unlearning the task (fit {rd.seed_policy['fit']})", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def auroc_vs_clean_set(trials: pd.DataFrame, spec: StudySpec, family: str = "badexpert") -> pd.DataFrame:
    """Per |D_c|: the best config of that size and its evaluation-split figures across victims."""
    obj = spec.search.objective
    rows_f = trials[trials["detector"] == family]
    out = []
    for size, rows in rows_f.groupby("clean_set_size"):
        try:
            pick, _ = select(rows, obj.metric, obj.aggregate, spec.search.constraint.max_clean_acc_drop)
        except ValueError:
            continue
        vals = rows[rows["trial_id"] == pick.trial_id][obj.metric].dropna()
        out.append(
            {
                "clean_set_size": int(size),
                "trial_id": pick.trial_id,
                "configs_of_this_size": int(rows["trial_id"].nunique()),
                f"worst_{obj.metric}": worst(vals.to_numpy(), obj.metric),
                f"mean_{obj.metric}": mean(vals.to_numpy()),
                f"max_{obj.metric}": float(vals.max()),
            }
        )
    return pd.DataFrame(out)


def plot_auroc_vs_clean_set(table: pd.DataFrame, metric: str, path: Path) -> Path | None:
    if len(table) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    x = table["clean_set_size"]
    ax.fill_between(x, table[f"worst_{metric}"], table[f"max_{metric}"], alpha=0.2, label="range across victims")
    ax.plot(x, table[f"mean_{metric}"], marker="o", label="mean across victims")
    ax.plot(x, table[f"worst_{metric}"], marker="s", linestyle="--", label="worst victim")
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(list(x))
    ax.set_xticklabels([str(v) for v in x])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("|D_c| (clean images B and M' finetune on; log scale)")
    ax.set_ylabel(f"{metric} (evaluation split)")
    ax.legend(fontsize=7)
    ax.set_title("BaDExpert: best config per |D_c|", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
