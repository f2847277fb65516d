"""The attacks' torch-free half: ``bdx_study.attacks`` imports without torch, and
``check_attack`` / ``check_attack_data`` (what ``bdx-study validate`` runs) raise exactly what
``create_attack`` and ``Attack.check_data`` raise, with the same messages; ``attack_identity``
(the victim key's attack part) is ``create_attack(...).identity()``."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

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
    user_attack,
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

        assert A.Attack and A.TrainingHook and A.ArtifactStore and A.patch_blend  # the contract's names too
        for name in A.list_attacks():
            assert issubclass(A.ATTACKS.get(name), A.Attack)  # each class, loaded with its module
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


def test_each_public_module_is_found_and_registers() -> None:
    """A built-in attack is one module of the package: every public module is imported with the
    package and registers at least one attack, and every built-in comes from one of them."""
    import bdx_study.attacks as package

    modules = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    registered = {ATTACKS.get(name).__module__.rpartition(".")[2] for name in list_attacks()}
    assert registered == modules and "patch" in modules
    assert not user_attack("badnet") and ATTACKS.get("badnet").Params is attack_params("badnet")


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


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in a test are undone after it."""
    monkeypatch.setattr(ATTACKS, "_entries", dict(ATTACKS._entries))


def test_user_registered_attack(registry: None) -> None:
    """An attack registered by user code: its own Params and reference tables; none of the
    built-ins' extra rules (an "Adaptation:" docstring, quick_params) apply to it."""

    @register_attack("mine")
    class Mine(Attack):
        """A user's attack."""

        reference_rates = {32: 0.25}

        def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

    @register_attack("yours")
    class Yours(Mine):
        """A user's attack with more to its identity."""

        def prepare(self, train: ImageData, context: Any = None) -> None:  # trains, without quick_params
            self.prepared = True

        def identity(self) -> dict[str, Any]:
            return {**super().identity(), "extra": 1}

    assert user_attack("mine") and Mine.name == "mine" and Yours.name == "yours"
    assert attack_params("mine") is AttackParams
    assert create_attack("mine", {}, (1, 28, 28), NUM_CLASSES, 0).poison_rate == 0.25
    for params in ({}, {"target": NUM_CLASSES}, {"no_such_param": 1}):
        built = _outcome(create_attack, "mine", params, (1, 28, 28), NUM_CLASSES, 0)
        assert _outcome(check_attack, "mine", params, (1, 28, 28), NUM_CLASSES) == built
    for name in ("mine", "yours"):
        expected = create_attack(name, {"seed": 3}, (1, 28, 28), NUM_CLASSES, 0).identity()
        assert attack_identity(name, {"seed": 3}, (1, 28, 28), NUM_CLASSES, 0) == expected
    assert expected["extra"] == 1 and expected["poison_rate"] == 0.25


def test_a_users_attack_is_checked_by_its_own_class(registry: None) -> None:
    """A user's attack keeps its checks in its class: check_attack builds it, and its data
    check (which may read the images) is refused here rather than silently skipped."""

    @register_attack("picky")
    class Picky(Attack):
        """Refuses inputs narrower than 30 pixels."""

        def __init__(self, params: AttackParams, input_shape: tuple[int, int, int], classes: int, seed: int) -> None:
            super().__init__(params, input_shape, classes, seed)
            if input_shape[2] < 30:
                raise self.fail("needs inputs at least 30 pixels wide")

        def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()

    check_attack("picky", {}, (3, 32, 32), NUM_CLASSES)
    with pytest.raises(ValueError, match="at least 30 pixels wide"):
        check_attack("picky", {}, (1, 28, 28), NUM_CLASSES)
    with pytest.raises(TypeError, match="VictimConfig.check_data"):
        check_attack_data("picky", {}, (3, 32, 32), NUM_CLASSES, (3, 32, 32), np.zeros(10, dtype=np.int64))


def test_user_code_cannot_shadow_a_built_in(registry: None) -> None:
    """The built-ins are registered when the package is imported, before any user code runs:
    register_attack("badnet") from user code fails and the built-in stays."""
    from bdx_study.attacks.patch import BadNet

    class Mine(BadNet):
        """BadNet under a taken name."""

    with pytest.raises(ValueError, match="attack 'badnet' is registered twice"):
        register_attack("badnet")(Mine)
    assert ATTACKS.get("badnet") is BadNet and BadNet.name == "badnet"


class _Budget(AttackParams):
    steps: int = 100


class _BuiltIn(Attack):
    """A built-in as the contract wants it.

    Adaptation: the same at every size."""

    __module__ = "bdx_study.attacks.example"  # a module of the package: the built-ins' rules apply
    Params: ClassVar[type[AttackParams]] = _Budget
    quick_params: ClassVar[Mapping[str, Any] | None] = {"steps": 1}

    def prepare(self, train: ImageData, context: Any = None) -> None:  # it trains something
        self.prepared = True

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def _without_apply_trigger() -> type:
    class Abstract(Attack):
        """Adaptation: none."""

        __module__ = _BuiltIn.__module__
        Params = _Budget

    return Abstract


@pytest.mark.parametrize(
    ("attrs", "missing"),
    [
        ({"Params": AttackParams}, "Params: its own parameter model"),
        ({"Params": dict}, "Params: a subclass of AttackParams"),
        ({"__doc__": "No paragraph on sizes."}, 'a docstring with an "Adaptation:" paragraph'),
        ({"quick_params": None}, "quick_params (it trains something"),
        ({"quick_params": {"stepz": 1}}, "quick_params that _Budget accepts"),
        ({"reference_rates": {16: 0.1, 28: 0.1}}, "reference_rates[32]"),
        ({"reference_cover_rates": {28: 0.1}}, "reference_cover_rates[32]"),
    ],
)
def test_registration_checks_the_contract(registry: None, attrs: dict[str, Any], missing: str) -> None:
    """A built-in without a required part is refused at registration, with one TypeError naming
    the class and what it lacks; nothing is registered."""
    module = {"__module__": _BuiltIn.__module__, "__doc__": _BuiltIn.__doc__}  # (a docstring is not inherited)
    register_attack("complete")(type("Complete", (_BuiltIn,), module))  # the control: all parts there
    broken = type("Broken", (_BuiltIn,), {**module, **attrs})
    with pytest.raises(TypeError, match="attack 'broken': Broken lacks") as ei:
        register_attack("broken")(broken)
    assert missing in str(ei.value)
    assert "broken" not in ATTACKS and "complete" in ATTACKS


def test_registration_lists_every_gap(registry: None) -> None:
    with pytest.raises(TypeError) as ei:
        register_attack("abstract")(_without_apply_trigger())
    assert "Abstract lacks an implementation of apply_trigger" in str(ei.value)
    assert "quick_params" not in str(ei.value)  # it trains nothing
    with pytest.raises(TypeError, match="lacks to be a subclass of bdx_study.attacks.Attack"):
        register_attack("not_an_attack")(_Budget)  # type: ignore[arg-type]

    class Bare(_BuiltIn):  # no docstring
        __module__ = _BuiltIn.__module__
        Params = AttackParams
        quick_params = None

    with pytest.raises(TypeError) as ei:
        register_attack("bare")(Bare)
    assert str(ei.value).count(";") == 2  # own Params; an Adaptation paragraph; quick_params
    assert "abstract" not in ATTACKS and "bare" not in ATTACKS


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
