"""Printed tables and plots of a study's robust defaults and its comparison of detector families
(the recipe file itself: :mod:`.recipe`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bdx_study._config import flatten
from bdx_study._io import atomic_path
from bdx_study.metrics import HEADLINE
from bdx_study.objective import reduction
from bdx_study.selection import is_pruned
from bdx_study.space import LogUniform, StudySpec

from .robust import RobustDefaults, family_board, with_flat_params


def _render_family(rd: RobustDefaults, spec: StudySpec) -> list[str]:
    summary = rd.evaluation_summary
    lo, hi = rd.bootstrap
    lines = [
        f"== {rd.detector}: trial {rd.chosen.trial_id}, picked on the selection split ({rd.aggregate}-case "
        f"{rd.objective} {rd.chosen.score:.4f}; by {rd.chosen_by}); evaluation split: worst {summary['worst']:.4f}, "
        f"mean {summary['mean']:.4f}{'' if rd.chosen.feasible else ' (NO trial met the clean-accuracy constraint)'}",
        f"   {rd.aggregate}-case {rd.objective}, evaluation split: {summary[rd.aggregate]:.4f} "
        f"(95% bootstrap CI over evaluation inputs {lo:.4f} to {hi:.4f}; fit {rd.seed_policy['fit']}, "
        f"seed {rd.seed_policy['seed']}, D_c draw {rd.seed_policy['clean_set_seed']})",
    ]
    n = int(rd.refit.get("fits", 1))
    if n > 1:
        r = rd.refit
        lines.append(
            f"   over {n} fits (fresh seeds and D_c draws): mean {r['mean']:.4f}, sd {r['std']:.4f}, 95% CI of the "
            f"mean {r['ci_low']:.4f} to {r['ci_high']:.4f}, range {r['min']:.4f} to {r['max']:.4f}; export uses "
            f"{rd.seed_policy['rule']}"
        )
    else:
        lines.append("   one fit only: no refit spread (set search.refit.top_k to measure fitting luck)")
    searched = spec.searched(rd.detector)
    fixed = spec.fixed(rd.detector)
    lines.append("Settings (* = searched):")
    for k, v in {**rd.protocol, **flatten(rd.params)}.items():
        if k in searched or k in fixed:
            lines.append(f"  {'*' if k in searched else ' '} {k:36s} {v}")
    lines.append(
        "Per victim (evaluation split: inputs the search never saw; the defaults were tuned on these victims):"
    )
    cols = ["victim_name"] + [m for m in HEADLINE if m in rd.per_victim.columns]
    lines.append(rd.per_victim[cols].to_string(index=False))
    if rd.held_out:
        lines.append(
            f"Held out (picked without the group, {rd.aggregate}-case {rd.objective} on its evaluation split):"
        )
        for f in rd.held_out:
            lo, hi = f["held_out_ci95"]
            glo, ghi = f["transfer_gap_ci95"]
            label = "strictly held out" if f["strictly_held_out"] else "NOT strictly held out"
            lines.append(
                f"  {f['held_out']:22s} {f[f'held_out_{rd.aggregate}_{rd.objective}']:.4f} [{lo:.4f}, {hi:.4f}]  "
                f"tuned-on {f[f'tuned_victims_{rd.aggregate}_{rd.objective}']:.4f}  gap {f['transfer_gap']:+.4f} "
                f"[{glo:+.4f}, {ghi:+.4f}]  trial {f['picked_trial']}  {label}: {f['why']}"
            )
    lines.append("Top trials (as the search saw them: selection split):")
    lines.append(rd.leaderboard.drop(columns=["score"]).head(5).to_string())
    return lines


def render(per_family: dict[str, RobustDefaults], spec: StudySpec, table: pd.DataFrame) -> str:
    lines: list[str] = []
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.3f}".format):
        for rd in per_family.values():
            lines += _render_family(rd, spec) + [""]
        obj = spec.search.objective.metric
        lines.append(
            f"Comparison: each family's robust defaults, {obj} on each victim's evaluation split "
            "(same victims, same protocol, same inputs):"
        )
        pivot = table.pivot_table(index="victim_name", columns="detector", values=obj, aggfunc="first")
        pivot = pivot[[f for f in per_family if f in pivot.columns]]
        pivot.loc["worst"] = [per_family[f].evaluation_summary["worst"] for f in pivot.columns]
        pivot.loc["mean"] = [per_family[f].evaluation_summary["mean"] for f in pivot.columns]
        lines.append(pivot.to_string())
        cost = table.groupby("detector")[["forward_passes_per_input", "score_seconds_per_input", "fit_seconds"]].mean()
        lines.append("Cost (mean over victims): forward passes and scoring seconds per input, fit seconds per victim:")
        lines.append(cost.loc[[f for f in per_family if f in cost.index]].to_string(float_format="{:.4g}".format))
        board = family_board(per_family)
        lines.append(
            f"\nDefault detector: {board['detector'].iloc[0]} (what export and fit use unless --detector), chosen by "
            "the selection rule across families on the selection split (refit-averaged where refitted; feasible "
            "first, then worst case, then mean):"
        )
        lines.append(board.to_string(index=False))
    return "\n".join(lines)


def pruning_text(trials: pd.DataFrame, spec: StudySpec) -> str:
    """How many trials the study's pruner stopped and what that saved (victim evaluations, and
    their price at the complete trials' mean seconds per victim)."""
    from bdx_study.pruning import savings

    kind = spec.pruning.kind
    s = savings(trials)
    if not s["pruned"]:
        return "" if kind == "none" else f"\nPruning ({kind}): no trial was stopped early ({int(s['trials'])} trials)."
    share = s["skipped"] / (s["skipped"] + s["evaluated"])
    price = f", about {s['seconds_skipped']:.0f} s of trial time" if np.isfinite(s["seconds_skipped"]) else ""
    exact = (
        "exact: none of them could have been picked or refitted"
        if kind == "exact"
        else "approximate: a pruned trial might have done well on the victims it skipped"
    )
    return (
        f"\nPruning ({kind}; {exact}): {int(s['pruned'])} of {int(s['trials'])} trials stopped early; "
        f"{int(s['skipped'])} of {int(s['skipped'] + s['evaluated'])} victim evaluations skipped ({share:.0%}{price}). "
        "Pruned trials are kept in the tables (rows marked pruned) and are never picked."
    )


