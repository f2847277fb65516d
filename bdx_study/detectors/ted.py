"""TED, topological evolution dynamics (Mo et al., IEEE S&P 2024; arXiv 2312.02673), per
../shared/reference/detectors.md.

A clean input stays among its own class as it flows through the network; a triggered input
starts among its true class and jumps to the target class late. TED measures that path with
nearest-neighbour ranks against a small clean pool, layer by layer.

- **Layers**: the output of every convolution and fully connected layer (``nn.Conv1d/2d/3d``,
  ``nn.Linear``) of M, in the order they run (found by hooks on a forward pass, so no
  per-architecture list: small_cnn gives 6 layers, 4 conv + 2 linear; the CIFAR ResNet-18 gives
  21, shortcut convolutions included). The last one is the logits layer.
- **Pool**: up to ``ted_pool_per_class`` images per class from the finetune part of D_c, the
  first ones (in a seeded order) that M classifies correctly, so a pool image's class is both its
  label and M's prediction.
- **Distance**: ``euclidean`` (default) on each layer's flattened activation, or ``cosine``
  (Euclidean on unit-normalized activations). No per-layer normalization is needed: a rank
  within one layer does not change when that layer's activations are scaled, and layers meet only
  through ranks.
- **Rank**: for an input x with predicted class y, at each layer, order the pool by distance to
  x (nearest first); the rank is the 0-based position of the first pool image of class y (the
  pool size if the pool has none). Pool images are ranked leave-one-out (without themselves).
  The vector of ranks over the layers is x's topological evolution.
- **Outlier model**, fitted on the pool's own rank vectors: each layer's ranks standardized by
  the pool's mean and standard deviation (floored at one rank), then PCA.
  ``reconstruction`` (the authors'): squared error of the reconstruction from the leading
  components that explain ``ted_pca_variance`` of the variance; ``mahalanobis``: the squared
  whitened norm over all components (each variance floored at 1e-2), which also flags unusual
  values along the leading components. **High = backdoor.**

Cost: one forward per input (with hooks; served, it is M's own forward, shared with the
prediction: ``_activations.model_pass``) plus a nearest-neighbour search against the pool at
every layer; the pool's activations are computed once per fitted state (pool-size forwards).
Measured on planted victims like the contract's (10% poison; AUROC on correctly classified
inputs): BadNet patch 0.999 and alpha-0.2 noise Blend 0.997 on the digits small CNN, 0.97 and
0.955 on a Fashion-MNIST small CNN (4,000 training images), patch 1.000 on a digits ResNet-18.

Deviations from the authors' code: the layer set above is fixed by a rule (conv + linear
outputs) rather than chosen per network, and the outlier model is our own PCA in torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from bdx_study._lazy import LazyModule

from ._activations import ACTIVATION_BATCH, layer_activations
from ._base import MAIN, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import register_detector

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor, nn
else:
    torch, F = LazyModule("torch"), LazyModule("torch.nn.functional")


class TedParams(DetectorParams):
    ted_pool_per_class: int = fit_param(
        MAIN, 20, ge=2, le=1000, description="clean pool images per class, from the finetune part of D_c (paper: ~20)"
    )
    ted_distance: Literal["euclidean", "cosine"] = fit_param(
        MAIN, "euclidean", description="distance between flattened activations of one layer"
    )
    ted_pca_variance: float = fit_param(
        MAIN, 0.95, gt=0, lt=1, description="share of the pool's rank variance the reconstruction keeps"
    )
    ted_outlier_score: Literal["reconstruction", "mahalanobis"] = Field(
        "reconstruction", description="reconstruction: PCA residual (the authors'); mahalanobis: whitened norm"
    )


RANK_STD_FLOOR = 1.0  # ranks are integers: never standardize by less than one rank
VARIANCE_FLOOR = 1e-2  # of a standardized principal component, for the whitened (Mahalanobis) score


# ------------------------------------------------------------------------------------ pure maths


def pairwise_distance(a: Tensor, b: Tensor, kind: str) -> Tensor:
    """Distances (A, B) between the rows of ``a`` and ``b``."""
    if kind == "cosine":
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return torch.cdist(a, b)


def first_class_rank(dist: Tensor, pool_labels: Tensor, cls: Tensor) -> Tensor:
    """For each row of ``dist`` (N, P), the 0-based position, in the pool ordered by distance
    (nearest first), of the first pool entry whose label is ``cls[row]``; P if there is none.
    Infinite distances (an excluded entry) sort last and never count."""
    order = torch.argsort(dist, dim=1, stable=True)
    hit = (pool_labels[order] == cls[:, None]) & torch.isfinite(dist.gather(1, order))
    p = dist.shape[1]
    pos = torch.arange(p, device=dist.device).expand_as(order)
    return torch.where(hit, pos, torch.full_like(pos, p)).min(1).values


def rank_vectors(
    acts: list[Tensor],
    pool_acts: list[Tensor],
    pool_labels: Tensor,
    cls: Tensor,
    kind: str,
    exclude: Tensor | None = None,
) -> Tensor:
    """Ranks (N, layers) of inputs of class ``cls`` against the pool, layer by layer;
    ``exclude[i] = j`` leaves pool entry j out of input i's ranking (-1: none)."""
    out = []
    for a, pa in zip(acts, pool_acts, strict=True):
        d = pairwise_distance(a, pa, kind)
        if exclude is not None:
            rows = torch.nonzero(exclude >= 0).flatten()
            d[rows, exclude[rows]] = float("inf")
        out.append(first_class_rank(d, pool_labels, cls))
    return torch.stack(out, 1).float() if out else torch.zeros(len(cls), 0)


