"""IBD-PSC (Hou et al., ICML 2024), per ../shared/reference/detectors.md.

Parameter-oriented scaling consistency. Amplifying the affine parameters (weight and bias) of a
network's last BatchNorm layers wrecks its clean predictions long before it disturbs a backdoor:
a triggered input keeps its (target) class with high confidence under amplification, a clean one
does not.

- **BN layers**: every affine BatchNorm module of M (1-, 2- or 3-d), in ``named_modules`` order,
  counted from the last: "the last m layers" are the m BN modules nearest the output.
- **Fit** (calibration on clean data only: the finetune part of D_c, with its labels): for
  m = 1, 2, ..., L (L = the number of BN layers), the error of M with the last m BN layers' weight
  and bias multiplied by ``psc_bn_scale``; the start count k is the smallest m whose error exceeds
  ``psc_xi``. The fitted state is k and that error curve, never copies of the weights.
- **Score**: n = ``psc_num_models`` amplified copies of M, the i-th (i = 0..n-1) with its last
  min(k + i, L) BN layers scaled; PSC(x) = the mean over the n copies of the softmax probability of
  M's predicted class. **High PSC = backdoor.** Cost: n forwards per input (through counted
  copies of the Classifier) + the one-off calibration (up to L forwards per clean image).

Defaults are the toolboxes' (n 5, xi 0.6, scale 1.5). Where we deviate from the peer code
(BackdoorBox / backdoor-toolbox ``IBD_PSC``):
- the peers select k with the last k layers scaled but then score with the last k+1 .. k+n (an
  off-by-one); we score with k .. k+n-1 as the paper describes;
- the peers count only ``BatchNorm2d`` and try m = 1 .. L-1; we count every affine BN layer and
  try m = 1 .. L;
- when no m reaches an error above xi (a shallow or amplification-robust network) the peers fail
  (the start index is None); we use the n counts that end at L, k = max(1, L - n + 1), so the
  copies still span the deepest amplifications (the fitted metadata records
  ``xi_reached: false``);
- as in the peers' code, a copy asked to scale more than L layers scales all L.
A model without affine BatchNorm layers cannot be scaled: fitting raises a ValueError.

Where it fails (measured on planted victims like the contract's: 10% poison, a BadNet patch or
an alpha-0.2 noise Blend; digits as in the contract, Fashion-MNIST with 4,000 training images;
AUROC on correctly classified inputs): on the 4-BN small CNN no amplification at scale 1.5
reaches xi (clean error at most 0.16 on digits, 0.57 on Fashion-MNIST), so the fallback above
applies. A BadNet patch is detected (0.998 digits, 1.000 Fashion-MNIST); the noise-Blend backdoor
is *weakened* by the amplification (triggered inputs lose the target class), so PSC is inverted
(0.09 digits, 0.34 Fashion-MNIST). ``detects`` therefore lists only the patch. Had the fallback
used the single most disruptive count for all n copies, the digits patch AUROC would be 0.75.
On digits ResNet-18 victims (20 BN layers) xi is reached (k = 18 and 20): patch 0.96, Blend
0.25, so the inversion on this Blend is not an artefact of a shallow network.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING

from bdx_study._lazy import LazyModule

from ._base import MAIN, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import register_detector

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
else:
    torch, nn = LazyModule("torch"), LazyModule("torch.nn")


class IbdPscParams(DetectorParams):
    psc_num_models: int = fit_param(MAIN, 5, ge=1, le=64, description="amplified copies of M averaged (paper: n = 5)")
    psc_xi: float = fit_param(
        MAIN, 0.6, gt=0, lt=1, description="clean error the first scaled copy must exceed; picks k (paper: 0.6)"
    )
    psc_bn_scale: float = fit_param(
        MAIN, 1.5, gt=1, le=100, description="factor on the selected BN layers' weight and bias (paper: 1.5)"
    )


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The affine BatchNorm modules of ``model`` in ``named_modules`` order (the last = nearest the
    output)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def scaled_copy(model: nn.Module, last: int, scale: float) -> nn.Module:
    """A copy of ``model`` whose last ``last`` affine BN layers have weight and bias x ``scale``."""
    out = copy.deepcopy(model)
    layers = bn_layers(out)
    with torch.no_grad():
        for bn in layers[len(layers) - last :] if last > 0 else []:
            bn.weight.mul_(scale)
            bn.bias.mul_(scale)
    return out.eval()


def select_start(errors: Tensor, xi: float, n: int) -> tuple[int, bool]:
    """The start count k from the clean errors of m = 1..L scaled layers (``errors[m - 1]``): the
    smallest m with error > ``xi``; if none, the start of the window of ``n`` counts that ends at
    L (every BN layer scaled), max(1, L - n + 1). Returns (k, xi reached)."""
    above = torch.nonzero(errors > xi).flatten()
    if len(above):
        return int(above[0]) + 1, True
    return max(1, len(errors) - n + 1), False


def layer_counts(start: int, n: int, num_layers: int) -> list[int]:
    """How many last BN layers each of the n amplified copies scales: k, k+1, ..., capped at L."""
    return [min(start + i, num_layers) for i in range(n)]


@register_detector("ibd_psc")
class IbdPsc(DetectorFamily[IbdPscParams]):
    """Scaled prediction confidence under amplified BatchNorm parameters (white-box)."""

    Params = IbdPscParams
    components = (MAIN,)
    extra_columns = ("psc",)
    access = "white-box: scales copies of the model's BN parameters; n forwards per input + a one-off clean calibration"
    # The paper reports BadNets and Blended (an image blend) on deep BN networks; on the contract's
    # small CNNs the noise Blend is inverted (see the module docs), so only the patch is claimed.
    detects = frozenset({"patch"})

    def __init__(self, params: DetectorParams) -> None:
        super().__init__(params)
        self._copies: tuple[Fitted, list[nn.Module]] | None = None  # (state, the amplified copies)

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        from bdx_study.training import predict_proba

        num = len(bn_layers(ctx.model))
        if num == 0:
            raise ValueError(
                f"ibd_psc scales BatchNorm parameters, but the model ({type(ctx.model).__name__}) has no affine "
                "BatchNorm layer; use an architecture with BatchNorm (e.g. small_cnn, resnet18)"
            )
        clean = ctx.clean
        if len(clean) == 0:
            raise ValueError("ibd_psc calibrates its start layer on clean images; the finetune part of D_c is empty")
        errors = torch.zeros(num, dtype=torch.float64)
        for m in range(1, num + 1):
            net = scaled_copy(ctx.model, m, self.params.psc_bn_scale)
            pred = predict_proba(net, clean.x, device=ctx.device).argmax(1)
            errors[m - 1] = float((pred != clean.y).float().mean())
        start, reached = select_start(errors, self.params.psc_xi, self.params.psc_num_models)
        meta = {"start_layer": start, "bn_layers": num, "xi_reached": reached, "clean_errors": errors.tolist()}
        return Fitted({"start_layer": torch.tensor(start), "clean_errors": errors}, meta)

    def _amplified(self, fitted: Fitted, model: nn.Module, device: torch.device) -> list[nn.Module]:
        """The n amplified copies of M (built once per fitted state, not per batch)."""
        if self._copies is None or self._copies[0] is not fitted:
            num = len(bn_layers(model))
            counts = layer_counts(int(fitted.tensors["start_layer"]), self.params.psc_num_models, num)
            self._copies = (fitted, [scaled_copy(model, m, self.params.psc_bn_scale).to(device) for m in counts])
        return self._copies[1]

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        from bdx_study.training import predict_proba

        idx = pred.long()[:, None]
        conf = [predict_proba(net, x, device=device).gather(1, idx) for net in self._amplified(fitted, model, device)]
        return {"psc_conf": torch.cat(conf, 1)}  # (N, n): each copy's probability of M's class

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return feats["psc_conf"].mean(1)

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        return {"psc": feats["psc_conf"].mean(1)}
