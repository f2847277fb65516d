"""Printed tables, the recipe file and plots of a study's robust defaults."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bdx_study._io import write_text_atomic
from bdx_study.metrics import HIGHER_IS_BETTER
from bdx_study.space import StudySpec

from .robust import RobustDefaults

SHOWN_METRICS = [
    "auroc_correct_only",
    "auroc_all_inputs",
    "tpr_at_threshold_correct_only",
    "fpr_at_threshold_correct_only",
    "tpr_at_1pct_fpr_correct_only",
    "clean_acc_before",
    "clean_acc_drop",
    "attack_success_before",
    "attack_success_after",
]


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, 6)
    if hasattr(v, "item"):
        return _clean(v.item())
    return v


def recipe(rd: RobustDefaults, spec: StudySpec, study_dir: Path) -> dict[str, Any]:
    """The recipe: chosen hyperparameters, the rule that chose them and the per-victim evidence."""
    per_victim = [
        {
            "victim": r["victim_name"],
            "victim_id": r["victim_id"],
            "attack": r["attack"],
            **{m: _clean(r[m]) for m in SHOWN_METRICS if m in r},
        }
        for _, r in rd.per_victim.iterrows()
    ]
    return {
        "study": spec.study.name,
        "study_dir": str(study_dir),
        "defaults": dict(rd.config),  # exact values: export refits this very config
        "selection": {
            "rule": f"best {rd.aggregate}-case {rd.objective} across victims on the selection split, among "
            f"trials whose worst-case clean_acc_drop <= {rd.max_clean_acc_drop}; ties -> better mean",
            "chosen_trial": rd.chosen.trial_id,
            f"selection_{rd.aggregate}_{rd.objective}": _clean(rd.chosen.score),
            f"selection_mean_{rd.objective}": _clean(rd.chosen.mean),
            "feasible": rd.chosen.feasible,
            "trials_considered": int(len(rd.leaderboard)),
        },
        "evidence": {
            "protocol_note": "metrics on each victim's evaluation split, disjoint from the defender's clean "
            "finetune and calibration data and from the selection split the search optimized on; "
            "*_correct_only = the paper's protocol, *_all_inputs = every input",
            "tuned_victims": {
                "note": "unseen inputs, but the defaults were tuned on these victims",
                "per_victim": per_victim,
            },
            "held_out": {
                "note": "for each group, defaults re-picked without that group's victims, measured on it"
                + (
                    " (the candidate configs were proposed by TPE while it optimized over all victims, held-out "
                    "ones included: the folds are strictly held out only for grid or random search)"
                    if spec.search.sampler == "tpe"
                    else ""
                ),
                "folds": [{k: _clean(v) for k, v in f.items()} for f in rd.held_out],
            },
        },
    }


def write_recipe(data: dict[str, Any], path: Path) -> Path:
    write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))
    return path


def render(rd: RobustDefaults, spec: StudySpec) -> str:
    vals = rd.per_victim[rd.objective].dropna()
    ev = vals.min() if rd.objective in HIGHER_IS_BETTER else vals.max()
    ev_value = ev if rd.aggregate == "worst" else vals.mean()
    lines = [
        f"Robust defaults for study {spec.study.name!r}: trial {rd.chosen.trial_id}, picked on the selection split "
        f"({rd.aggregate}-case {rd.objective} {rd.chosen.score:.4f}); on the evaluation split: {ev_value:.4f}"
        f"{'' if rd.chosen.feasible else ' (NO trial met the clean-accuracy constraint)'}",
        "",
    ]
    searched = list(spec.searched)
    lines.append("Hyperparameters (* = searched):")
    for k, v in rd.config.items():
        if k in searched or k in spec.fixed:
            lines.append(f"  {'*' if k in searched else ' '} {k:24s} {v}")
    lines.append("")
    lines.append(
        "Per victim (evaluation split: inputs the search never saw; the defaults were tuned on these victims):"
    )
    cols = ["victim_name"] + [m for m in SHOWN_METRICS if m in rd.per_victim.columns]
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.3f}".format):
        lines.append(rd.per_victim[cols].to_string(index=False))
        if rd.held_out:
            lines.append("")
            lines.append("Held out (defaults re-picked without the group, measured on it):")
            lines.append(pd.DataFrame(rd.held_out).to_string(index=False))
        lines.append("")
        lines.append("Top trials (as the search saw them: selection split):")
        lines.append(rd.leaderboard.drop(columns=["score"]).head(8).to_string())
    return "\n".join(lines)


def plot_params(df: pd.DataFrame, spec: StudySpec, metric: str, path: Path) -> Path | None:
    """Worst-case ``metric`` of each trial against each searched hyperparameter."""
    searched = [k for k in spec.searched if k in df.columns]
    if not searched:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    worst = "min" if metric in HIGHER_IS_BETTER else "max"
    per_trial = df.groupby("trial_id").agg({**{k: "first" for k in searched}, metric: worst})
    fig, axes = plt.subplots(1, len(searched), figsize=(3 * len(searched), 2.8), squeeze=False)
    for ax, k in zip(axes[0], searched, strict=True):
        ax.scatter(per_trial[k].astype(str) if per_trial[k].dtype == object else per_trial[k], per_trial[metric], s=12)
        if spec.searched[k].dist == "loguniform":
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # decade labels only: minor ones overlap
        ax.set_xlabel(k)
    axes[0][0].set_ylabel(f"worst-case {metric}\n(evaluation split)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
