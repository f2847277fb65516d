"""The contract every input-level backdoor detector family implements.

A family (a subclass of :class:`DetectorFamily`, registered by name) turns a possibly backdoored
classifier M and the defender's clean data into one continuous score per input, higher = more
suspicious. The shared evaluation protocol (:mod:`bdx_study.protocol`) calibrates the threshold
and computes every metric, the same way for every family.

A family is split into **components**: the parts of it that are fitted (BaDExpert's backdoor
expert and its auxiliary model) or that produce per-input outputs worth keeping (STRIP's
entropies). Each parameter says which components it changes (:func:`fit_param`); the others only
change how the components' outputs are combined into a score. The stage cache
(:mod:`bdx_study.stages`) fits each component once per distinct set of the parameters it
depends on (:meth:`DetectorParams.component_params`, its stage key) and keeps its outputs on the
scored inputs, so scoring-only knobs cost tensor arithmetic only.

This module imports no torch (``bdx-study validate`` checks study files against the families'
parameter models without it): torch types appear in annotations only.

The life of a component, called in this order:

1. :meth:`DetectorFamily.fit` on the model and the defender's clean finetune data, returning
   its fitted state (tensors saved as safetensors, plus JSON metadata); a component with nothing
   to fit returns an empty state;
2. :meth:`DetectorFamily.features` on a batch of pixel-space inputs: named per-input tensors
   (first dimension = the batch);
3. :meth:`DetectorFamily.score` combines the features of all components into one float per
   input; :meth:`DetectorFamily.extras` returns per-input values worth a column in the per-sample
   table (e.g. BaDExpert's ``expert_conf``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from pydantic import Field

from bdx_study._config import RowModel

if TYPE_CHECKING:
    import torch
    from matplotlib.axes import Axes
    from torch import Tensor, nn

    from bdx_study.data import DatasetInfo, ImageData

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


@dataclass
class Fitted:
    """A fitted component: tensors (saved as safetensors) and JSON-ready metadata."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FitContext:
    """What a component is fitted on: only the defender's clean data, never evaluation data."""

    model: nn.Module  # M, in eval() mode on ``device``; never modified (copy it to finetune)
    clean: ImageData  # the finetune part of the defender's clean set D_c, pixels in [0, 1]
    holdout: ImageData  # the calibration part of D_c: only for recipes that early-stop on held-out clean data
    info: DatasetInfo  # shape, classes and training augmentation of the dataset
    device: torch.device
    # Diagnostics only, never to decide anything: clean and triggered selection inputs (labels =
    # true class / attack label; PROBE_INPUTS of each) on which a family may record curves,
    # e.g. B's unlearning curve.
    probe: tuple[ImageData, ImageData] | None = None


P = TypeVar("P", bound=DetectorParams)


class DetectorFamily(ABC, Generic[P]):
    """One detector family with fixed parameters (``self.params``, typed by the subclass:
    ``class Strip(DetectorFamily[StripParams])``). Subclasses set :attr:`Params` and implement
    :meth:`fit`, :meth:`features` and :meth:`score`; the registry sets :attr:`name`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[DetectorParams]] = DetectorParams
    components: ClassVar[tuple[str, ...]] = (MAIN,)
    extra_columns: ClassVar[tuple[str, ...]] = ()  # per-sample table columns returned by extras()
    diagnostics: ClassVar[tuple[str, ...]] = ()  # per-split figures returned by diagnose()
    # Bump when fit() or features() change what they compute: cached components are keyed by it.
    version: ClassVar[int] = 1
    access: ClassVar[str] = ""  # what the defender needs, e.g. "white-box finetuning + clean data"
    # Planted triggers the literature says this family detects (contract tests check the direction
    # of its scores on a tiny model with such a trigger): a subset of {"patch", "blend"}.
    detects: ClassVar[frozenset[str]] = frozenset()
    # Features read M's layer activations (_activations.layer_activations): served, they come from
    # M's own forward pass, run once for the prediction and for them (TED).
    uses_activations: ClassVar[bool] = False

    def __init__(self, params: DetectorParams) -> None:
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} takes {self.Params.__name__}, got {type(params).__name__}")
        self.params: P = cast(P, params)

    @abstractmethod
    def fit(self, component: str, ctx: FitContext) -> Fitted:
        """Fit ``component`` on the defender's clean data (``ctx``); return its state."""

    @abstractmethod
    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        """Per-input outputs of a fitted component on ``x`` (N, C, H, W) in [0, 1], where
        ``pred`` = argmax M(x); CPU tensors whose first dimension is N."""

    @abstractmethod
    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        """One float per input from the features of every component; higher = more suspicious."""

    def extras(self, feats: Mapping[str, Tensor], pred: Tensor) -> dict[str, Tensor]:
        """Per-input values kept in the per-sample table, named as in :attr:`extra_columns`."""
        return {}

    # -- hooks a family of families (the committee) overrides; the defaults fit an ordinary family

    def fitted_components(self) -> tuple[str, ...]:
        """The components this instance fits and scores with: :attr:`components` (a committee's
        depend on its members)."""
        return self.components

    def stage_of(self, component: str) -> tuple[DetectorFamily[Any], str, str]:
        """(family, its component, prefix of its feature names) that fits and caches ``component``
        in the stage cache: the family itself. A committee hands a member's component to the
        member, so both share one cached fit under the member's own key."""
        return self, component, ""

    @classmethod
    def schema_columns(cls) -> tuple[str, ...]:
        """Every per-sample column an instance may return from :meth:`extras` (the Parquet schema
        declares them): :attr:`extra_columns`."""
        return cls.extra_columns

    @property
    def reference_fraction(self) -> float:
        """Share of the correctly classified calibration inputs that :meth:`fit_reference` uses to
        put the score on its scale; the threshold is calibrated on the others only. 0: the score
        needs no reference, and the threshold sees every calibration input."""
        return 0.0

    def fit_reference(self, feats: Mapping[str, Tensor], pred: Tensor) -> Fitted:
        """State the score needs from clean reference inputs (their features and M's predictions)."""
        return Fitted()

    def with_reference(self, reference: Fitted) -> DetectorFamily[Any]:
        """This family scoring against ``reference`` (from :meth:`fit_reference`)."""
        return self

    def flagged_by(self, extras: Mapping[str, Any], threshold: float) -> dict[str, Any]:
        """Per-input booleans saying which part of the detector flagged each input (a committee:
        each member on its own), from :meth:`extras` and the threshold; {} = the score as a whole."""
        return {}

    def diagnose(
        self, clean: Mapping[str, Tensor], clean_label: Tensor, triggered: Mapping[str, Tensor], attack_label: Tensor
    ) -> dict[str, float]:
        """Per-split figures about the detector itself (named as in :attr:`diagnostics`)."""
        return {}

    def plot_panel(self, ax: Axes, samples: Mapping[str, Any], threshold: float) -> bool:
        """Draw one victim's evaluation inputs in the family's own view; False = use the
        generic score histogram."""
        return False
