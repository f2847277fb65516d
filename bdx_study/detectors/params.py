"""The parameter models of the detector families, without torch.

Checking a study file (``bdx-study validate``) needs every family's parameters, never its
implementation: this module holds :class:`DetectorParams` (the base), :func:`fit_param` and each
built-in family's Params, and imports neither torch nor a module that does. The package
(``__init__.py``) declares each family with its Params from here; the family's own module (which
imports torch) sets ``Params`` to the same class and documents what the parameters do.

A family is split into **components**: the parts of it that are fitted (BaDExpert's backdoor
expert and its auxiliary model) or that produce per-input outputs worth keeping (STRIP's
entropies). Each parameter says which components it changes (:func:`fit_param`); the others only
change how the components' outputs are combined into a score. The stage cache
(:mod:`bdx_study.stages`) fits each component once per distinct set of the parameters it
depends on (:meth:`DetectorParams.component_params`, its stage key) and keeps its outputs on the
scored inputs, so scoring-only knobs cost tensor arithmetic only.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bdx_study._config import Precision, RowModel

from ._corruption_tables import corruption_names

FIT_KEY = "fit"  # json_schema_extra key: the components a parameter changes
KEYED_IF_SET = "keyed_if_set"  # json_schema_extra key: the stage key leaves the default out


def fit_param(components: str | tuple[str, ...], default: Any, *, keyed_if_set: bool = False, **kwargs: Any) -> Any:
    """A parameter that changes the fitted state or the outputs of ``components``.

    ``keyed_if_set``: the parameter joins the components' stage key only when it is not at its
    default. For parameters added after stage keys were in use (e.g. ``precision``): the default
    reproduces the old behaviour, so the stages cached before the parameter existed stay valid."""
    names = (components,) if isinstance(components, str) else tuple(components)
    extra: dict[str, Any] = {FIT_KEY: list(names), **({KEYED_IF_SET: True} if keyed_if_set else {})}
    return Field(default, json_schema_extra=extra, **kwargs)


class DetectorParams(RowModel):
    """Parameters shared by every family; subclasses add their own, each with a reason."""

    seed: int = Field(0, description="seed of the detector's random choices (finetuning order, augmentation, pools)")

    @classmethod
    def component_fields(cls, component: str) -> list[str]:
        """The parameters that change ``component``'s fit or outputs (the seed always does)."""
        out = ["seed"]
        for name, f in cls.model_fields.items():
            extra = f.json_schema_extra
            if isinstance(extra, dict) and component in (extra.get(FIT_KEY) or []):  # type: ignore[operator]
                out.append(name)
        return out

    def component_params(self, component: str) -> dict[str, Any]:
        """JSON-ready values of :meth:`component_fields` (what keys a cached component), less the
        ``keyed_if_set`` ones left at their defaults."""
        dumped = self.model_dump(mode="json")
        out = {}
        for k in self.component_fields(component):
            f = type(self).model_fields[k]
            extra = f.json_schema_extra
            if isinstance(extra, dict) and extra.get(KEYED_IF_SET) and getattr(self, k) == f.default:
                continue
            out[k] = dumped[k]
        return out

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


# Inputs of each kind (clean, triggered) in ``FitContext.probe``: 128 give an accuracy to about
# +-4 points; the whole selection split (thousands of inputs on Fashion-MNIST) made B's unlearning
# curve cost more than the fit it describes.
PROBE_INPUTS = 128

MAIN = "main"  # the component of a single-component family (DetectorFamily.components' default)


# Each family's Params, under its registered name (= its module, which documents the parameters).


# ------------------------------------------------------------------------------------ badexpert


EXPERT, AUX = "expert", "auxiliary"
ScoreKind = Literal["ensemble", "expert", "auxiliary"]


