"""Architectures (a registry with per-entry metadata): every model takes [0, 1] pixel inputs
and normalizes inside (:class:`Classifier`); every entry declares the input shapes it accepts.

The registry, the metadata and the :data:`BodyFactory` type are torch-free
(:mod:`bdx_study.archs._base`, the built-ins declared in :mod:`bdx_study.archs._catalog`); the
models (:class:`Classifier`, :func:`create_model`, :func:`penultimate_layer`) are imported with torch on
first use of one of those names, and each implementation module on the first build of one of
its architectures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bdx_study._lazy import lazy_exports
from bdx_study.archs import _catalog  # noqa: F401  (declares the built-in architectures)
from bdx_study.archs._base import (
    ARCHITECTURES,
    ArchSpec,
    BodyFactory,
    architecture_spec,
    check_input_shape,
    declare_architecture,
    list_architectures,
    register_architecture,
    register_body,
)

if TYPE_CHECKING:
    from bdx_study.archs._model import Classifier, create_model, penultimate_layer

# Names served by the torch layer, imported on first access (PEP 562).
_TORCH_NAMES = frozenset({"Classifier", "create_model", "penultimate_layer"})


# the torch names on first use; the model modules too (``bdx_study.archs.resnet``)
__getattr__ = lazy_exports(
    __name__,
    dict.fromkeys(_TORCH_NAMES, "bdx_study.archs._model"),
    submodules={ARCHITECTURES.declared_module(n).rpartition(".")[2] for n in ARCHITECTURES.names()},  # type: ignore[union-attr]
)


__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "BodyFactory",
    "Classifier",
    "architecture_spec",
    "check_input_shape",
    "create_model",
    "declare_architecture",
    "list_architectures",
    "penultimate_layer",
    "register_architecture",
    "register_body",
]
