"""The attacks' torch-free half: ``bdx_study.attacks`` imports without torch, and
``check_attack`` / ``check_attack_data`` (what ``bdx-study validate`` runs) raise exactly what
``create_attack`` and ``Attack.check_data`` raise, with the same messages; ``attack_identity``
(the victim key's attack part) is ``create_attack(...).identity()``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bdx_study.attacks import (
    ATTACKS,
    Attack,
    AttackParams,
    attack_identity,
    attack_params,
    check_attack,
    check_attack_data,
    create_attack,
    list_attacks,
    register_attack,
)
from bdx_study.data import ImageData

NUM_CLASSES = 10
SHAPES = [(1, 16, 16), (1, 28, 28), (3, 32, 32)]
ODD_SHAPES = [(1, 2, 2), (1, 6, 6), (3, 10, 12), (1, 28, 32), (1, 12, 12)]  # too small, not square, not /4
VARIANTS: list[dict[str, Any]] = [
    {},
    {"target": 9},
    {"target": NUM_CLASSES},  # target outside the classes
    {"poison_rate": 0.3, "target": 3},
    {"no_such_param": 1},  # unknown params: the Params model's ValidationError
    {"poison_rate": 1.5},
    {"patch_size": 5},
    {"patch_size": 29},  # larger than the image
    {"patch_size": 3, "margin": 14},
    {"patch_size": 9},
    {"k": 40},
    {"pieces": 9},
    {"pieces": 10},
    {"window": 5},
    {"window": 8, "positions": [[1, 7]]},
    {"positions": [[40, 2]]},
    {"keep": 40},
    {"source": 12},
    {"source": 0},
    {"cover_classes": [9]},
    {"cover_classes": [1, 1]},
    {"trigger_image": "/no/such/file.png"},
    {"squeeze_num": 5, "cover_rate": 0.2},
]


def _outcome(fn: Any, *args: Any) -> tuple[str, str] | None:
    """None when ``fn(*args)`` passes, else the ValueError's type and message."""
    try:
        fn(*args)
    except ValueError as e:  # pydantic's ValidationError too
        return type(e).__name__, str(e)
    return None


def _run_torch_free(code: str) -> None:
    check = "\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    src = "import sys\n" + textwrap.dedent(code) + check
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------ no torch


def test_checks_do_not_import_torch() -> None:
    _run_torch_free(
        """
        import numpy as np
        import bdx_study.attacks as A

        for name in A.list_attacks():
            A.attack_params(name)
            for shape in [(1, 16, 16), (1, 28, 28), (3, 32, 32)]:
                A.check_attack(name, {}, shape, 10)
                A.attack_identity(name, {}, shape, 10, 0)
        labels = np.arange(1000) % 10
        for name in ["none", "badnet", "tact", "sig", "clean_label", "dynamic"]:
            A.check_attack_data(name, {"target": 3} if name != "none" else {}, (1, 28, 28), 10, (1, 28, 28), labels)
        for bad in [lambda: A.check_attack("badnet", {"patch_size": 29}, (1, 28, 28), 10),
                    lambda: A.check_attack("tact", {"source": 12}, (1, 28, 28), 10),
                    lambda: A.check_attack_data("sig", {"poison_rate": 0.5}, (1, 28, 28), 10, (1, 28, 28), labels)]:
            try:
                bad()
            except ValueError:
                pass
            else:
                raise AssertionError("a bad attack passed")
        """
    )


def test_trigger_image_check_does_not_import_torch(tmp_path: Path) -> None:
    """Blend's trigger image is read for its check (bdx_study.data.read_image): torch-free too."""
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    _run_torch_free(
        f"""
        import bdx_study.attacks as A

        A.check_attack("blend", {{"trigger_image": {str(tmp_path / "t.png")!r}}}, (3, 32, 32), 10)
        """
    )


# ------------------------------------------------------------------------------ one home


@pytest.mark.parametrize("name", list_attacks())
def test_declared_params_are_the_attacks(name: str) -> None:
    """The declared Params model is the Attack's, and its reference tables are the Attack's."""
    cls = ATTACKS.get(name)
    assert attack_params(name) is cls.Params
    assert cls.reference_rates is cls.Params.reference_rates
    assert cls.reference_cover_rates is cls.Params.reference_cover_rates


def test_old_import_paths() -> None:
    from bdx_study.attacks.blend import AdaptiveBlendParams, BlendParams
    from bdx_study.attacks.clean_label import SIGParams
    from bdx_study.attacks.patch import BadNetParams, NoAttack, TaCTParams

    assert ATTACKS.get("badnet").Params is BadNetParams and ATTACKS.get("tact").Params is TaCTParams
    assert ATTACKS.get("blend").Params is BlendParams and ATTACKS.get("adaptive_blend").Params is AdaptiveBlendParams
    assert ATTACKS.get("sig").Params is SIGParams and NoAttack.Params is attack_params("none")


# ------------------------------------------------------------------------------ check_attack == create_attack