class BaDExpertParams(DetectorParams):
    """BaDExpert's hyperparameters. Defaults: the paper's CIFAR-10 ResNet-18 values."""

    unlearn_lr: float = fit_param(EXPERT, 1e-4, gt=0, le=10, description="Adam lr of the backdoor expert (paper: 1e-4)")
    unlearn_epochs: int = fit_param(EXPERT, 1, ge=1, description="epochs of mislabeled finetuning (paper: 1)")
    unlearn_steps: int | None = fit_param(
        EXPERT,
        None,
        ge=1,
        description="cap on the expert's optimizer steps (ends finetuning early); null = epochs only",
    )
    unlearn_batch_size: int = fit_param(
        EXPERT, 128, ge=1, description="batch size of the expert's finetuning (paper: 128)"
    )
    unlearn_early_stop_acc: float | None = fit_param(
        EXPERT, None, gt=0, le=1, description="stop B once its held-out clean accuracy < this (paper: 0.2); null = off"
    )
    unlearn_early_stop_every: Literal["step", "epoch"] = fit_param(
        EXPERT, "step", description="when the early stop is checked: after every step, or per epoch (the reference)"
    )
    unlearn_milestones: tuple[int, ...] = fit_param(
        EXPERT, (), description="epochs after which B's lr x0.1 (the reference: [1] for ResNet-18 when epochs > 1)"
    )
    unlearn_lr_mode: Literal["fixed", "calibrated"] = fit_param(
        EXPERT,
        "fixed",
        description="fixed: unlearn_lr; calibrated: the smallest lr in unlearn_lr_range whose B falls to "
        "unlearn_target_acc on held-out clean data (a line search, no per-architecture lr)",
    )
    unlearn_lr_range: tuple[float, float] = fit_param(
        EXPERT, (1e-5, 1e-2), description="calibrated mode: the lrs searched (13 log-spaced points, bisected)"
    )
    unlearn_target_acc: float | None = fit_param(
        EXPERT,
        None,
        gt=0,
        le=1,
        description="calibrated mode: held-out clean accuracy B must fall to; null = 2 / classes (0.2 on 10: the "
        "paper's early-stop bound)",
    )
    unlearn_curve_points: int = fit_param(
        EXPERT,
        0,
        keyed_if_set=True,
        ge=0,
        le=1000,
        description=f"B's unlearning curve, a diagnostic: its clean accuracy and attack success on {PROBE_INPUTS} "
        f"clean and {PROBE_INPUTS} triggered selection inputs at the start, the end and every 1/N of its steps "
        "(logged per trial, plotted by analyze); 0 = off (on, it costs about a fifth of B's fit on the quickstart)",
    )
    aux_lr: float = fit_param(AUX, 0.1, gt=0, le=10, description="first SGD lr of M' (paper: 0.1, deliberately large)")
    aux_epochs: int = fit_param(AUX, 10, ge=1, description="epochs of the auxiliary model's finetuning (paper: 10)")
    aux_milestones: tuple[int, ...] = fit_param(AUX, (2, 4, 6, 8), description="epochs at which the auxiliary lr x0.1")
    aux_batch_size: int = fit_param(AUX, 64, ge=1, description="batch size of the auxiliary finetuning (paper: 64)")
    aux_momentum: float = fit_param(AUX, 0.9, ge=0, lt=1, description="Nesterov momentum of the auxiliary SGD")
    aux_weight_decay: float = fit_param(AUX, 1e-4, ge=0, le=1, description="weight decay of the auxiliary SGD")
    augment: bool = fit_param(
        (EXPERT, AUX), True, description="training augmentation while finetuning B and M' (paper: on)"
    )
    # How the finetuning arithmetic of B and the auxiliary model runs (see TrainingConfig: two independent knobs).
    # Both change the fitted weights, so they key both components' stages, but only when set:
    # stages cached before these parameters existed were fitted in fp32, contiguous layout.
    precision: Precision = fit_param(
        (EXPERT, AUX),
        "fp32",
        keyed_if_set=True,
        description="finetuning of B and M': fp32, or bf16 (forward pass and loss under bf16 autocast)",
    )
    channels_last: bool = fit_param(
        (EXPERT, AUX),
        False,
        keyed_if_set=True,
        description="finetuning of B and M': weights and batches in channels_last layout",
    )
    score_kind: ScoreKind = Field("ensemble", description="which score flags inputs (paper: ensemble)")
    ensemble_alpha: float = Field(2.0, gt=0, le=1e6, description="ensemble weight alpha (paper: 2 for ResNet-18)")
    ensemble_beta: float = Field(0.5, gt=0, le=1, description="ensemble weight beta (paper: 0.5 for ResNet-18)")

    @model_validator(mode="after")
    def _lr_range(self) -> BaDExpertParams:
        lo, hi = self.unlearn_lr_range
        if not 0 < lo < hi <= 10:
            raise ValueError(f"unlearn_lr_range must be 0 < low < high <= 10, got {list(self.unlearn_lr_range)}")
        return self

    @model_validator(mode="after")
    def _milestones_sorted(self) -> BaDExpertParams:
        for name in ("aux_milestones", "unlearn_milestones"):
            m = list(getattr(self, name))
            if m != sorted(set(m)) or any(e < 1 for e in m):
                raise ValueError(f"{name} must be increasing epochs >= 1, got {m}")
        return self


# ------------------------------------------------------------------------------------ cognitive_distillation


class CognitiveDistillationParams(DetectorParams):
    cd_steps: int = fit_param(MAIN, 100, ge=1, le=10_000, description="Adam steps of each mask (paper: 100)")
    cd_lr: float = fit_param(MAIN, 0.1, gt=0, le=10, description="Adam lr on the tanh-parameterised mask (paper: 0.1)")
    cd_gamma: float = fit_param(MAIN, 0.01, ge=0, le=100, description="weight of the mask's L1 norm (paper: 0.01)")
    cd_beta: float = fit_param(
        MAIN, 1.0, ge=0, le=1000, description="weight of the mask's total variation (paper: 1; BackdoorBench: 10)"
    )


