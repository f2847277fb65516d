"""Input-level backdoor detectors (a registry of families), per ../shared/reference/detectors.md.

Every family implements the contract of :class:`DetectorFamily` (see ``_base.py``) and is
registered under the name study files use::

    @register_detector("strip")
    class Strip(DetectorFamily): ...

Adding a family is one new module in this package plus its import below; trials, tracking,
analysis and bundles only talk to the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bdx_study._registry import Registry

from ._base import PROBE_INPUTS, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param

DETECTORS: Registry[type[DetectorFamily[Any]]] = Registry("detector family")


def register_detector(name: str) -> Callable[[type[DetectorFamily[Any]]], type[DetectorFamily[Any]]]:
    def deco(cls: type[DetectorFamily[Any]]) -> type[DetectorFamily[Any]]:
        cls.name = name
        for fname, f in cls.Params.model_fields.items():
            if not f.description:
                raise TypeError(f"detector family {name!r}: parameter {fname!r} needs a description (its reason)")
        for comp in cls.components:
            if not cls.Params.component_fields(comp):
                raise TypeError(f"detector family {name!r}: component {comp!r} has no parameters")
        return DETECTORS.register(name)(cls)

    return deco


def create_detector(name: str, params: dict[str, Any] | DetectorParams | None = None) -> DetectorFamily[Any]:
    """Build family ``name``; ``params`` are validated by its Params model (unknown keys fail)."""
    cls = DETECTORS.get(name)
    if not isinstance(params, DetectorParams):
        params = cls.Params.model_validate(params or {})
    return cls(params)


def list_detectors() -> list[str]:
    return DETECTORS.names()


# Registration: one import per family module.
from . import (  # noqa: E402,F401
    badexpert,
    cognitive_distillation,
    frequency,
    ibd_psc,
    scale_up,
    sentinet,
    strip,
    teco,
    ted,
)

__all__ = [
    "DETECTORS",
    "PROBE_INPUTS",
    "DetectorFamily",
    "DetectorParams",
    "FitContext",
    "Fitted",
    "create_detector",
    "fit_param",
    "list_detectors",
    "register_detector",
]
