"""The detector registry without torch: every family's module registers itself on import and
imports no torch (``bdx-study validate`` checks study files against the families' parameter
models), and the package's modules import no module that imports them back."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import get_args

import pytest
import torch
from torch import Tensor, nn

import bdx_study.detectors as detectors_package
from bdx_study import _config
from bdx_study._registry import Registry, UnknownNameError
from bdx_study.detectors import (
    DETECTORS,
    DetectorFamily,
    DetectorParams,
    FitContext,
    Fitted,
    detector_params,
    fit_param,
    list_detectors,
    register_detector,
)
from bdx_study.detectors._corruption_tables import corruption_names
from bdx_study.detectors._corruptions import CORRUPTIONS
from bdx_study.detectors.badexpert import BaDExpertParams

BUILT_IN = {
    "badexpert",
    "cognitive_distillation",
    "frequency",
    "ibd_psc",
    "scale_up",
    "sentinet",
    "strip",
    "teco",
    "ted",
    "committee",
}


def test_importing_the_registry_and_building_every_family_leaves_torch_out() -> None:
    code = (
        "import sys\n"
        "import bdx_study.detectors as d\n"
        "given = {'committee': {'members': {'badexpert': {}, 'ted': {}}}}  # its members are required\n"
        "[d.create_detector(n, given.get(n, {})) for n in d.list_detectors()]\n"
        "d.detector_params('badexpert').model_json_schema()\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_built_in_family_registers_itself_with_the_params_of_its_module() -> None:
    assert set(list_detectors()) >= BUILT_IN
    for name in BUILT_IN:
        cls = DETECTORS.get(name)
        assert cls.name == name
        assert cls.__module__ == f"bdx_study.detectors.{name}"
        assert cls.Params is detector_params(name)
        assert issubclass(cls.Params, DetectorParams) and cls.Params.__module__ == cls.__module__


def test_every_public_module_of_the_package_is_a_registered_family() -> None:
    """No table of families: the package imports its public modules, and each registers one."""
    public = {m.name for m in pkgutil.iter_modules(detectors_package.__path__) if not m.name.startswith("_")}
    registered = {DETECTORS.get(n).__module__.rpartition(".")[2] for n in BUILT_IN}
    assert public == registered == BUILT_IN


def _imports(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that the file at ``path`` imports anywhere (top level, functions,
    TYPE_CHECKING blocks); ``__init__`` stands for the package itself."""
    here = package if path.stem == "__init__" else f"{package}.{path.stem}"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here if path.stem == "__init__" else here.rpartition(".")[0]
                base = f"{parent}.{base}" if base else parent
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if (n == package or n.startswith(f"{package}.")) and n.count(".") <= 2}
    return {n.removesuffix(".__init__") for n in found}


def test_no_module_of_the_package_imports_one_that_imports_it() -> None:
    package = "bdx_study.detectors"
    root = Path(detectors_package.__file__).parent
    modules = {f"{package}.{p.stem}" if p.stem != "__init__" else package: p for p in root.glob("*.py")}
    graph = {m: _imports(p, package) & set(modules) - {m} for m, p in modules.items()}
    graph[package] |= {f"{package}.{n}" for n in BUILT_IN}  # the package imports its families (pkgutil)
    assert graph[f"{package}.strip"] >= {f"{package}._base", f"{package}._registry"}  # the parser sees imports

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = cycle_from(start, [*path, nxt])
                if found:
                    return found
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, [m]))]
    assert not cycles, cycles


def test_the_torch_free_constants_agree_with_the_implementations() -> None:
    assert list(CORRUPTIONS) == corruption_names()
    from bdx_study.training import Precision

    precision = BaDExpertParams.model_fields["precision"].annotation
    assert get_args(precision) == get_args(Precision) == get_args(_config.Precision)


def test_an_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError, match="strip"):
        detector_params("no_such_family")


# ------------------------------------------------------------------------------------ user families


class UserParams(DetectorParams):
    knob: int = fit_param("main", 3, ge=0, description="a user family's own parameter")


class UserFamily(DetectorFamily[UserParams]):
    Params = UserParams
    access = "test only"

    def fit(self, component: str, ctx: FitContext) -> Fitted:
        return Fitted()

    def features(
        self, component: str, fitted: Fitted, model: nn.Module, x: Tensor, pred: Tensor, device: torch.device
    ) -> dict[str, Tensor]:
        return {"zero": torch.zeros(len(x))}

    def score(self, feats: Mapping[str, Tensor], pred: Tensor) -> Tensor:
        return feats["zero"]


USER_NAME = "test_torchfree_user_family"


@pytest.fixture
def user_family() -> Iterator[type[DetectorFamily]]:
    try:
        yield register_detector(USER_NAME)(UserFamily)
    finally:
        DETECTORS._entries.pop(USER_NAME, None)  # the registry has no unregister: tests only


def test_a_user_family_is_found_by_detector_params(user_family: type[DetectorFamily]) -> None:
    assert USER_NAME in list_detectors()
    assert detector_params(USER_NAME) is UserParams
    params = detector_params(USER_NAME).model_validate({})
    assert isinstance(params, UserParams) and params.knob == 3


def test_a_user_family_cannot_take_a_built_in_name() -> None:
    class Shadowing(UserFamily):
        pass

    strip = DETECTORS.get("strip")
    with pytest.raises(ValueError, match="'strip' is registered twice"):
        register_detector("strip")(Shadowing)
    assert DETECTORS.get("strip") is strip and Shadowing.name != "strip"


def test_a_parameter_without_a_reason_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from bdx_study.detectors import _registry

    monkeypatch.setattr(_registry, "DETECTORS", Registry("detector family"))

    class Bare(DetectorParams):
        knob: int = fit_param("main", 1)

    class BareFamily(UserFamily):
        Params = Bare  # type: ignore[assignment]

    with pytest.raises(TypeError, match="'knob' needs a description"):
        register_detector("bare")(BareFamily)
