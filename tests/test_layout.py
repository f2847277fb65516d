"""The code's layout, read from the source (no imports run): the flow stays visible.

- no two modules import each other (counting imports inside functions and under TYPE_CHECKING);
- the library (``bdx_study`` except its CLI) never imports ``trials`` or ``analysis``;
- no function over 60 lines outside tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"bdx_study": "bdx_study", "trials": "bdx_study.trials", "analysis": "bdx_study.analysis"}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules ``module`` imports anywhere in its file (``from pkg import sub`` counts sub)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imported(m, p, known) for m, p in known.items()}


def test_the_import_reader_sees_imports_in_functions_and_relative_ones(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n")
    known = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    assert _imported("pkg.a", pkg / "a.py", known) == {"pkg", "pkg.b"}
    assert _imported("pkg.b", pkg / "b.py", known) == {"pkg.a"}


def test_no_two_modules_import_each_other() -> None:
    graph = _graph()
    pairs = sorted((a, b) for a, targets in graph.items() for b in targets if a < b and a in graph[b])
    assert not pairs, f"modules that import each other: {pairs}"


def test_the_library_never_imports_trials_or_analysis() -> None:
    graph = _graph()
    bad = sorted(
        (a, b)
        for a, targets in graph.items()
        if a.startswith("bdx_study.")
        and not a.startswith(("bdx_study.trials", "bdx_study.analysis"))
        and a != "bdx_study.cli"
        for b in targets
        if b.startswith(("bdx_study.trials", "bdx_study.analysis"))
    )
    assert not bad, f"library modules importing trials/analysis (only bdx_study.cli ties them together): {bad}"


@pytest.mark.parametrize("folder", ["bdx_study", "trials", "analysis", "benchmarks", "search_spaces"])
def test_no_function_is_longer_than_the_limit(folder: str) -> None:
    long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
