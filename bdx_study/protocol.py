"""The evaluation protocol shared by every detector family. Its settings are
:class:`~bdx_study.configs.ProtocolConfig` (declared apart, without torch, for study files).

1. **Defender split.** The defender's clean set D_c is ``clean_set_size`` images of the reserved
   pool (the first ones, or a seeded draw: ``clean_set_seed``). By default its last
   ``round(clean_set_size * calibration_fraction)`` images form the *calibration* part and the
   rest the *finetune* part, which is all a family fits on. With ``calibration_size`` set,
   calibration is a separate clean budget (the next ``calibration_size`` reserved images) and
   the family fits on all of D_c, as in the reference implementation.
2. **Scored inputs** (:func:`scoring_parts`): the calibration part (clean), and on the
   *selection* and *evaluation* splits every clean input plus the attack's test-time trigger
   applied to every input that counts toward attack success.
3. **Threshold**, from the scores of the calibration inputs the model classifies correctly; an
   input is flagged iff its score > threshold. ``conformal`` (default): the
   ceil((n + 1)(1 - target_fpr))-th smallest of the n scores, so that the false-positive rate on
   exchangeable clean inputs is at most ``target_fpr`` in expectation; ``quantile``: the paper's
   (1 - target_fpr) quantile (linear interpolation), whose realized FPR exceeds the target on
   average at small n. Calibration never sees selection or evaluation data. A family whose
   score needs a clean reference (a committee puts each member on a clean scale) takes it from
   the first ``reference_fraction`` of the correctly classified calibration inputs, and the
   threshold is calibrated on the rest only (:func:`reference_rows`): disjoint, so the guarantee
   still holds (docs/protocol.md).
4. **Metrics** (:mod:`bdx_study.metrics`), computed per split from that split's rows only:
   correct-only and all-inputs AUROC from continuous scores, TPR/FPR at the threshold and at 1%
   and 5% FPR, CA and ASR before and after filtering. The search optimizes the selection split;
   every reported figure comes from the evaluation split.
5. **Per-sample table**: :data:`SAMPLE_COLUMNS` plus the family's extras.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bdx_study.attacks import Attack
from bdx_study.configs import ProtocolConfig
from bdx_study.data import ImageData, Splits
from bdx_study.detectors import DetectorFamily, Fitted
from bdx_study.metrics import detection_metrics

SPLITS = ("calibration", "selection", "evaluation")
REFERENCE = "reference"  # the split column of calibration inputs that referenced the score (never the threshold's)
SAMPLE_COLUMNS = (
    "split",  # calibration | reference (calibration inputs a committee's scales rest on) | selection | evaluation
    "triggered",  # the attack's test-time trigger was applied
    "sample_index",  # index within the split
    "label",  # true class
    "attack_label",  # class that counts as attack success (-1 for untriggered rows)
    "pred",  # argmax M(x)
    "score",  # higher = more suspicious
    "flagged",  # score > threshold
)


@dataclass(frozen=True)
class Part:
    """One group of scored inputs: a split, clean or triggered."""

    split: str
    triggered: bool
    x: Tensor  # (N, C, H, W) in [0, 1]
    label: Tensor  # true class
    attack_label: Tensor  # class that counts as attack success (-1 for clean rows)
    sample_index: Tensor  # index within the split

    @property
    def name(self) -> str:
        return f"{self.split}/{'triggered' if self.triggered else 'clean'}"

    def __len__(self) -> int:
        return int(self.label.shape[0])


def scoring_parts(splits: Splits, attack: Attack, protocol: ProtocolConfig) -> list[Part]:
    """The inputs every family scores, in a fixed order: calibration (clean only), then clean and
    triggered inputs of the selection and evaluation splits."""
    _, calibration = protocol.defender_split(splits.reserve)
    parts = [_clean_part("calibration", calibration)]
    for split, data in (("selection", splits.selection), ("evaluation", splits.evaluation)):
        parts.append(_clean_part(split, data))
        idx = torch.nonzero(attack.counts_toward_asr(data.y)).squeeze(1)
        y = data.y[idx]
        parts.append(Part(split, True, attack.apply_trigger(data.x[idx]), y, attack.attack_label(y), idx))
    return parts


def _clean_part(split: str, data: ImageData) -> Part:
    return Part(split, False, data.x, data.y, torch.full_like(data.y, -1), torch.arange(len(data)))


@dataclass
class Evaluation:
    """One family on one victim: metrics per split and the per-sample table."""

    threshold: float
    metrics: dict[str, float]  # on the evaluation split: every reported figure
    selection_metrics: dict[str, float]  # on the selection split: what the search optimizes
    samples: dict[str, np.ndarray]  # equal-length columns, one row per scored input
    reference: Fitted | None = None  # what the score was referenced to (a committee's clean scales), if anything


def reference_rows(correct: np.ndarray, fraction: float) -> np.ndarray:
    """The calibration rows that reference a family's score (:attr:`DetectorFamily.reference_fraction`):
    the first ``round(fraction * n)`` of the n correctly classified ones (the calibration part is a
    random draw of the reserve, in a fixed order). The threshold is calibrated on the other
    correctly classified rows only."""
    rows = np.zeros(len(correct), dtype=bool)
    if fraction > 0:
        idx = np.flatnonzero(correct)
        rows[idx[: round(len(idx) * fraction)]] = True
    return rows


def evaluate(
    family: DetectorFamily,
    parts: list[Part],
    preds: dict[str, Tensor],
    feats: dict[str, dict[str, Tensor]],
    protocol: ProtocolConfig,
) -> Evaluation:
    """Score every part from its features (``feats[part.name]``) and M's predictions
    (``preds[part.name]``), calibrate the threshold on the correctly classified calibration
    inputs (less those that referenced the score, for a family that needs a reference), and
    compute each split's metrics from its own rows."""
    by_name = {p.name: p for p in parts}
    cal = by_name["calibration/clean"]
    correct = (preds[cal.name] == cal.label).numpy()
    if not correct.any():
        raise ValueError("the model classifies no calibration input correctly: no clean scores to calibrate on")
    referenced = reference_rows(correct, family.reference_fraction)
    reference = None
    if referenced.any():
        rows = torch.from_numpy(referenced)
        reference = family.fit_reference({k: v[rows] for k, v in feats[cal.name].items()}, preds[cal.name][rows])
        family = family.with_reference(reference)
    scores = {p.name: family.score(feats[p.name], preds[p.name]).double().numpy() for p in parts}
    calibrating = correct & ~referenced
    if not calibrating.any():
        raise ValueError(
            f"no correctly classified calibration input is left for the threshold once {int(referenced.sum())} "
            "referenced the score: lower reference_fraction or calibrate on more images"
        )
    threshold = protocol.threshold(scores[cal.name][calibrating])

    results = {split: _split_metrics(family, by_name, split, scores, preds, feats, threshold) for split in SPLITS[1:]}
    samples = _samples(family, parts, scores, preds, feats, threshold, referenced)
    return Evaluation(threshold, results["evaluation"], results["selection"], samples, reference)


