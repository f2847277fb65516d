"""Names a package exports but imports on first use (PEP 562), so that importing the package
stays light: the registries' packages serve their torch classes this way, and ``bdx-study
validate`` never imports torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str], submodules: Iterable[str] = ()) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``where[name]`` (a module path) the
    first time ``name`` is read and keeps the value in the package's namespace; a name in
    ``submodules`` is the package's submodule of that name, imported when first read."""
    subs = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in subs:
            return importlib.import_module(f"{package}.{name}")  # the import binds it in the package
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(importlib.import_module(package), name, value)
        return value

    return __getattr__


class LazyModule:
    """A module imported on its first attribute read: ``torch = LazyModule("torch")`` at the top of
    a registry entry's module keeps that module importable without torch (what ``validate``
    needs) while its methods use ``torch.zeros``, ``F.relu`` and the rest as usual. Nothing is
    put in ``sys.modules`` until then. Type checkers see the real module through the
    ``if TYPE_CHECKING: import torch`` / ``else: torch = LazyModule("torch")`` idiom."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: Any = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):  # copy, pickle and doctest probes
            raise AttributeError(attr)
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        state = "imported" if self._module is not None else "not imported yet"
        return f"<lazy module {self._name!r} ({state})>"
