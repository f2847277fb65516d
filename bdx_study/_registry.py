"""A small name -> factory registry, one per family (datasets, architectures, attacks, detectors).

Registered names are what search spaces and YAML files use. A duplicate or unknown name is a loud
error that lists the known ones.

Entries come two ways:

- ``register(name)``: a decorator that stores the object now (attacks, detector families and
  datasets, whose modules import no torch at import time, and user code);
- ``declare(name, module, spec)``: the name is known (listed, ``in``), but its implementation
  module is imported only on the first :meth:`Registry.get`, and that module's own
  ``register(name)`` fills the entry. ``spec`` is what can be known without importing it, read
  with :meth:`Registry.spec`: the architecture catalog uses it (a network module imports torch),
  so that ``bdx-study validate`` stays free of torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """An unknown registry name; the message lists the known ones (a ValueError too, so that
    schema validation reports it like any other bad value)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps registered names to factories of one family (``kind`` names the family in errors)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._modules: dict[str, str] = {}  # declared name -> the module that registers it
        self._specs: dict[str, Any] = {}  # declared name -> what is known without importing it

    def register(self, name: str, module: str | None = None) -> Callable[[T], T]:
        """Decorator storing ``obj`` under ``name``. A declared name may only be registered by
        its declared module (``module``: the caller's ``__name__``), so user code cannot shadow
        a built-in whose module is not imported yet."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            declared = self._modules.get(name)
            if declared is not None and module != declared:
                raise ValueError(f"{self.kind} {name!r} is registered twice: it is built in (module {declared})")
            self._entries[name] = obj
            return obj

        return deco

    def declare(self, name: str, module: str, spec: Any = None) -> None:
        """Make ``name`` known now and import ``module`` (which registers it) on first use."""
        if name in self._entries or name in self._modules:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._modules[name] = module
        if spec is not None:
            self._specs[name] = spec

    def _unknown(self, name: str) -> UnknownNameError:
        return UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def get(self, name: str) -> T:
        if name not in self._entries:
            if name not in self._modules:
                raise self._unknown(name)
            importlib.import_module(self._modules[name])
            if name not in self._entries:
                raise RuntimeError(f"module {self._modules[name]} did not register {self.kind} {name!r}")
        return self._entries[name]

    def require(self, name: str) -> None:
        """Raise :class:`UnknownNameError` (listing the known names) unless ``name`` is known;
        imports nothing."""
        if name not in self:
            raise self._unknown(name)

    def spec(self, name: str) -> Any:
        """The declared spec of ``name`` (None for names registered directly or declared without one)."""
        self.require(name)
        return self._specs.get(name)

    def declared_module(self, name: str) -> str | None:
        """The module that registers declared name ``name`` (None for names registered directly)."""
        return self._modules.get(name)

    def loaded(self, name: str) -> bool:
        """Whether ``name``'s implementation is in memory (always, for names registered directly)."""
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(set(self._entries) | set(self._modules))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._modules
