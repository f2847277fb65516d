"""How much a reported figure would move: across refits of the same config (fitting luck) and
across the evaluation inputs (sampling luck).

- :func:`refit_spread`: mean, standard deviation and a 95% t-interval of a per-fit figure over
  the fits of one config (the search's own fit and its refits with fresh seeds and D_c draws);
- :func:`bootstrap_interval`: a 95% percentile interval of a study-level figure (the worst case
  or mean across victims of a per-victim metric) over bootstrap resamples of each victim's
  evaluation inputs, clean and triggered resampled separately, with the fit and its threshold
  held fixed. AUROC metrics use an exact weighted-rank computation (fast); other metrics are
  recomputed by :func:`bdx_study.metrics.detection_metrics` on each resample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from bdx_study.metrics import detection_metrics
from bdx_study.objective import over_victims_rows

LEVEL = 0.95


def refit_spread(values: list[float], level: float = LEVEL) -> dict[str, float]:
    """Mean, sample std and the t-interval of the mean of ``values`` (one per fit)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    n = len(v)
    out = {"fits": float(n), "mean": float(v.mean()) if n else math.nan, "std": math.nan}
    out.update(ci_low=math.nan, ci_high=math.nan, min=math.nan, max=math.nan)
    if n:
        out.update(min=float(v.min()), max=float(v.max()))
    if n >= 2:
        from scipy.stats import t

        std = float(v.std(ddof=1))
        half = float(t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def bootstrap_auroc(neg: np.ndarray, pos: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """AUROC (ties count one half) of ``n_boot`` resamples of (neg, pos), each drawn with
    replacement; exact, as multinomial weights on the sorted negatives."""
    n, m = len(neg), len(pos)
    if n == 0 or m == 0:
        return np.full(n_boot, math.nan)
    order = np.sort(neg)
    wn = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    cum = np.concatenate([np.zeros((n_boot, 1)), np.cumsum(wn, axis=1)], axis=1)
    lo, hi = np.searchsorted(order, pos, "left"), np.searchsorted(order, pos, "right")
    per_pos = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])
    wp = rng.multinomial(m, np.full(m, 1.0 / m), size=n_boot)
    return np.asarray((per_pos * wp).sum(axis=1) / (n * m))


def _sets(s: pd.DataFrame, protocol: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    clean, trig = s[~s["triggered"]], s[s["triggered"]]
    if protocol == "correct_only":
        return clean[clean["pred"] == clean["label"]], trig[trig["pred"] == trig["attack_label"]]
    return clean, trig


def bootstrap_interval(
    scores: pd.DataFrame,
    thresholds: dict[str, float],
    metric: str,
    aggregate: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile interval of ``aggregate`` (worst | mean) across victims of ``metric`` on the
    evaluation split, over resamples of each victim's evaluation inputs. ``scores`` holds one
    fit's per-sample rows; ``thresholds`` maps victim id to that fit's threshold."""
    rng = np.random.default_rng(seed)
    per_victim = []
    for vid, s in scores[scores["split"] == "evaluation"].groupby("victim_id"):
        if metric.startswith("auroc_"):
            neg, pos = _sets(s, metric.removeprefix("auroc_"))
            vals = bootstrap_auroc(neg["score"].to_numpy(), pos["score"].to_numpy(), n_boot, rng)
        else:
            vals = _generic(s, thresholds[str(vid)], metric, min(n_boot, 200), rng)
        if np.isfinite(vals).any():
            per_victim.append(vals)
    if not per_victim:
        return math.nan, math.nan
    agg = over_victims_rows(np.vstack(per_victim), metric, aggregate)  # victims x resamples -> resamples
    lo, hi = np.nanpercentile(agg, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _generic(s: pd.DataFrame, threshold: float, metric: str, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    clean, trig = s[~s["triggered"]], s[s["triggered"]]
    out = np.full(n_boot, math.nan)
    for b in range(n_boot):
        c = clean.iloc[rng.integers(0, len(clean), len(clean))] if len(clean) else clean
        t = trig.iloc[rng.integers(0, len(trig), len(trig))] if len(trig) else trig
        m: dict[str, Any] = detection_metrics(
            clean_scores=c["score"].to_numpy(),
            clean_pred=c["pred"].to_numpy(),
            clean_label=c["label"].to_numpy(),
            poison_scores=t["score"].to_numpy(),
            poison_pred=t["pred"].to_numpy(),
            poison_attack_label=t["attack_label"].to_numpy(),
            threshold=threshold,
        )
        out[b] = m.get(metric, math.nan)
    return out
