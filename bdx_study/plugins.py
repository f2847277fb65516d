"""User plugins: modules that register attacks, architectures, datasets or detector families
(with ``register_attack``, ``register_architecture``, ``register_dataset``,
``register_detector``) so that study files can name them.

Two ways in, both loaded before a study file is validated and again in every Ray worker before
it builds anything:

- a study file's ``study.plugins: [my_pkg.my_attacks]``: modules importable where the command
  runs and on every node (installed, or on ``PYTHONPATH``);
- an installed package's entry points in group :data:`ENTRY_POINT_GROUP`, each naming a module
  (``[project.entry-points."bdx_study.plugins"] my_attacks = "my_pkg.my_attacks"``).

A module that fails to import, or registers a name that is already registered, is a
:class:`PluginError` naming the module and the cause.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable

ENTRY_POINT_GROUP = "bdx_study.plugins"
MODULE_NAME = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"  # a dotted module path

_loaded_entry_points: set[str] = set()  # entry point values already loaded in this process
_scanned = False  # every entry point loaded (the scan costs ~20 ms; a study file may be read several times)


class PluginError(ValueError):
    """A plugin module that cannot be loaded; the message names the module and the cause."""


def _cause(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def import_plugin(module: str) -> None:
    """Import ``module`` (a no-op when it is imported already), or raise :class:`PluginError`."""
    try:
        importlib.import_module(module)
    except Exception as e:  # whatever the user's module raises (a duplicate name: ValueError)
        hint = ""
        if isinstance(e, ModuleNotFoundError) and e.name is not None and module.startswith(e.name):
            hint = "; is it installed, or on PYTHONPATH?"
        raise PluginError(f"module {module!r} could not be imported ({_cause(e)}{hint})") from None


def load_entry_points() -> None:
    """Import every module named by an installed entry point of :data:`ENTRY_POINT_GROUP`, once
    per process."""
    global _scanned
    if _scanned:
        return
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _loaded_entry_points:
            continue
        try:
            ep.load()
        except Exception as e:
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}, group {ENTRY_POINT_GROUP}) could not be loaded ({_cause(e)})"
            ) from None
        _loaded_entry_points.add(ep.value)
    _scanned = True


def load_plugins(modules: Iterable[str] = (), flag: str | None = None) -> None:
    """The installed entry points, then ``modules`` (a study's ``study.plugins``, or the command
    line's ``--plugins``: ``flag``, which then prefixes a refusal) in order."""
    load_entry_points()
    for module in modules:
        try:
            import_plugin(module)
        except PluginError as e:
            if flag is None:
                raise
            raise PluginError(f"{flag} {module}: {e}") from None


__all__ = ["ENTRY_POINT_GROUP", "MODULE_NAME", "PluginError", "import_plugin", "load_entry_points", "load_plugins"]
