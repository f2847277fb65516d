"""The detector registry without torch: names and parameter models come from declarations
(``bdx-study validate`` checks study files with them), a family's module only on first use."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import get_args

import pytest
import torch
from torch import Tensor, nn

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
from bdx_study.detectors import params as params_module
from bdx_study.detectors._corruption_tables import corruption_names
from bdx_study.detectors._corruptions import CORRUPTIONS

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


def test_importing_the_registry_and_reading_every_params_model_leaves_torch_out() -> None:
    code = (
        "import sys\n"
        "import bdx_study.detectors as d\n"
        "given = {'committee': {'members': {'badexpert': {}, 'ted': {}}}}  # its members are required\n"
        "[d.detector_params(n).model_validate(given.get(n, {})) for n in d.list_detectors()]\n"
        "d.detector_params('badexpert').model_json_schema()\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded\n"
        "assert not any(d.DETECTORS.loaded(n) for n in d.list_detectors())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_built_in_family_is_declared_with_its_params() -> None:
    assert set(list_detectors()) >= BUILT_IN
    declared = [n for n in list_detectors() if DETECTORS.spec(n) is not None]
    assert set(declared) >= BUILT_IN
    for name in declared:
        cls = DETECTORS.get(name)
        assert cls.name == name
        assert cls.Params is detector_params(name) is DETECTORS.spec(name)
        assert issubclass(cls.Params, DetectorParams)


def test_old_import_paths_give_the_same_classes() -> None:
    from bdx_study.detectors.badexpert import BaDExpertParams
    from bdx_study.detectors.strip import StripParams

    assert BaDExpertParams is params_module.BaDExpertParams is detector_params("badexpert")
    assert StripParams is params_module.StripParams is detector_params("strip")


def test_the_torch_free_constants_agree_with_the_implementations() -> None:
    assert list(CORRUPTIONS) == corruption_names()
    from bdx_study.training import Precision

    assert get_args(params_module.Precision) == get_args(Precision) == get_args(_config.Precision)


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
    assert DETECTORS.spec(USER_NAME) is None
    assert detector_params(USER_NAME) is UserParams
    params = detector_params(USER_NAME).model_validate({})
    assert isinstance(params, UserParams) and params.knob == 3


def test_a_declared_family_must_register_the_declared_params(monkeypatch: pytest.MonkeyPatch) -> None:
    import bdx_study.detectors as detectors

    fresh: Registry[type[DetectorFamily]] = Registry("detector family")
    fresh.declare("declared_family", UserFamily.__module__, DetectorParams)  # declared by this module
    fresh.declare("built_in", "no.such.module", DetectorParams)
    monkeypatch.setattr(detectors, "DETECTORS", fresh)
    with pytest.raises(TypeError, match="declared with bdx_study.detectors.params.DetectorParams"):
        register_detector("declared_family")(UserFamily)
    with pytest.raises(ValueError, match="registered twice: it is built in"):  # another module's name
        register_detector("built_in")(UserFamily)
    assert not fresh.loaded("declared_family") and not fresh.loaded("built_in")


def test_a_parameter_without_a_reason_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import bdx_study.detectors as detectors

    monkeypatch.setattr(detectors, "DETECTORS", Registry("detector family"))

    class Bare(DetectorParams):
        knob: int = fit_param("main", 1)

    class BareFamily(UserFamily):
        Params = Bare  # type: ignore[assignment]

    with pytest.raises(TypeError, match="'knob' needs a description"):
        register_detector("bare")(BareFamily)
