"""The architecture contract, torch-free: a registry of entries with per-entry metadata (as
timm's default_cfgs) and the input-shape check.

Built-in architectures are *declared* (:mod:`bdx_study.archs._catalog`: name, accepted input
shapes, description; no torch) and their implementation modules attach only
the body factory (:func:`register_body`), imported on the first :attr:`ArchSpec.build`.
:func:`register_architecture` registers a user architecture (factory and metadata) at once.
The models themselves (:class:`~bdx_study.archs.Classifier`, ``create_model``) live in
:mod:`bdx_study.archs._model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bdx_study._registry import Registry

if TYPE_CHECKING:
    from torch import nn

Shape = tuple[int, int, int]  # (C, H, W)
BodyFactory = Callable[[int, int, tuple[int, int]], "nn.Module"]  # (in_channels, classes, (H, W)) -> logits net


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: its metadata and (:attr:`build`) its body factory.

    A declared architecture's spec carries no factory: :attr:`build` imports the implementation
    module (and torch) on first use."""

    name: str
    input_shapes: tuple[Shape, ...]  # every (C, H, W) it accepts; anything else is refused
    description: str
    factory: BodyFactory | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def build(self) -> BodyFactory:
        """The body factory (in_channels, classes, (H, W)) -> logits network."""
        if self.factory is not None:
            return self.factory
        factory = ARCHITECTURES.get(self.name).factory  # imports the implementation module
        if factory is None:
            raise RuntimeError(f"architecture {self.name!r} was registered without a body factory")
        return factory


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")


def _shapes(input_shapes: Sequence[Sequence[int]]) -> tuple[Shape, ...]:
    out = []
    for s in input_shapes:
        c, h, w = (int(v) for v in s)
        out.append((c, h, w))
    return tuple(out)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def declare_architecture(
    name: str,
    module: str,
    *,
    input_shapes: Sequence[Sequence[int]],
    description: str,
) -> ArchSpec:
    """Declare architecture ``name`` with its metadata; ``module`` (imported on first use)
    attaches the body factory with :func:`register_body`. Returns the declared spec."""
    spec = ArchSpec(name, _shapes(input_shapes), _one_line(description))
    ARCHITECTURES.declare(name, module, spec)
    return spec


def register_body(name: str) -> Callable[[BodyFactory], BodyFactory]:
    """Decorator for the implementation module of a declared architecture: attach its body
    factory (the metadata stays in the declaration)."""

    def deco(fn: BodyFactory) -> BodyFactory:
        declared = ARCHITECTURES.spec(name)  # UnknownNameError when not declared at all
        if not isinstance(declared, ArchSpec):
            raise ValueError(f"architecture {name!r} is not declared with its metadata; use register_architecture")
        ARCHITECTURES.register(name, fn.__module__)(dataclasses.replace(declared, factory=fn))
        return fn

    return deco


def register_architecture(
    name: str,
    *,
    input_shapes: Sequence[Sequence[int]],
    description: str | None = None,
) -> Callable[[BodyFactory], BodyFactory]:
    """Decorator: register a body factory with the shapes it accepts (the description, when not
    given, is the factory's docstring)."""

    def deco(fn: BodyFactory) -> BodyFactory:
        if name in ARCHITECTURES:  # declared names too: their module would register them again
            raise ValueError(f"architecture {name!r} is registered twice")
        doc = _one_line(fn.__doc__ or "") if description is None else _one_line(description)
        ARCHITECTURES.register(name)(ArchSpec(name, _shapes(input_shapes), doc, factory=fn))
        return fn

    return deco


def architecture_spec(name: str) -> ArchSpec:
    """The spec of architecture ``name``, without importing its implementation (a declared
    architecture's :attr:`ArchSpec.build` imports it)."""
    if ARCHITECTURES.loaded(name):
        return ARCHITECTURES.get(name)
    declared = ARCHITECTURES.spec(name)  # UnknownNameError for unknown names
    return declared if isinstance(declared, ArchSpec) else ARCHITECTURES.get(name)


def list_architectures() -> list[str]:
    return ARCHITECTURES.names()


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_input_shape(name: str, shape: Sequence[int]) -> None:
    """Raise ValueError unless architecture ``name`` accepts inputs of ``shape`` (C, H, W)."""
    spec = architecture_spec(name)
    if tuple(int(s) for s in shape) not in spec.input_shapes:
        raise ValueError(
            f"architecture {name!r} does not accept inputs of shape {_fmt(shape)} (C x H x W); "
            f"it accepts {', '.join(_fmt(s) for s in spec.input_shapes)}"
        )