def _split_metrics(
    family: DetectorFamily,
    by_name: dict[str, Part],
    split: str,
    scores: dict[str, np.ndarray],
    preds: dict[str, Tensor],
    feats: dict[str, dict[str, Tensor]],
    threshold: float,
) -> dict[str, float]:
    """One split's detection metrics (from its own clean and triggered rows) and the family's
    diagnostics."""
    clean, trig = by_name[f"{split}/clean"], by_name[f"{split}/triggered"]
    m = detection_metrics(
        clean_scores=scores[clean.name],
        clean_pred=preds[clean.name].numpy(),
        clean_label=clean.label.numpy(),
        poison_scores=scores[trig.name],
        poison_pred=preds[trig.name].numpy(),
        poison_attack_label=trig.attack_label.numpy(),
        threshold=threshold,
    )
    m.update(family.diagnose(feats[clean.name], clean.label, feats[trig.name], trig.attack_label))
    return m


def _samples(
    family: DetectorFamily,
    parts: list[Part],
    scores: dict[str, np.ndarray],
    preds: dict[str, Tensor],
    feats: dict[str, dict[str, Tensor]],
    threshold: float,
    referenced: np.ndarray,
) -> dict[str, np.ndarray]:
    """One row per scored input (:data:`SAMPLE_COLUMNS` and the family's extras); the
    calibration rows that referenced the score are marked as split ``REFERENCE``."""
    cols: dict[str, list[np.ndarray]] = {k: [] for k in SAMPLE_COLUMNS}
    for p in parts:
        n, s = len(p), scores[p.name]
        names = np.array([p.split] * n, dtype=object)
        if p.name == "calibration/clean":
            names[referenced] = REFERENCE
        cols["split"].append(names)
        cols["triggered"].append(np.full(n, p.triggered))
        cols["sample_index"].append(p.sample_index.numpy())
        cols["label"].append(p.label.numpy())
        cols["attack_label"].append(p.attack_label.numpy())
        cols["pred"].append(preds[p.name].numpy())
        cols["score"].append(s)
        cols["flagged"].append(s > threshold)
        for k, v in family.extras(feats[p.name], preds[p.name]).items():
            cols.setdefault(k, []).append(v.double().numpy())
    return {k: np.concatenate(v) for k, v in cols.items()}
