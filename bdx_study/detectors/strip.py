"""STRIP (Gao et al., ACSAC 2019), per ../shared/reference/detectors.md.

Superimpose each input with N clean images and average the Shannon entropy of the model's
softmax over the N blends: a trigger that dominates the prediction keeps it confident whatever
it is mixed with, so **low entropy = backdoor**; the score is the negated mean entropy.

The N clean images are drawn once (seeded) from the defender's clean finetune data and used for
every input, so the detector is deterministic given its fitted state. Two ways to superimpose:
``blend``: (1 - w) x + w c, the convex blend of TrojanZoo, BackdoorBench and ART (w = 0.5);
``add``: clip(x + w c, 0, 1), backdoor-toolbox's additive form (w = 1).
Cost: N forward passes per input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from bdx_study._lazy import LazyModule

from ._base import MAIN, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import register_detector

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
else:
    torch = LazyModule("torch")


class StripParams(DetectorParams):
    num_images: int = fit_param(MAIN, 64, ge=1, le=1024, description="clean images superimposed on each input (N)")
    superimpose: Literal["blend", "add"] = fit_param(
        MAIN, "blend", description="blend: (1-w) x + w c (TrojanZoo, ART); add: clip(x + w c) (backdoor-toolbox)"
    )
    weight: float = fit_param(MAIN, 0.5, gt=0, le=1, description="weight w of the clean image (blend 0.5, add 1.0)")


def superimpose(x: Tensor, pool: Tensor, mode: str, weight: float) -> Tensor:
    """Every input of ``x`` (B, C, H, W) with every image of ``pool`` (N, C, H, W): (B * N, C, H, W),
    input-major, in [0, 1]."""
    xb, pb = x[:, None], pool[None]
    out = (1.0 - weight) * xb + weight * pb if mode == "blend" else (xb + weight * pb).clamp(0.0, 1.0)
    return out.reshape(-1, *x.shape[1:])


def mean_entropy(probs: Tensor, n: int) -> Tensor:
    """Shannon entropy (nats) of each row of ``probs`` (B * N, classes), averaged over groups of n."""
    ent = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return ent.view(-1, n).mean(1)


@register_detector("strip")
class Strip(DetectorFamily[StripParams]):
    """Entropy of the model's predictions on superimposed inputs (black-box soft labels + clean pool)."""

    Params = StripParams
    components = (MAIN,)
    extra_columns = ("entropy",)
    access = "black-box soft labels + a pool of clean images; N forwards per input"
    detects = frozenset({"patch"})

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        n, pool = self.params.num_images, ctx.clean
        if len(pool) == 0:
            raise ValueError("strip needs clean images to superimpose; the finetune part of D_c is empty")
        gen = torch.Generator().manual_seed(self.params.seed)
        if n <= len(pool):
            idx = torch.randperm(len(pool), generator=gen)[:n]
        else:  # fewer clean images than requested: draw with replacement
            idx = torch.randint(0, len(pool), (n,), generator=gen)
        return Fitted({"pool": pool.x[idx].contiguous()}, {"pool_size": len(pool)})

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        from bdx_study.training import predict_proba

        pool = fitted.tensors["pool"].to(device)
        n = len(pool)
        chunk = max(1, 4096 // n)
        out = []
        for i in range(0, len(x), chunk):
            blends = superimpose(x[i : i + chunk].to(device), pool, self.params.superimpose, self.params.weight)
            out.append(mean_entropy(predict_proba(model, blends, device=device), n))
        return {"entropy": torch.cat(out) if out else torch.empty(0)}

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return -feats["entropy"]

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        return {"entropy": feats["entropy"]}
