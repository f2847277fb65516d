"""A trial's picture: one panel per victim with its evaluation inputs, in the family's own view
(BaDExpert: the expert/auxiliary confidence plane) or as score histograms with the threshold."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bdx_study._io import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from bdx_study.detectors import DetectorFamily
    from bdx_study.protocol import Evaluation


def score_histogram(ax: Axes, samples: dict[str, np.ndarray], threshold: float) -> None:
    """Clean and triggered scores (higher = more suspicious) and the calibrated threshold."""
    scores = samples["score"]
    finite = scores[np.isfinite(scores)]
    bins: Any = np.linspace(finite.min(), finite.max(), 40) if finite.size and np.ptp(finite) > 0 else 20
    for triggered, color, label in ((False, "tab:blue", "clean"), (True, "tab:red", "triggered")):
        sel = (samples["triggered"] == triggered) & np.isfinite(scores)
        if sel.any():
            ax.hist(scores[sel], bins=bins, alpha=0.55, color=color, label=label)
    if np.isfinite(threshold):
        ax.axvline(threshold, color="k", linewidth=1)
    ax.set_xlabel("score (higher = more suspicious)")
    ax.set_ylabel("inputs")


def plot_trial(family: DetectorFamily, panels: list[tuple[str, Evaluation]], path: Path) -> Path:
    """One panel per victim (evaluation split), titled with its correct-only AUROC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.3), squeeze=False)
    for ax, (name, ev) in zip(axes[0], panels, strict=True):
        sel = ev.samples["split"] == "evaluation"
        samples = {k: v[sel] for k, v in ev.samples.items()}
        if not family.plot_panel(ax, samples, ev.threshold):
            score_histogram(ax, samples, ev.threshold)
        ax.set_title(f"{name}\nAUROC(correct-only) {ev.metrics['auroc_correct_only']:.3f}", fontsize=7)
    axes[0][0].legend(fontsize=6, loc="upper left")
    fig.suptitle(f"{family.name}: evaluation split", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
