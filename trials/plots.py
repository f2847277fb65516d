"""The (expert confidence, auxiliary confidence) plane of a trial, with the decision boundary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bdx_study.defense import badexpert_score

if TYPE_CHECKING:
    from bdx_study.defense import DefenseConfig, Evaluation


def plot_confidence_planes(panels: list[tuple[str, Evaluation, DefenseConfig]], path: Path, *, title: str = "") -> Path:
    """One panel per victim: clean and triggered inputs of the evaluation split in the (b, m) plane, where
    b = expert confidence and m = auxiliary confidence in M's predicted class, and the boundary
    score = threshold (inputs on the high-score side, the lower-right corner, are flagged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False)
    grid = torch.linspace(0, 1, 101)
    bb, mm = torch.meshgrid(grid, grid, indexing="xy")
    for ax, (name, ev, cfg) in zip(axes[0], panels, strict=True):
        s = ev.samples
        for triggered, color, label in ((False, "tab:blue", "clean"), (True, "tab:red", "triggered")):
            sel = (s["split"] == "evaluation") & (s["triggered"] == triggered)
            ax.scatter(s["expert_conf"][sel], s["aux_conf"][sel], s=4, alpha=0.5, c=color, label=label)
        z = badexpert_score(bb, mm, cfg.score_kind, cfg.ensemble_alpha, cfg.ensemble_beta).numpy()
        thr = ev.metrics["threshold"]
        if np.isfinite(thr) and z.min() < thr < z.max():
            ax.contour(grid.numpy(), grid.numpy(), z, levels=[thr], colors="k", linewidths=1, linestyles="solid")
        ax.set_title(f"{name}\nAUROC(correct-only) {ev.metrics['auroc_correct_only']:.3f}", fontsize=7)
        ax.set_xlabel("expert confidence b")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("auxiliary confidence m")
    axes[0][0].legend(fontsize=6, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path