@pytest.mark.parametrize("name", list_attacks())
def test_check_attack_agrees_with_create_attack(name: str, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "trigger.png"
    Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)).save(image)
    (tmp_path / "not_an_image.png").write_text("hello")
    variants = [
        *VARIANTS,
        {"trigger_image": str(image)},
        {"trigger_image": str(tmp_path / "not_an_image.png")},
    ]
    failures = 0
    for shape in SHAPES + ODD_SHAPES:
        for params in variants:
            built = _outcome(create_attack, name, params, shape, NUM_CLASSES, 0)
            checked = _outcome(check_attack, name, params, shape, NUM_CLASSES)
            assert checked == built, (name, shape, params)
            failures += built is not None
    assert failures > 0  # the bad variants do fail


@pytest.mark.parametrize("name", list_attacks())
def test_attack_identity_is_the_attacks(name: str, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "trigger.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint8)).save(image)
    model = attack_params(name)
    variants: list[dict[str, Any]] = [{}, {"seed": 5}]
    if name != "none":  # it poisons nothing
        variants.append({"target": 2, "poison_rate": 0.2, "cover_rate": 0.1, "trigger_image": str(image)})
    for shape in SHAPES:
        for params in variants:
            params = {k: v for k, v in params.items() if k in model.model_fields}
            expected = create_attack(name, params, shape, NUM_CLASSES, 7).identity()
            assert attack_identity(name, params, shape, NUM_CLASSES, 7) == expected, (name, shape, params)
    with pytest.raises(ValueError, match="target 10 must be < num_classes 10"):
        attack_identity(name, {"target": NUM_CLASSES}, (1, 28, 28), NUM_CLASSES, 0)


def test_check_attack_takes_a_params_model() -> None:
    p = attack_params("badnet").model_validate({"patch_size": 29})
    assert isinstance(p, AttackParams)
    with pytest.raises(ValueError, match="patch_size 29 \\+ margin 0 exceeds the 28x28 input"):
        check_attack("badnet", p, (1, 28, 28), NUM_CLASSES)
    check_attack("badnet", p, (3, 32, 32), NUM_CLASSES)


def test_unknown_attack_lists_the_known_ones() -> None:
    for call in (
        lambda: attack_params("no_such_attack"),
        lambda: check_attack("no_such_attack", {}, (1, 28, 28), NUM_CLASSES),
    ):
        with pytest.raises(KeyError) as ei:
            call()
        assert "no_such_attack" in str(ei.value) and "badnet" in str(ei.value)


def test_user_registered_attack(monkeypatch: pytest.MonkeyPatch) -> None:
    """An attack registered by user code (not declared): its own Params and reference tables."""

    class Mine(Attack):
        """A user's attack."""

        name = "mine"
        reference_rates = {32: 0.25}

        def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

    class Yours(Mine):
        """A user's attack with more to its identity."""

        name = "yours"

        def identity(self) -> dict[str, Any]:
            return {**super().identity(), "extra": 1}

    monkeypatch.setitem(ATTACKS._entries, "mine", Mine)
    monkeypatch.setitem(ATTACKS._entries, "yours", Yours)
    assert attack_params("mine") is AttackParams
    assert create_attack("mine", {}, (1, 28, 28), NUM_CLASSES, 0).poison_rate == 0.25
    for params in ({}, {"target": NUM_CLASSES}, {"no_such_param": 1}):
        built = _outcome(create_attack, "mine", params, (1, 28, 28), NUM_CLASSES, 0)
        assert _outcome(check_attack, "mine", params, (1, 28, 28), NUM_CLASSES) == built
    for name in ("mine", "yours"):
        expected = create_attack(name, {"seed": 3}, (1, 28, 28), NUM_CLASSES, 0).identity()
        assert attack_identity(name, {"seed": 3}, (1, 28, 28), NUM_CLASSES, 0) == expected
    assert expected["extra"] == 1 and expected["poison_rate"] == 0.25


def test_a_users_attack_is_checked_by_its_own_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's attack keeps its checks in its class: check_attack builds it, and its data
    check (which may read the images) is refused here rather than silently skipped."""

    class Picky(Attack):
        """Refuses inputs narrower than 30 pixels."""

        name = "picky"

        def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], classes: int, seed: int) -> None:
            super().__init__(params, input_shape, classes, seed)
            if input_shape[2] < 30:
                raise self.fail("needs inputs at least 30 pixels wide")

        def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

    monkeypatch.setitem(ATTACKS._entries, "picky", Picky)
    check_attack("picky", {}, (3, 32, 32), NUM_CLASSES)
    with pytest.raises(ValueError, match="at least 30 pixels wide"):
        check_attack("picky", {}, (1, 28, 28), NUM_CLASSES)
    with pytest.raises(TypeError, match="VictimConfig.check_data"):
        check_attack_data("picky", {}, (3, 32, 32), NUM_CLASSES, (3, 32, 32), np.zeros(10, dtype=np.int64))


def test_user_code_cannot_shadow_a_built_in_before_its_module_loads() -> None:
    """register_attack("badnet") from user code fails even while patch.py is not imported yet
    (otherwise validation would check the built-in's Params and training run the user's class)."""
    code = textwrap.dedent(
        """
        from bdx_study.attacks import ATTACKS, AttackParams, register_attack
        assert not ATTACKS.loaded("badnet")
        from bdx_study.attacks._base import Attack
        try:
            @register_attack("badnet")
            class Mine(Attack):
                Params = AttackParams
        except ValueError as e:
            print("refused:", e)
        print("badnet is", ATTACKS.get("badnet").__module__, "trojan is", ATTACKS.get("trojan").__module__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "refused: attack 'badnet' is registered twice: it is built in (module bdx_study.attacks.patch)" in out
    assert "badnet is bdx_study.attacks.patch trojan is bdx_study.attacks.patch" in out


def test_a_built_in_must_use_its_declared_params_and_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation resolves a built-in's defaults from its declared Params: its class may not
    bring other Params or other reference tables (the victim key would differ between a
    driver that never loaded the class and a worker that did)."""
    from bdx_study.attacks import patch

    monkeypatch.delitem(ATTACKS._entries, "badnet")
    for attrs in ({"Params": AttackParams}, {"reference_rates": {32: 0.5}}):  # other Params; other tables
        with pytest.raises(TypeError, match="must use the Params it is declared with"):
            register_attack("badnet")(type("BadNet2", (patch.BadNet,), {"__module__": patch.__name__, **attrs}))
    register_attack("badnet")(patch.BadNet)  # the real one registers again


# ------------------------------------------------------------------------------ check_attack_data == check_data


def _labels(counts: dict[int, int], n: int = 150) -> np.ndarray:
    """``n`` int64 labels with ``counts[c]`` images of class c, the rest spread over the others."""
    fixed = [c for c, k in counts.items() for _ in range(k)]
    others = [c for c in range(NUM_CLASSES) if c not in counts]
    rest = [others[i % len(others)] for i in range(n - len(fixed))]
    return np.random.default_rng(0).permutation(np.array(fixed + rest, dtype=np.int64))


LABELS = {
    "plenty": _labels({3: 40, 1: 40, 5: 20, 7: 20}),
    "few_target": _labels({3: 5, 1: 40, 5: 20, 7: 20}),
    "few_source": _labels({3: 40, 1: 5, 5: 20, 7: 20}),
    "few_cover": _labels({3: 40, 1: 40, 5: 2, 7: 2}),
    "no_target": _labels({3: 0, 1: 40}),
}
DATA_PARAMS: list[dict[str, Any]] = [
    {"target": 3},
    {"target": 3, "poison_rate": 0.1},
    {"target": 3, "poison_rate": 0.2},
    {"target": 3, "poison_rate": 0.1, "cover_rate": 0.1},
    {"target": 3, "poison_rate": 0.01, "cover_rate": 0.3},
    {"target": 3, "poison_rate": 0.0},
]


@pytest.mark.parametrize("name", ["clean_label", "sig", "tact", "badnet", "none", "wanet"])
def test_check_attack_data_agrees_with_check_data(name: str) -> None:
    model = attack_params(name)
    outcomes = set()
    for shape in SHAPES:
        for params in [{}] if name == "none" else DATA_PARAMS:
            params = {k: v for k, v in params.items() if k in model.model_fields}
            attack = create_attack(name, params, shape, NUM_CLASSES, 0)
            for key, labels in LABELS.items():
                for train_shape in (shape, (shape[0], shape[1] + 4, shape[2] + 4)):
                    data = ImageData(torch.zeros(len(labels), *train_shape), torch.from_numpy(labels))
                    expected = _outcome(attack.check_data, data)
                    got = _outcome(check_attack_data, name, params, shape, NUM_CLASSES, train_shape, labels)
                    assert got == expected, (name, shape, params, key, train_shape)
                    outcomes.add(expected is None)
    assert outcomes == {True, False}  # both passing and failing label sets were tried


def test_check_attack_data_runs_the_construction_checks() -> None:
    labels = LABELS["plenty"]
    with pytest.raises(ValueError, match="target 10 must be < num_classes 10"):
        check_attack_data("sig", {"target": 10}, (1, 28, 28), NUM_CLASSES, (1, 28, 28), labels)
    with pytest.raises(ValueError, match=r"attack 'sig': poison_rate 0.5 needs 75 images of target class 3"):
        check_attack_data("sig", {"target": 3, "poison_rate": 0.5}, (1, 28, 28), NUM_CLASSES, (1, 28, 28), labels)
    with pytest.raises(ValueError, match=r"built for inputs \(1, 28, 28\), got training images \(3, 32, 32\)"):
        check_attack_data("badnet", {}, (1, 28, 28), NUM_CLASSES, (3, 32, 32), labels)
