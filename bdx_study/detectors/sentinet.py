"""SentiNet (Chou et al., IEEE SPW 2020), per ../shared/reference/detectors.md.

A localized trigger is both *salient* for the model and *transferable*: pasted onto other images
it takes their prediction over. For an input x with prediction y = argmax M(x):

1. **Mask** (from the model itself, never from trigger locations): Grad-CAM of y at the **last
   ``nn.Conv2d`` of the network** in module order (small_cnn: its 4th conv; ResNet-18: the last
   block's second conv), upsampled bilinearly to the input size; the mask is the top
   ``sentinet_mask_fraction`` of pixels (exactly round(q H W) of them, q = 15%).
2. **fooled**: the region of x under the mask pasted onto each of N clean images (drawn once,
   seeded, from the defender's clean finetune data); ``fooled`` = the share of those whose
   prediction *becomes* y, among the pool images not already predicted y.
3. **avgconf**: the same region of each pool image replaced by an inert pattern, uniform noise
   (one fixed, seeded noise image per pool image); ``avgconf`` = the mean top-class confidence.
4. **Boundary**, fitted on clean inputs of the defender's finetune data (up to
   ``sentinet_fit_size``, each probed against the pool without itself): bin their avgconf in
   bins of ``sentinet_bin_width``, keep the highest fooled of every non-empty bin (at the bin's
   centre), and fit a quadratic by least squares to these upper-envelope points (a line or a
   constant with fewer than 3 bins). Outside the clean avgconf range the boundary is held at its
   edge value rather than extrapolated.
5. **Score** = signed Euclidean distance of (avgconf, fooled) to the boundary curve, positive
   above it: **higher = more suspicious**.

Cost per input: 1 forward + 1 backward (Grad-CAM) + 2N forwards.

Where this deviates from the peers:
- backdoor-toolbox pastes **oracle trigger boxes** for badnet/trojan/TaCT/dynamic/adaptive_patch
  triggered inputs; here every input, clean or triggered, gets the model's own Grad-CAM mask;
- the toolbox counts every pool image predicted y as fooled (including those already of class
  y); here only pool images whose prediction changes to y count (the paper's "fooled");
- the toolbox fits its envelope with empty bins as points at fooled = 0 and extrapolates the
  quadratic; here only non-empty bins are fitted and the curve is held flat outside the range;
- the toolbox draws fresh inert noise per input; here the noise is fixed at fit time, so scores
  are deterministic;
- the paper's class proposals (selective search) and mask subtraction are not implemented: one
  Grad-CAM mask of the predicted class, as in backdoor-toolbox and BackdoorBench.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from bdx_study._lazy import LazyModule

from ._base import MAIN, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import register_detector

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from matplotlib.axes import Axes
    from torch import Tensor, nn
else:
    torch, nn, F = LazyModule("torch"), LazyModule("torch.nn"), LazyModule("torch.nn.functional")


class SentiNetParams(DetectorParams):
    sentinet_num_images: int = fit_param(
        MAIN, 100, ge=2, le=4096, description="clean images the salient region is pasted onto (N; toolbox: 100)"
    )
    sentinet_mask_fraction: float = fit_param(
        MAIN, 0.15, gt=0, lt=1, description="share of pixels in the Grad-CAM mask (paper and toolbox: top 15%)"
    )
    sentinet_fit_size: int = fit_param(
        MAIN, 400, ge=3, description="clean finetune inputs the boundary is fitted on, at most (toolbox: 400)"
    )
    sentinet_bin_width: float = fit_param(
        MAIN, 0.02, gt=0, le=0.5, description="avgconf bin width of the upper envelope (toolbox: 0.02)"
    )


COMPOSITES_PER_CHUNK = 4096  # pasted images built at once (memory bound, not a result knob)
DISTANCE_GRID = 2049  # points per input of the nearest-point search along the boundary


# ------------------------------------------------------------------------------------ pure maths


def last_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The last ``nn.Conv2d`` of ``model`` in module order (the Grad-CAM layer) and its name."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not found:
        raise ValueError("sentinet needs a convolutional network: the model has no nn.Conv2d for Grad-CAM")
    return found[-1]


def gradcam(model: nn.Module, x: Tensor, pred: Tensor, layer: nn.Module) -> Tensor:
    """Grad-CAM of class ``pred`` at ``layer``, (N, H, W) at the input's resolution, >= 0.

    One forward and one backward of the batch; no gradient is left on the model's parameters."""
    acts: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: acts.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
            chosen = logits.gather(1, pred[:, None].long().to(logits.device)).sum()
            (grad,) = torch.autograd.grad(chosen, [acts[-1]])
    finally:
        handle.remove()
    act = acts[-1].detach()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * act).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)


