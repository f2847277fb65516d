"""Input-level backdoor detectors (a registry of families), per ../shared/reference/detectors.md.

Every family implements the contract of :class:`DetectorFamily` (see ``_base.py``) and is
registered under the name study files use::

    @register_detector("strip")
    class Strip(DetectorFamily[StripParams]): ...

Importing this package imports no torch (``bdx-study validate`` checks study files without it).
The built-in families are *declared* below, each with its module and its parameter model
(``params.py``, torch-free): :func:`detector_params` and :func:`list_detectors` need no family
module, and a family's module (which imports torch) is imported on the first
``DETECTORS.get(name)`` or :func:`create_detector`. ``DetectorFamily``, ``FitContext`` and
``Fitted`` import ``_base.py`` (torch) when first asked for.

Adding a family: its Params in ``params.py``, its module in this package, and its ``declare`` line
below; trials, tracking, analysis and bundles only talk to the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from bdx_study._lazy import lazy_exports
from bdx_study._registry import Registry

from .params import (
    PROBE_INPUTS,
    BaDExpertParams,
    CognitiveDistillationParams,
    CommitteeParams,
    DetectorParams,
    FrequencyParams,
    IbdPscParams,
    ScaleUpParams,
    SentiNetParams,
    StripParams,
    TecoParams,
    TedParams,
    fit_param,
)

if TYPE_CHECKING:
    from ._base import DetectorFamily, FitContext, Fitted

DETECTORS: Registry[type[DetectorFamily[Any]]] = Registry("detector family")


def register_detector(name: str) -> Callable[[type[DetectorFamily[Any]]], type[DetectorFamily[Any]]]:
    """Register a family class under ``name``. Every parameter needs a description (its reason),
    every component a parameter, and a declared family the Params it was declared with."""

    def deco(cls: type[DetectorFamily[Any]]) -> type[DetectorFamily[Any]]:
        declared = DETECTORS.spec(name) if DETECTORS.declared_module(name) == cls.__module__ else None
        if declared is not None and cls.Params is not declared:
            raise TypeError(
                f"detector family {name!r}: {cls.__name__}.Params is {cls.Params.__module__}.{cls.Params.__qualname__},"
                f" but {name!r} is declared with {declared.__module__}.{declared.__qualname__} (what validation "
                "checks study files against); set Params to it"
            )
        for fname, f in cls.Params.model_fields.items():
            if not f.description:
                raise TypeError(f"detector family {name!r}: parameter {fname!r} needs a description (its reason)")
        for comp in cls.components:
            if not cls.Params.component_fields(comp):
                raise TypeError(f"detector family {name!r}: component {comp!r} has no parameters")
        DETECTORS.register(name, cls.__module__)(cls)  # a user's class may not shadow a built-in
        cls.name = name
        return cls

    return deco


def detector_params(name: str) -> type[DetectorParams]:
    """Family ``name``'s parameter model: the declared one (no family module, no torch), else that of
    the registered class (a user family). An unknown name raises, listing the known ones."""
    declared = DETECTORS.spec(name)
    return cast("type[DetectorParams]", declared) if declared is not None else DETECTORS.get(name).Params


def create_detector(name: str, params: dict[str, Any] | DetectorParams | None = None) -> DetectorFamily[Any]:
    """Build family ``name`` (importing its module); ``params`` are validated by its Params model
    (unknown keys fail)."""
    cls = DETECTORS.get(name)
    if not isinstance(params, DetectorParams):
        params = cls.Params.model_validate(params or {})
    return cls(params)


def list_detectors() -> list[str]:
    return DETECTORS.names()


# The built-in families: name, the module that registers it, its parameter model.
DETECTORS.declare("badexpert", f"{__name__}.badexpert", BaDExpertParams)
DETECTORS.declare("committee", f"{__name__}.committee", CommitteeParams)
DETECTORS.declare("cognitive_distillation", f"{__name__}.cognitive_distillation", CognitiveDistillationParams)
DETECTORS.declare("frequency", f"{__name__}.frequency", FrequencyParams)
DETECTORS.declare("ibd_psc", f"{__name__}.ibd_psc", IbdPscParams)
DETECTORS.declare("scale_up", f"{__name__}.scale_up", ScaleUpParams)
DETECTORS.declare("sentinet", f"{__name__}.sentinet", SentiNetParams)
DETECTORS.declare("strip", f"{__name__}.strip", StripParams)
DETECTORS.declare("teco", f"{__name__}.teco", TecoParams)
DETECTORS.declare("ted", f"{__name__}.ted", TedParams)

_FROM_BASE = ("DetectorFamily", "FitContext", "Fitted")  # they import torch: loaded on first use


# the torch classes on first use; the family modules too (``bdx_study.detectors.strip``)
__getattr__ = lazy_exports(
    __name__,
    dict.fromkeys(_FROM_BASE, f"{__name__}._base"),
    submodules={DETECTORS.declared_module(n).rpartition(".")[2] for n in DETECTORS.names()},  # type: ignore[union-attr]
)


__all__ = [
    "DETECTORS",
    "PROBE_INPUTS",
    "DetectorFamily",
    "DetectorParams",
    "FitContext",
    "Fitted",
    "create_detector",
    "detector_params",
    "fit_param",
    "list_detectors",
    "register_detector",
]
