"""Input-level backdoor detectors (a registry of families), per ../shared/reference/detectors.md.

Every family implements the contract of :class:`DetectorFamily` (``_base.py``) and lives in one
module of this package, its parameter model next to its class, registered under the name study
files use::

    class StripParams(DetectorParams):
        num_images: int = fit_param(MAIN, 64, ge=1, le=1024, description="clean images superimposed (N)")

    @register_detector("strip")
    class Strip(DetectorFamily[StripParams]):
        Params = StripParams
        ...

Importing this package imports every public module of it (each registers its family) and no
torch: family modules use torch inside their methods only (``bdx_study._lazy.LazyModule``; a
network class lives in a private helper module imported when needed), so ``bdx-study validate``
reads every family's parameters without it.

Adding a family: one new module here. Trials, tracking, analysis and bundles only talk to the
registry.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._base import MAIN, PROBE_INPUTS, DetectorFamily, DetectorParams, FitContext, Fitted, fit_param
from ._registry import DETECTORS, create_detector, detector_params, list_detectors, register_detector


def _import_families() -> None:
    """Import every public module of this package: each registers its family (private modules,
    ``_name.py``, are helpers)."""
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_import_families()


__all__ = [
    "DETECTORS",
    "MAIN",
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
