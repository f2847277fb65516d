"""SCALE-UP (Guo et al., ICLR 2023), per ../shared/reference/detectors.md.

Scale the pixel values of an input (before normalization) by each n in ``scales`` and clip to
[0, 1]; the scaled prediction consistency SPC(x) is the fraction of scaled copies whose predicted
label equals M's prediction on x. A trigger keeps its label under amplification, clean content
does not, so **high SPC = backdoor**. Hard labels only; len(scales) forward passes per input.

``standardize``:
- ``none``: the score is SPC itself (the standard setting);
- ``class``: the data-limited variant. SPC is standardized by the mean and standard deviation
  of SPC on the defender's clean images *of the predicted class* (the paper assumes a few benign
  samples per class). The clean statistics are fitted on the finetune part of D_c. Classes with
  fewer than two clean images use the statistics of all of them, and a standard deviation is
  never taken below half the SPC resolution (0.5 / len(scales)).
BackdoorBox standardizes by the global clean mean and std, which is rank-preserving: it changes
neither AUROC nor what a calibrated threshold flags, so it is not offered separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from bdx_study._lazy import LazyModule

from ._base import MAIN, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import register_detector

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
else:
    torch = LazyModule("torch")


class ScaleUpParams(DetectorParams):
    scales: tuple[float, ...] = fit_param(
        MAIN, (3.0, 5.0, 7.0, 9.0, 11.0), min_length=1, max_length=64, description="pixel multipliers (paper: 3..11)"
    )
    standardize: Literal["none", "class"] = Field(
        "none", description="none: raw SPC; class: standardized by clean per-class SPC stats (data-limited variant)"
    )

    @field_validator("scales")
    @classmethod
    def _above_one(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 1.0 < s <= 1e3 for s in v):
            raise ValueError(f"every scale must be in (1, 1000], got {list(v)}")
        return v


def scaled_consistency(
    model: nn.Module, x: Tensor, pred: Tensor, scales: tuple[float, ...], device: torch.device
) -> Tensor:
    """SPC: the share of ``scales`` for which argmax M(clip(n x, 0, 1)) == ``pred``."""
    from bdx_study.training import predict_proba

    agree = torch.zeros(len(x))
    for s in scales:
        agree += (predict_proba(model, (x * s).clamp(0.0, 1.0), device=device).argmax(1) == pred).float()
    return agree / len(scales)


@register_detector("scale_up")
class ScaleUp(DetectorFamily[ScaleUpParams]):
    """Scaled prediction consistency (black-box hard labels)."""

    Params = ScaleUpParams
    components = (MAIN,)
    extra_columns = ("spc",)
    access = "black-box hard labels; len(scales) forwards per input (+ a few clean images per class, data-limited)"
    detects = frozenset({"patch"})

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        """Clean per-class SPC statistics (used only by ``standardize: class``)."""
        from bdx_study.training import predict_proba

        x = ctx.clean.x
        pred = predict_proba(ctx.model, x, device=ctx.device).argmax(1)
        spc = scaled_consistency(ctx.model, x, pred, self.params.scales, ctx.device)
        floor = 0.5 / len(self.params.scales)
        c = ctx.info.num_classes
        mean = torch.full((c,), float(spc.mean()) if len(spc) else 0.0)
        std = torch.full((c,), max(float(spc.std()) if len(spc) > 1 else 0.0, floor))
        for k in range(c):
            s = spc[pred == k]
            if len(s) >= 2:
                mean[k], std[k] = float(s.mean()), max(float(s.std()), floor)
        return Fitted(
            {"class_mean": mean, "class_std": std}, {"clean_spc_mean": float(spc.mean()) if len(spc) else 0.0}
        )

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        spc = scaled_consistency(model, x, pred, self.params.scales, device)
        p = pred.long()
        return {"spc": spc, "spc_class_z": (spc - fitted.tensors["class_mean"][p]) / fitted.tensors["class_std"][p]}

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return feats["spc_class_z"] if self.params.standardize == "class" else feats["spc"]

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        return {"spc": feats["spc"]}
