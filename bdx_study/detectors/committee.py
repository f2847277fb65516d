"""A committee of detector families: several registered families judge every input, and their
verdicts are combined into one score under the shared protocol.

No single family holds on every backdoor (docs/detectors.md: BaDExpert has the best mean over the
zoo's attacks but is weakest on dynamic, Blend and SIG; TED's weak attacks are others). A
committee lets the study search and pick a combination on evidence, as it picks any family.

**Members.** Each member is a registered family with its own parameters, fitted and scored
exactly as on its own: its components are fitted and cached in the stage cache under the
member's own keys (the committee's seed is every member's seed), so a committee refits nothing
a member's trial already fitted, and changing only how members are combined costs tensor
arithmetic.

**A common scale.** Member scores live on unrelated scales (BaDExpert's ensemble score, TED's
PCA residual). Each is mapped to its *clean tail probability*: among the member's scores on the
reference images (a share, ``reference_fraction``, of the correctly classified calibration
images of D_c; never fitted on, never evaluated on), the share at or above the input's score,
``p(s) = c(s) / (m + 1)`` where ``c`` counts the m reference scores >= s, interpolated linearly
between distinct reference values and continued beyond the largest by an exponential tail (its
scale is the mean excess of the top 10% of reference scores, at least 5) and below the smallest
towards m + 1. ``p`` is a continuous, strictly decreasing function of the member's score: a
rank against clean inputs that, unlike a raw rank, does not tie every input beyond the largest
reference score (that would tie strong triggers with the rarest clean inputs and cap the TPR at
a low FPR). A committee of one member ranks inputs as that member does.

**Combination rules** (``combine``; weights ``w`` >= 0 normalized to sum 1, a member of weight 0
ignored). Each score is higher = more suspicious:

- ``min_p`` (default): ``max_k [log w_k - log p_k]``, the weighted Bonferroni statistic: the
  member most surprised by the input decides. A member blind to a trigger (p uniform), or
  inverted on it (triggered inputs look cleaner than clean ones), cannot hide what another member
  sees; that is the point of a committee.
- ``fisher``: ``sum_k w_k (-log p_k)``: pools evidence, so triggers that several members each see
  weakly add up; a blind member dilutes it.
- ``stouffer``: ``sum_k w_k z_k / ||w||`` with ``z_k`` the standard-normal quantile of
  ``1 - p_k``: pools like Fisher but lets one extreme member count less.

**The threshold** is calibrated by the protocol like every family's, on the calibration images
that did *not* reference the scales: the combined score is then a fixed function of an input
(given the finetune data and the reference images), and the threshold images are exchangeable
with clean test inputs, so the conformal guarantee (FPR <= target in expectation) holds for any
rule and any weights, searched ones included (docs/protocol.md). No correction for several
members is needed: the rule only orders inputs.

**Per input** (``extras``): each member's ``p_<member>`` and ``evidence_<member>`` (its term in
the combined score, in the score's units), and the members' own extras. ``flagged_by`` says which
members flag an input on their own (evidence above the threshold): under ``min_p`` an input is
flagged exactly when one of them does; the pooling rules can flag an input that no member flags
alone.

Cost: the sum of the members' (M's own forward pass counted once).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from bdx_study._lazy import LazyModule

from ._base import DetectorFamily, DetectorParams, FitContext, Fitted
from ._registry import DETECTORS, create_detector, detector_params, register_detector

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn
else:
    torch = LazyModule("torch")


COMMITTEE = "committee"
MIN_REFERENCE = 10  # clean reference images a member's scale needs, at the fewest
CombineRule = Literal["min_p", "fisher", "stouffer"]


class CommitteeParams(DetectorParams):
    """A committee of registered families (``committee.py`` documents the scale and the rules).
    Members are keyed by family name; each member's parameters are that family's own (validated
    by its Params), less ``seed``: every member takes the committee's seed, so a refit reseeds
    them all and a committee shares fitted components with its members' own trials."""

    members: dict[str, dict[str, Any]] = Field(
        min_length=2,
        description="member families and their parameters ({family: {param: value}}; {} = the family's defaults)",
    )
    combine: CombineRule = Field(
        "min_p",
        description="min_p: the most suspicious member decides (weighted Bonferroni); fisher: sum of weighted "
        "-log p (pools evidence); stouffer: weighted sum of normal quantiles",
    )
    weights: dict[str, float] | None = Field(
        None,
        description="members' weights (>= 0, not all 0; a member not named weighs 1; normalized to sum 1); "
        "null = equal weights",
    )
    reference_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="share of the correctly classified calibration images that put each member's score on its "
        "clean scale; the threshold is calibrated on the rest (disjoint, so its FPR guarantee holds)",
    )

    @field_validator("members", mode="before")
    @classmethod
    def _names_to_members(cls, v: Any) -> Any:
        """``[badexpert, ted]``: members at their defaults; a name listed twice is refused."""
        if not isinstance(v, list):
            return v
        if not all(isinstance(n, str) for n in v):
            raise ValueError("members: a list of family names, or a mapping {family: {param: value}}")
        repeated = sorted({str(n) for n in v if v.count(n) > 1})
        if repeated:
            raise ValueError(f"member(s) {', '.join(repeated)} listed twice; a committee has each family once")
        return {n: {} for n in v}

    @field_validator("members")
    @classmethod
    def _members(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, params in v.items():
            DETECTORS.require(name)  # unknown: lists the known families
            if issubclass(detector_params(name), CommitteeParams):
                raise ValueError(f"member {name!r}: a committee cannot be a member of a committee")
            if not isinstance(params, dict):
                raise ValueError(f"member {name!r}: its parameters must be a mapping, got {type(params).__name__}")
            if "seed" in params:
                raise ValueError(f"member {name!r}: set `seed` on the committee; every member takes the committee's")
            model = detector_params(name).model_validate(params)
            out[name] = model.model_dump(mode="json", exclude={"seed"})
        return out

    @model_validator(mode="after")
    def _weights(self) -> CommitteeParams:
        if self.weights is None:
            return self
        unknown = sorted(set(self.weights) - set(self.members))
        if unknown:
            raise ValueError(f"weights name {unknown}, which are not members; members: {', '.join(self.members)}")
        negative = {k: w for k, w in self.weights.items() if not w >= 0}
        if negative:
            raise ValueError(f"weights must be >= 0, got {negative}")
        if not any(self.weights.get(m, 1.0) > 0 for m in self.members):
            raise ValueError("weights are all zero: at least one member needs a positive weight")
        return self

    def member_weights(self) -> dict[str, float]:
        """Every member's weight, normalized to sum 1 (a member left out of ``weights`` weighs 1)."""
        given = self.weights
        raw = {m: 1.0 if given is None else given.get(m, 1.0) for m in self.members}
        total = sum(raw.values())
        return {m: w / total for m, w in raw.items()}

    def member_params(self, name: str) -> DetectorParams:
        """Member ``name``'s parameter model, with the committee's seed."""
        return detector_params(name).model_validate({**self.members[name], "seed": self.seed})


TAIL_SHARE = 0.1  # share of the reference scores whose mean excess sets an exponential tail's scale
TAIL_MIN = 5  # ... at least this many
LOG_P_FLOOR = -700.0  # stouffer: exp() of less underflows float64


# ------------------------------------------------------------------------------------ pure maths


def _tail_scale(gaps: Tensor, spread: float) -> float:
    """Mean excess (the exponential tail's maximum-likelihood scale), floored so that ties in the
    reference scores never give a zero scale."""
    scale = float(gaps.mean()) if gaps.numel() else 0.0
    return max(scale, spread * 1e-6, 1e-12)


def log_tail(reference: Tensor, scores: Tensor) -> Tensor:
    """log p(s) of each of ``scores`` against clean ``reference`` scores (m >= 2 values), in
    float64: ``p = c(s) / (m + 1)``, ``c`` the count of reference scores >= s, interpolated between
    distinct reference values and continued by exponential tails (module docs). Continuous and
    strictly decreasing in s; never -inf (the upper tail is computed in log space)."""
    r = reference.double().flatten().sort().values
    m = len(r)
    if m < 2:
        raise ValueError(f"a clean scale needs at least 2 reference scores, got {m}")
    s = scores.double().flatten()
    u, counts = torch.unique_consecutive(r, return_counts=True)
    ge = counts.flip(0).cumsum(0).flip(0).double()  # #{r >= u_j}
    k = min(m - 1, max(TAIL_MIN, math.ceil(TAIL_SHARE * m)))
    spread = float(r[-1] - r[0])
    hi = _tail_scale(r[m - k :] - r[m - k - 1], spread)
    lo = _tail_scale(r[k] - r[:k], spread)

    c = torch.empty_like(s)
    above, below = s > u[-1], s < u[0]
    inside = ~(above | below)
    log_c = torch.empty_like(s)
    log_c[above] = math.log(float(ge[-1])) - (s[above] - u[-1]) / hi
    c[below] = m + 1 - torch.exp(-(u[0] - s[below]) / lo)
    if len(u) == 1:
        c[inside] = float(ge[0])
    else:
        j = (torch.searchsorted(u, s[inside], right=True) - 1).clamp(0, len(u) - 2)
        t = ((s[inside] - u[j]) / (u[j + 1] - u[j])).clamp(0.0, 1.0)
        c[inside] = ge[j] + t * (ge[j + 1] - ge[j])
    log_c[~above] = torch.log(c[~above])
    return (log_c - math.log(m + 1)).reshape(scores.shape)


def combine(log_p: Mapping[str, Tensor], weights: Mapping[str, float], rule: str) -> tuple[Tensor, dict[str, Tensor]]:
    """(combined score, each member's term in it) from members' log tail probabilities; members
    of weight 0 are left out. Higher = more suspicious."""
    used = [m for m, w in weights.items() if w > 0]
    if not used:
        raise ValueError("a committee needs a member of positive weight")
    if rule == "min_p":
        terms = {m: math.log(weights[m]) - log_p[m] for m in used}
        return torch.stack(list(terms.values())).amax(0), terms
    if rule == "fisher":
        terms = {m: weights[m] * -log_p[m] for m in used}
    elif rule == "stouffer":
        norm = math.sqrt(sum(weights[m] ** 2 for m in used))
        terms = {m: weights[m] * -torch.special.ndtri(log_p[m].clamp_min(LOG_P_FLOOR).exp()) / norm for m in used}
    else:
        raise ValueError(f"unknown combination rule {rule!r}; known: min_p, fisher, stouffer")
    return torch.stack(list(terms.values())).sum(0), terms


# ------------------------------------------------------------------------------------ the family


@register_detector(COMMITTEE)
class Committee(DetectorFamily[CommitteeParams]):
    """Several families, each on its own clean-referenced scale, combined by one rule."""

    Params = CommitteeParams
    components = ()  # its members' (fitted_components)
    access = "the union of its members' access; the cost is the sum of theirs"

    def __init__(self, params: DetectorParams) -> None:
        super().__init__(params)
        for name in self.params.members:
            if "." in name or "/" in name:
                raise ValueError(f"committee member {name!r}: a member's family name cannot contain '.' or '/'")
        self.members: dict[str, DetectorFamily[Any]] = {
            m: create_detector(m, self.params.member_params(m)) for m in self.params.members
        }
        self.weights = self.params.member_weights()
        self.reference: Fitted | None = None

    # -- components: the members'

    def fitted_components(self) -> tuple[str, ...]:
        return tuple(f"{m}.{c}" for m, fam in self.members.items() for c in fam.fitted_components())

    def stage_of(self, component: str) -> tuple[DetectorFamily[Any], str, str]:
        member, _, comp = component.partition(".")
        if member not in self.members:
            raise KeyError(f"committee component {component!r}: no member {member!r}")
        return self.members[member], comp, f"{member}/"

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        family, comp, _ = self.stage_of(component)
        return family.fit(comp, ctx)

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        family, comp, prefix = self.stage_of(component)
        return {prefix + k: v for k, v in family.features(comp, fitted, model, x, pred, device).items()}

    def _member_feats(self, feats: Mapping[str, Tensor], member: str) -> dict[str, Tensor]:
        prefix = f"{member}/"
        return {k[len(prefix) :]: v for k, v in feats.items() if k.startswith(prefix)}

    def member_scores(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        """Each member's own score (its scale; higher = more suspicious)."""
        return {m: fam.score(self._member_feats(feats, m), pred).double() for m, fam in self.members.items()}

    # -- the clean scale

    @property
    def reference_fraction(self) -> float:
        return self.params.reference_fraction

    def fit_reference(self, feats: Mapping[str, Tensor], pred: Tensor) -> Fitted:
        scores = self.member_scores(feats, pred)
        n = len(pred)
        if n < MIN_REFERENCE:
            raise ValueError(
                f"the committee's clean scale rests on {n} reference image(s); it needs at least {MIN_REFERENCE}: "
                "calibrate on more images (calibration_fraction / calibration_size) or raise reference_fraction"
            )
        bad = [m for m, s in scores.items() if not bool(torch.isfinite(s).all())]
        if bad:
            raise ValueError(f"committee members {bad} gave non-finite scores on clean reference images")
        return Fitted({m: s.sort().values for m, s in scores.items()}, {"reference_images": n})

    def with_reference(self, reference: Fitted) -> Committee:
        missing = sorted(set(self.members) - set(reference.tensors))
        if missing:
            raise ValueError(f"the committee's reference has no clean scores of member(s) {missing}")
        bound = copy.copy(self)
        bound.reference = reference
        return bound

    def log_tails(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        """Each member's log clean tail probability (its score on the common scale)."""
        if self.reference is None:
            raise RuntimeError("a committee scores against its clean reference: use with_reference(...) first")
        ref = self.reference.tensors
        return {m: log_tail(ref[m], s) for m, s in self.member_scores(feats, pred).items()}

    # -- the score

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        combined, _ = combine(self.log_tails(feats, pred), self.weights, self.params.combine)
        return combined

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        log_p = self.log_tails(feats, pred)
        _, terms = combine(log_p, self.weights, self.params.combine)
        out: dict[str, Tensor] = {}
        for m, fam in self.members.items():
            out.update(fam.extras(self._member_feats(feats, m), pred))
        for m, lp in log_p.items():
            out[f"p_{m}"] = lp.exp()
            out[f"evidence_{m}"] = terms[m] if m in terms else torch.full_like(lp, math.nan)  # weight 0: not counted
        return out

    def flagged_by(self, extras: Mapping[str, Any], threshold: float) -> dict[str, Any]:
        return {
            f"flagged_by_{m}": np.asarray(extras[f"evidence_{m}"], dtype=np.float64) > threshold for m in self.members
        }

    def diagnose(
        self, clean: Mapping[str, Tensor], clean_label: Tensor, triggered: Mapping[str, Tensor], attack_label: Tensor
    ) -> dict[str, float]:
        out: dict[str, float] = {}
        for m, fam in self.members.items():
            out.update(
                fam.diagnose(self._member_feats(clean, m), clean_label, self._member_feats(triggered, m), attack_label)
            )
        return out

    @classmethod
    def schema_columns(cls) -> tuple[str, ...]:
        names = [n for n in DETECTORS.names() if n != COMMITTEE]
        return tuple(f"{k}_{n}" for n in names for k in ("p", "evidence"))
