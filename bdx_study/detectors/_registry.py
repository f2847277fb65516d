"""The registry of detector families: names as study files use them, each mapped to its class.

A family's module registers its class with ``@register_detector("name")`` when it is imported;
the package imports every public module of ``bdx_study/detectors`` (the built-in families), and
a user's module registers its own families the same way. Family modules import no torch at
import time, so filling the registry and reading every family's parameter model stays torch-free
(``bdx-study validate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bdx_study._registry import Registry

from ._base import DetectorFamily, DetectorParams

DETECTORS: Registry[type[DetectorFamily[Any]]] = Registry("detector family")


def register_detector(name: str) -> Callable[[type[DetectorFamily[Any]]], type[DetectorFamily[Any]]]:
    """Register a family class under ``name``. Every parameter needs a description (its reason),
    and every component a parameter; a name already registered (a built-in included) is refused."""

    def deco(cls: type[DetectorFamily[Any]]) -> type[DetectorFamily[Any]]:
        for fname, f in cls.Params.model_fields.items():
            if not f.description:
                raise TypeError(f"detector family {name!r}: parameter {fname!r} needs a description (its reason)")
        for comp in cls.components:
            if not cls.Params.component_fields(comp):
                raise TypeError(f"detector family {name!r}: component {comp!r} has no parameters")
        DETECTORS.register(name)(cls)
        cls.name = name
        return cls

    return deco


def detector_params(name: str) -> type[DetectorParams]:
    """Family ``name``'s parameter model (torch-free). An unknown name raises, listing the known ones."""
    return DETECTORS.get(name).Params


def create_detector(name: str, params: dict[str, Any] | DetectorParams | None = None) -> DetectorFamily[Any]:
    """Build family ``name``; ``params`` are validated by its Params model (unknown keys fail)."""
    cls = DETECTORS.get(name)
    if not isinstance(params, DetectorParams):
        params = cls.Params.model_validate(params or {})
    return cls(params)


def list_detectors() -> list[str]:
    return DETECTORS.names()
