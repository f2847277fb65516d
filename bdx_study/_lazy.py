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