# ------------------------------------------------------------------------------------ frequency


SyntheticTrigger = Literal["solid_patch", "noise_patch", "gaussian_noise", "shadow", "image_blend", "smooth"]
ALL_TRIGGERS: tuple[SyntheticTrigger, ...] = (
    "solid_patch",
    "noise_patch",
    "gaussian_noise",
    "shadow",
    "image_blend",
    "smooth",
)


class FrequencyParams(DetectorParams):
    freq_triggers: tuple[SyntheticTrigger, ...] = fit_param(
        MAIN, ALL_TRIGGERS, min_length=1, description="synthetic trigger kinds the CNN learns from (see the docs)"
    )
    freq_epochs: int = fit_param(MAIN, 30, ge=1, le=10_000, description="epochs over the clean + synthetic pairs")
    freq_lr: float = fit_param(MAIN, 1e-3, gt=0, le=1, description="Adam learning rate of the DCT classifier")
    freq_batch_size: int = fit_param(MAIN, 64, ge=2, description="batch size (paper: 64)")
    freq_width: int = fit_param(
        MAIN, 16, ge=1, le=256, description="channels of the first stage (x1, x2, x4; paper 32; 16 fits a CPU)"
    )
    freq_score: Literal["prob_diff", "logit"] = Field(
        "prob_diff", description="prob_diff: p(poison) - p(clean) (paper); logit: same ranking, never saturates"
    )

    @field_validator("freq_triggers")
    @classmethod
    def _distinct(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"freq_triggers lists a kind twice: {list(v)}")
        return v


# ------------------------------------------------------------------------------------ ibd_psc


class IbdPscParams(DetectorParams):
    psc_num_models: int = fit_param(MAIN, 5, ge=1, le=64, description="amplified copies of M averaged (paper: n = 5)")
    psc_xi: float = fit_param(
        MAIN, 0.6, gt=0, lt=1, description="clean error the first scaled copy must exceed; picks k (paper: 0.6)"
    )
    psc_bn_scale: float = fit_param(
        MAIN, 1.5, gt=1, le=100, description="factor on the selected BN layers' weight and bias (paper: 1.5)"
    )


# ------------------------------------------------------------------------------------ scale_up


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


# ------------------------------------------------------------------------------------ sentinet


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


# ------------------------------------------------------------------------------------ strip


class StripParams(DetectorParams):
    num_images: int = fit_param(MAIN, 64, ge=1, le=1024, description="clean images superimposed on each input (N)")
    superimpose: Literal["blend", "add"] = fit_param(
        MAIN, "blend", description="blend: (1-w) x + w c (TrojanZoo, ART); add: clip(x + w c) (backdoor-toolbox)"
    )
    weight: float = fit_param(MAIN, 0.5, gt=0, le=1, description="weight w of the clean image (blend 0.5, add 1.0)")


# ------------------------------------------------------------------------------------ teco


# The imagecorruptions package's corruption types (its own order); the torch backend's: corruption_names().
LIBRARY_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)
LIBRARY_DEFAULT = LIBRARY_CORRUPTIONS[:15]  # the ImageNet-C benchmark set ("common")


class TecoParams(DetectorParams):
    teco_corruptions: tuple[str, ...] | None = fit_param(
        MAIN,
        None,
        min_length=2,
        max_length=32,
        description="corruption types; null = all that apply to the input shape (see the module docs)",
    )
    teco_backend: Literal["torch", "imagecorruptions"] = fit_param(
        MAIN, "torch", description="torch: ours, any size, batched; imagecorruptions: the reference package, >= 32x32"
    )
    teco_severity_table: Literal["imagenet_c", "cifar10_c"] = fit_param(
        MAIN,
        "imagenet_c",
        description="severity settings: imagenet_c as the peers apply them to CIFAR-10; cifar10_c milder (torch only)",
    )

    @model_validator(mode="after")
    def _known_names(self) -> TecoParams:
        known = corruption_names() if self.teco_backend == "torch" else list(LIBRARY_CORRUPTIONS)
        names = self.teco_corruptions or ()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown {self.teco_backend} corruptions {unknown}; known: {', '.join(known)}")
        if len(set(names)) != len(names):
            raise ValueError(f"teco_corruptions lists a corruption twice: {list(names)}")
        if self.teco_backend == "imagecorruptions" and self.teco_severity_table != "imagenet_c":
            raise ValueError("the imagecorruptions package has only its own (imagenet_c) severity table")
        return self


# ------------------------------------------------------------------------------------ ted


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


# ------------------------------------------------------------------------------------ committee


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
        from bdx_study.detectors import DETECTORS, detector_params  # the registry imports this module

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
        from bdx_study.detectors import detector_params

        return detector_params(name).model_validate({**self.members[name], "seed": self.seed})