def top_mask(cam: Tensor, fraction: float) -> Tensor:
    """(N, 1, H, W) binary masks of the round(fraction * H * W) highest pixels of each map."""
    n, h, w = cam.shape
    k = min(h * w, max(1, round(fraction * h * w)))
    idx = cam.reshape(n, -1).topk(k, dim=1).indices
    return torch.zeros(n, h * w, device=cam.device).scatter_(1, idx, 1.0).view(n, 1, h, w)


def probe(
    model: nn.Module, x: Tensor, pred: Tensor, mask: Tensor, pool: Tensor, noise: Tensor, device: torch.device
) -> tuple[Tensor, Tensor]:
    """For every input i and pool image j: ``hit[i, j]`` = x_i's masked region pasted onto pool_j
    is predicted ``pred[i]``; ``conf[i, j]`` = top-class confidence of pool_j with that region
    replaced by noise_j. Both (N, len(pool)); 2 N len(pool) forwards."""
    from bdx_study.training import predict_proba

    n, m = len(x), len(pool)
    keep = 1.0 - mask[:, None]  # (n, 1, 1, H, W)
    pasted = pool[None] * keep + x[:, None] * mask[:, None]
    inert = pool[None] * keep + noise[None] * mask[:, None]
    shape = (n * m, *x.shape[1:])
    hit = predict_proba(model, pasted.reshape(shape), device=device).argmax(1).view(n, m) == pred.cpu()[:, None]
    conf = predict_proba(model, inert.reshape(shape), device=device).amax(1).view(n, m)
    return hit, conf