def plot_params(df: pd.DataFrame, spec: StudySpec, metric: str, path: Path) -> Path | None:
    """The objective the search optimized (``metric`` aggregated over victims as the search does,
    on the selection split) of each trial against each searched setting, one row per family;
    infeasible trials (beyond the clean-accuracy constraint) and pruned ones (their figure is over
    the victims they saw) marked apart; log axes labelled."""
    families = [f for f in spec.families if spec.searched(f) and (df["detector"] == f).any()]
    if not families:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    obj = spec.search.objective
    column = f"selection_{metric}" if f"selection_{metric}" in df.columns else metric
    how = reduction(metric, obj.aggregate)
    width = max(len(spec.searched(f)) for f in families)
    fig, axes = plt.subplots(len(families), width, figsize=(3 * width, 2.8 * len(families)), squeeze=False)
    for row, family in zip(axes, families, strict=True):
        rows = with_flat_params(df[df["detector"] == family])
        searched = spec.searched(family)
        rows = rows.assign(_pruned=is_pruned(rows))
        agg = {**{k: "first" for k in searched}, column: how, "feasible": "first", "_pruned": "max"}
        per_trial = rows.groupby("trial_id").agg(agg)
        pruned = per_trial["_pruned"].astype(bool)
        ok = per_trial["feasible"].astype(bool) & ~pruned
        bad = ~per_trial["feasible"].astype(bool) & ~pruned
        for ax, k in zip(row, searched, strict=False):
            x = per_trial[k].astype(str) if per_trial[k].dtype == object else per_trial[k]
            ax.scatter(x[ok], per_trial[column][ok], s=12, label="feasible")
            if bad.any():
                ax.scatter(x[bad], per_trial[column][bad], s=16, marker="x", color="tab:red", label="infeasible")
            if pruned.any():  # its figure covers only the victims it saw: a bound, not a result
                label = "pruned (victims seen only)"
                ax.scatter(x[pruned], per_trial[column][pruned], s=14, marker="v", color="0.6", label=label)
            if bad.any() or pruned.any():
                ax.legend(fontsize=6)
            dist = searched[k]
            if isinstance(dist, LogUniform):
                ax.set_xscale("log")  # four labelled ticks across the searched range: it may span less than a decade
                ticks = np.geomspace(dist.low, dist.high, 4)
                ax.minorticks_off()
                ax.set_xticks(ticks, labels=[f"{t:.2g}" for t in ticks], fontsize=7)
                ax.set_xlabel(f"{k} (log scale)")
            else:
                ax.set_xlabel(k)
        for ax in row[len(searched) :]:
            ax.axis("off")
        what = "worst-case" if obj.aggregate == "worst" else "mean"
        row[0].set_ylabel(f"{family}\n{what} {metric}\n(selection split: the search's objective)", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


def plot_comparison(per_family: dict[str, RobustDefaults], scores: pd.DataFrame, path: Path) -> Path:
    """Per victim: the ROC curve (correct-only, evaluation split) of each family's robust
    defaults, with its AUROC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    victims = sorted(
        {
            r["victim_id"]
            for rd in per_family.values()
            for _, r in rd.per_victim.iterrows()
            if np.isfinite(r["auroc_correct_only"])  # clean victims have no triggered inputs
        }
    )
    names = {r["victim_id"]: r["victim_name"] for rd in per_family.values() for _, r in rd.per_victim.iterrows()}
    fig, axes = plt.subplots(1, len(victims), figsize=(3.4 * len(victims), 3.4), squeeze=False)
    for ax, vid in zip(axes[0], victims, strict=True):
        for family, rd in per_family.items():
            s = scores[(scores["trial_id"] == rd.seed_policy["fit"]) & (scores["victim_id"] == vid)]
            s = s[s["split"] == "evaluation"]
            neg = s[~s["triggered"] & (s["pred"] == s["label"])]["score"].to_numpy()
            pos = s[s["triggered"] & (s["pred"] == s["attack_label"])]["score"].to_numpy()
            if not len(neg) or not len(pos):
                continue
            fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(neg)), np.ones(len(pos))], np.r_[neg, pos])
            auc = rd.per_victim.set_index("victim_id").loc[vid, "auroc_correct_only"]
            ax.plot(fpr, tpr, label=f"{family} {auc:.3f}", linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":")
        ax.set_title(names.get(vid, vid), fontsize=7)
        ax.set_xlabel("false-positive rate")
        ax.legend(fontsize=6, loc="lower right", title="AUROC (correct-only)", title_fontsize=6)
    axes[0][0].set_ylabel("true-positive rate")
    fig.suptitle("robust defaults per family: ROC on the evaluation split", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