def fit_outlier_model(ranks: Tensor, keep_variance: float) -> dict[str, Tensor]:
    """Standardization and PCA of the pool's rank vectors (P, L), in float64."""
    r = ranks.double()
    mean = r.mean(0)
    std = r.std(0, unbiased=False).clamp_min(RANK_STD_FLOOR)
    z = (r - mean) / std
    cov = z.T @ z / max(len(z) - 1, 1)
    eigval, eigvec = torch.linalg.eigh(cov)  # ascending
    eigval, eigvec = eigval.flip(0).clamp_min(0), eigvec.flip(1)
    share = eigval.cumsum(0) / eigval.sum().clamp_min(1e-12)
    k = int(torch.searchsorted(share, torch.tensor(keep_variance, dtype=share.dtype))) + 1
    k = min(k, len(eigval))
    return {"mean": mean, "std": std, "components": eigvec, "variances": eigval, "kept": torch.tensor(k)}


def outlier_scores(ranks: Tensor, model: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(reconstruction error, whitened squared norm) of rank vectors (N, L) under ``model``."""
    z = (ranks.double() - model["mean"]) / model["std"]
    proj = z @ model["components"]
    k = int(model["kept"])
    recon = (z - proj[:, :k] @ model["components"][:, :k].T).pow(2).sum(1)
    maha = (proj.pow(2) / model["variances"].clamp_min(VARIANCE_FLOOR)).sum(1)
    return recon.float(), maha.float()


# ------------------------------------------------------------------------------------ the family


def choose_pool(y: Tensor, pred: Tensor, per_class: int, num_classes: int, seed: int) -> Tensor:
    """Indices of up to ``per_class`` correctly classified images per class, in a seeded order."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    picked: list[Tensor] = []
    for c in range(num_classes):
        ok = order[(y[order] == c) & (pred[order] == c)]
        picked.append(ok[:per_class])
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)


@register_detector("ted")
class Ted(DetectorFamily[TedParams]):
    """Nearest-neighbour rank evolution across layers + a PCA outlier score (white-box activations)."""

    Params = TedParams
    components = (MAIN,)
    extra_columns = ("ted_outlier",)
    access = (
        "white-box: layer activations + ~20 clean images per class; 1 forward per input with hooks "
        "+ a nearest-neighbour search against the pool at every layer"
    )
    detects = frozenset({"patch", "blend"})
    uses_activations = True  # served in M's own forward pass (model_pass): one forward per input, not two
    CHUNK = ACTIVATION_BATCH  # inputs whose activations are held at once (ResNet-18 on 32x32: ~0.3 GB)

    def __init__(self, params: DetectorParams) -> None:
        super().__init__(params)
        self._pool: tuple[Fitted, list[Tensor]] | None = None  # (state, the pool's activations)

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        from bdx_study.training import predict_proba

        clean = ctx.clean
        pred = predict_proba(ctx.model, clean.x, device=ctx.device).argmax(1)
        idx = choose_pool(clean.y, pred, self.params.ted_pool_per_class, ctx.info.num_classes, self.params.seed)
        if len(idx) < 3:
            raise ValueError(
                f"ted needs a clean pool; only {len(idx)} correctly classified images in the finetune part of D_c"
            )
        x, y = clean.x[idx].contiguous(), clean.y[idx].contiguous()
        acts = layer_activations(ctx.model, x, ctx.device)
        self_index = torch.arange(len(y), device=ctx.device)
        ranks = rank_vectors(acts, acts, y.to(ctx.device), y.to(ctx.device), self.params.ted_distance, self_index).cpu()
        outlier = fit_outlier_model(ranks, self.params.ted_pca_variance)
        meta = {"pool_size": len(y), "layers": ranks.shape[1], "components_kept": int(outlier["kept"])}
        return Fitted({"pool_x": x, "pool_y": y, "pool_ranks": ranks, **outlier}, meta)

    def _pool_acts(self, fitted: Fitted, model: nn.Module, device: torch.device) -> list[Tensor]:
        """The pool's activations (computed once per fitted state, not per batch)."""
        if self._pool is None or self._pool[0] is not fitted:
            self._pool = (fitted, layer_activations(model, fitted.tensors["pool_x"], device))
        return self._pool[1]

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        t = fitted.tensors
        layers = t["pool_ranks"].shape[1]
        if len(x) == 0:
            return {"ted_ranks": torch.zeros(0, layers), "ted_recon": torch.zeros(0), "ted_maha": torch.zeros(0)}
        pool_acts = self._pool_acts(fitted, model, device)
        pool_y = t["pool_y"].to(device)
        ranks = []
        for i in range(0, len(x), self.CHUNK):
            acts = layer_activations(model, x[i : i + self.CHUNK], device)
            cls = pred[i : i + self.CHUNK].to(device)
            ranks.append(rank_vectors(acts, pool_acts, pool_y, cls, self.params.ted_distance).cpu())
        r = torch.cat(ranks)
        recon, maha = outlier_scores(r, t)
        return {"ted_ranks": r, "ted_recon": recon, "ted_maha": maha}

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return feats["ted_recon"] if self.params.ted_outlier_score == "reconstruction" else feats["ted_maha"]

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        return {"ted_outlier": self.score(feats, pred)}