def aggregate(
    hit: Tensor, conf: Tensor, pred: Tensor, pool_pred: Tensor, exclude: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(fooled, avgconf) per input: fooled = share of hits among pool images not already predicted
    ``pred`` (0 when there are none); avgconf = mean confidence. ``exclude`` (N, len(pool)) drops
    pairs (an input probed against itself)."""
    use = torch.ones_like(hit) if exclude is None else ~exclude
    changeable = use & (pool_pred[None, :] != pred[:, None])
    fooled = (hit & changeable).sum(1) / changeable.sum(1).clamp_min(1)
    avgconf = (conf * use).sum(1) / use.sum(1).clamp_min(1)
    return fooled.float(), avgconf.float()


def fit_envelope(avgconf: Tensor, fooled: Tensor, bin_width: float) -> tuple[Tensor, Tensor, int]:
    """Quadratic least-squares fit to the upper envelope of clean (avgconf, fooled): the highest
    fooled of every non-empty avgconf bin, at the bin centre. Returns (coefficients c0, c1, c2 of
    c0 + c1 a + c2 a^2, float64), the fitted avgconf range (lo, hi) and the number of bins."""
    a, f = avgconf.double().numpy(), fooled.double().numpy()
    lo, hi = float(a.min()), float(a.max())
    k = np.floor((a - lo) / bin_width).astype(np.int64)
    xs, ys = [], []
    for b in np.unique(k):
        xs.append(lo + (b + 0.5) * bin_width)
        ys.append(float(f[k == b].max()))
    deg = min(2, len(xs) - 1)
    coef = np.zeros(3)
    coef[: deg + 1] = np.polynomial.polynomial.polyfit(np.array(xs), np.array(ys), deg) if deg > 0 else ys[0]
    return torch.tensor(coef, dtype=torch.float64), torch.tensor([lo, hi], dtype=torch.float64), len(xs)


def boundary(avgconf: Tensor, coef: Tensor, span: Tensor) -> Tensor:
    """The boundary's fooled at ``avgconf``: the quadratic, held flat outside ``span`` = (lo, hi)."""
    a = avgconf.double().clamp(float(span[0]), float(span[1]))
    return coef[0] + coef[1] * a + coef[2] * a * a


def signed_distance(avgconf: Tensor, fooled: Tensor, coef: Tensor, span: Tensor) -> Tensor:
    """Euclidean distance of each (avgconf, fooled) to the boundary curve, positive above it.

    The nearest curve point lies within the vertical gap v of the point horizontally, so each
    point searches a grid of ``DISTANCE_GRID`` abscissae over [a - v, a + v]."""
    a, f = avgconf.double(), fooled.double()
    gap = f - boundary(a, coef, span)
    steps = torch.linspace(-1.0, 1.0, DISTANCE_GRID, dtype=torch.float64)[None]
    dist = torch.empty_like(a)
    for i in range(0, len(a), 1024):  # bounded memory: 1024 x DISTANCE_GRID at a time
        ai, fi, gi = a[i : i + 1024, None], f[i : i + 1024, None], gap[i : i + 1024, None]
        t = ai + gi.abs() * steps
        dist[i : i + 1024] = ((t - ai) ** 2 + (boundary(t, coef, span) - fi) ** 2).sqrt().amin(1)
    return torch.sign(gap) * dist


# ------------------------------------------------------------------------------------ the family


@register_detector("sentinet")
class SentiNet(DetectorFamily[SentiNetParams]):
    """Transferability of the Grad-CAM-salient region (white-box gradients + clean pool)."""

    Params = SentiNetParams
    components = (MAIN,)
    extra_columns = ("sentinet_fooled", "sentinet_avgconf", "sentinet_boundary")
    access = (
        "white-box gradients (Grad-CAM at the last Conv2d) + N clean images; "
        "1 forward + 1 backward + 2N forwards per input"
    )
    detects = frozenset({"patch"})

    def _probe_all(
        self, model: nn.Module, x: Tensor, pred: Tensor, fitted: Fitted, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """(hit, conf) of :func:`probe` for every input, in chunks of the composite budget."""
        layer = last_conv(model)[1]
        pool, noise = fitted.tensors["pool"].to(device), fitted.tensors["noise"].to(device)
        chunk = max(1, COMPOSITES_PER_CHUNK // len(pool))
        hits, confs = [], []
        for i in range(0, len(x), chunk):
            xb, pb = x[i : i + chunk].to(device), pred[i : i + chunk]
            mask = top_mask(gradcam(model, xb, pb, layer), self.params.sentinet_mask_fraction)
            h, c = probe(model, xb, pb, mask, pool, noise, device)
            hits.append(h)
            confs.append(c)
        m = len(pool)
        if not hits:
            return torch.zeros(0, m, dtype=torch.bool), torch.zeros(0, m)
        return torch.cat(hits), torch.cat(confs)

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        """Draw the pool and its inert noise, probe clean finetune inputs, fit the boundary."""
        from bdx_study.training import predict_proba

        clean, n = ctx.clean, self.params.sentinet_num_images
        if len(clean) < 3:
            raise ValueError(f"sentinet needs at least 3 clean finetune images, got {len(clean)}")
        gen = torch.Generator().manual_seed(self.params.seed)
        if n <= len(clean):
            pool_idx = torch.randperm(len(clean), generator=gen)[:n]
        else:  # fewer clean images than requested: draw with replacement
            pool_idx = torch.randint(0, len(clean), (n,), generator=gen)
        pool = clean.x[pool_idx].contiguous()
        noise = torch.rand(pool.shape, generator=gen)
        fit_idx = torch.randperm(len(clean), generator=gen)[: self.params.sentinet_fit_size]
        pool_pred = predict_proba(ctx.model, pool, device=ctx.device).argmax(1)
        x = clean.x[fit_idx]
        pred = predict_proba(ctx.model, x, device=ctx.device).argmax(1)
        state = Fitted({"pool": pool, "noise": noise, "pool_pred": pool_pred})
        hit, conf = self._probe_all(ctx.model, x, pred, state, ctx.device)
        fooled, avgconf = aggregate(hit, conf, pred, pool_pred, exclude=fit_idx[:, None] == pool_idx[None, :])
        coef, span, bins = fit_envelope(avgconf, fooled, self.params.sentinet_bin_width)
        state.tensors.update(
            {"coef": coef, "span": span, "fit_avgconf": avgconf.contiguous(), "fit_fooled": fooled.contiguous()}
        )
        state.meta.update({"layer": last_conv(ctx.model)[0], "envelope_bins": bins, "fit_inputs": len(x)})
        return state

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        hit, conf = self._probe_all(model, x, pred, fitted, device)
        fooled, avgconf = aggregate(hit, conf, pred.cpu(), fitted.tensors["pool_pred"])
        coef, span = fitted.tensors["coef"], fitted.tensors["span"]
        return {
            "sentinet_fooled": fooled,
            "sentinet_avgconf": avgconf,
            "sentinet_boundary": boundary(avgconf, coef, span),
            "sentinet_distance": signed_distance(avgconf, fooled, coef, span),
        }

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return feats["sentinet_distance"]

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        return {k: feats[k] for k in self.extra_columns}

    def plot_panel(self, ax: Axes, samples: Mapping[str, Any], threshold: float) -> bool:
        """The (avgconf, fooled) plane with the fitted boundary (inputs far above it are flagged)."""
        for triggered, color, label in ((False, "tab:blue", "clean"), (True, "tab:red", "triggered")):
            sel = samples["triggered"] == triggered
            ax.scatter(
                samples["sentinet_avgconf"][sel], samples["sentinet_fooled"][sel], s=4, alpha=0.5, c=color, label=label
            )
        order = np.argsort(samples["sentinet_avgconf"])
        ax.plot(samples["sentinet_avgconf"][order], samples["sentinet_boundary"][order], "k-", linewidth=1)
        ax.set_xlabel("avgconf (inert pattern)")
        ax.set_ylabel("fooled")
        ax.set_ylim(-0.02, 1.02)
        return True
