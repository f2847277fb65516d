"""Contract tests over the registries: every architecture and every attack, plus the registry itself."""

from __future__ import annotations

import pytest
import torch

from bdx_study._registry import Registry, UnknownNameError
from bdx_study.archs import ARCHITECTURES, create_model
from bdx_study.attacks import ATTACKS, Attack, create_attack
from bdx_study.data import DATASETS, ImageData, dataset_info

NUM_CLASSES = 10
TARGET = 3
POISON_RATE = 0.07
N = 150  # int(150 * 0.07) = 10 (10.5 truncated)


def _ids(v: object) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# --------------------------------------------------------------------------------- architectures

_ARCH_SHAPES = {
    # resnet18 is the heavy one: only the shapes the studies use.
    "resnet18": [(3, 32, 32), (1, 28, 28)],
}
_DEFAULT_SHAPES = [(1, 16, 16), (1, 28, 28), (3, 32, 32)]


def _arch_cases() -> list[tuple[str, tuple[int, int, int]]]:
    return [(name, shape) for name in ARCHITECTURES.names() for shape in _ARCH_SHAPES.get(name, _DEFAULT_SHAPES)]


@pytest.mark.parametrize(("name", "shape"), _arch_cases(), ids=_ids)
def test_architecture_forward_backward(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    c = shape[0]
    model = create_model(name, shape, NUM_CLASSES, (0.5,) * c, (0.25,) * c)
    x = torch.rand(2, *shape)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, NUM_CLASSES - 1]))
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    for p in params:
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
    # normalization lives inside the model as buffers, not parameters
    buffers = dict(model.named_buffers())
    assert torch.equal(buffers["mean"].flatten(), torch.full((c,), 0.5))
    assert torch.equal(buffers["std"].flatten(), torch.full((c,), 0.25))


def test_architecture_normalizes_inside() -> None:
    """The model sees (x - mean) / std: shifting mean and x together leaves the logits unchanged."""
    torch.manual_seed(0)
    a = create_model("small_cnn", (1, 16, 16), NUM_CLASSES, (0.0,), (1.0,)).eval()
    b = create_model("small_cnn", (1, 16, 16), NUM_CLASSES, (0.5,), (1.0,)).eval()
    b.body.load_state_dict(a.body.state_dict())
    x = torch.rand(3, 1, 16, 16) * 0.5
    torch.testing.assert_close(a(x), b(x + 0.5))


# --------------------------------------------------------------------------------- attacks

_ATTACK_SHAPES = [(1, 28, 28), (3, 32, 32)]


def _params(name: str) -> dict[str, object]:
    return {} if name == "none" else {"poison_rate": POISON_RATE, "target": TARGET}


def _data(shape: tuple[int, int, int], seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, *shape, generator=g)
    x[:5] = 0.0  # extremes: the trigger must keep them in range
    x[5:10] = 1.0
    y = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    y[:4] = TARGET  # make sure the target class is present
    return ImageData(x, y)


def _attack(name: str, shape: tuple[int, int, int], seed: int = 0) -> Attack:
    return create_attack(name, _params(name), shape, NUM_CLASSES, seed)


def _attack_cases() -> list[tuple[str, tuple[int, int, int]]]:
    return [(name, shape) for name in ATTACKS.names() for shape in _ATTACK_SHAPES]


@pytest.mark.parametrize(("name", "shape"), _attack_cases(), ids=_ids)
def test_attack_poison_contract(name: str, shape: tuple[int, int, int]) -> None:
    data = _data(shape)
    x0, y0 = data.x.clone(), data.y.clone()
    attack = _attack(name, shape)
    ps = attack.poison(data)

    # the input is not modified in place
    assert torch.equal(data.x, x0) and torch.equal(data.y, y0)

    out = ps.data
    assert out.x.shape == data.x.shape and out.x.dtype == torch.float32
    assert out.y.shape == data.y.shape and out.y.dtype == torch.int64
    assert float(out.x.min()) >= 0.0 and float(out.x.max()) <= 1.0

    rate = attack.params.poison_rate
    idx = ps.poison_indices
    assert len(idx) == int(N * rate)
    if name == "none":
        assert len(idx) == 0
    else:
        assert len(idx) == 10
    assert len(torch.unique(idx)) == len(idx)
    assert bool(((idx >= 0) & (idx < N)).all())

    # poisoned labels are the target; untouched indices are unchanged (images and labels)
    assert bool((out.y[idx] == attack.params.target).all())
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(out.x[untouched], x0[untouched])
    assert torch.equal(out.y[untouched], y0[untouched])
    if name != "none":
        # the trigger actually changes the poisoned images
        assert not torch.equal(out.x[idx], x0[idx])


@pytest.mark.parametrize(("name", "shape"), _attack_cases(), ids=_ids)
def test_attack_trigger_range_and_shape(name: str, shape: tuple[int, int, int]) -> None:
    attack = _attack(name, shape)
    x = _data(shape).x
    xt = attack.apply_trigger(x)
    assert xt.shape == x.shape
    assert float(xt.min()) >= 0.0 and float(xt.max()) <= 1.0
    # a pure function: the input is untouched and the result repeatable
    assert torch.equal(attack.apply_trigger(x), xt)
    if name == "none":
        assert torch.equal(xt, x)
    else:
        assert not torch.equal(xt, x)


@pytest.mark.parametrize(("name", "shape"), _attack_cases(), ids=_ids)
def test_attack_deterministic_under_seed(name: str, shape: tuple[int, int, int]) -> None:
    data = _data(shape)
    a, b = _attack(name, shape, seed=7), _attack(name, shape, seed=7)
    pa, pb = a.poison(data), b.poison(data)
    assert torch.equal(pa.poison_indices, pb.poison_indices)
    assert torch.equal(pa.data.x, pb.data.x)
    assert torch.equal(pa.data.y, pb.data.y)
    assert torch.equal(a.apply_trigger(data.x), b.apply_trigger(data.x))


@pytest.mark.parametrize("shape", _ATTACK_SHAPES, ids=_ids)
@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n != "none"])
def test_attack_different_seed_different_poison_indices(name: str, shape: tuple[int, int, int]) -> None:
    data = _data(shape)
    pa = _attack(name, shape, seed=0).poison(data)
    pb = _attack(name, shape, seed=1).poison(data)
    assert len(pa.poison_indices) == len(pb.poison_indices) > 0
    assert not torch.equal(pa.poison_indices, pb.poison_indices)


def test_attack_seed_param_overrides_victim_seed() -> None:
    shape = (1, 28, 28)
    a = create_attack("blend", {"seed": 5}, shape, NUM_CLASSES, 0)
    b = create_attack("blend", {"seed": 5}, shape, NUM_CLASSES, 99)
    c = create_attack("blend", {}, shape, NUM_CLASSES, 5)
    assert a.seed == b.seed == c.seed == 5
    assert torch.equal(a.pattern, b.pattern)
    assert torch.equal(a.pattern, c.pattern)


@pytest.mark.parametrize("shape", _ATTACK_SHAPES, ids=_ids)
def test_blend_different_seed_different_trigger(shape: tuple[int, int, int]) -> None:
    a = create_attack("blend", {}, shape, NUM_CLASSES, 0)
    b = create_attack("blend", {}, shape, NUM_CLASSES, 1)
    assert a.pattern.shape == shape
    assert not torch.equal(a.pattern, b.pattern)
    x = torch.rand(4, *shape)
    assert not torch.equal(a.apply_trigger(x), b.apply_trigger(x))


def test_blend_formula_and_test_alpha() -> None:
    shape = (3, 32, 32)
    a = create_attack("blend", {"alpha": 0.2, "test_alpha": 0.5}, shape, NUM_CLASSES, 0)
    x = torch.rand(2, *shape)
    torch.testing.assert_close(a.train_trigger(x), 0.8 * x + 0.2 * a.pattern)
    torch.testing.assert_close(a.apply_trigger(x), 0.5 * x + 0.5 * a.pattern)


def test_badnet_reference_patch() -> None:
    a = create_attack("badnet", {}, (1, 28, 28), NUM_CLASSES, 0)
    xt = a.apply_trigger(torch.full((1, 1, 28, 28), 0.5))
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(xt[0, 0, -3:, -3:], expected)
    assert bool((xt[0, 0, :-3, :] == 0.5).all()) and bool((xt[0, 0, :, :-3] == 0.5).all())


@pytest.mark.parametrize("name", ATTACKS.names())
def test_counts_toward_asr(name: str) -> None:
    attack = _attack(name, (1, 28, 28))
    y = torch.arange(NUM_CLASSES).repeat(3)
    mask = attack.counts_toward_asr(y)
    assert mask.dtype == torch.bool and mask.shape == y.shape
    if name == "none":
        assert not bool(mask.any())
    else:
        assert torch.equal(mask, y != TARGET)
        assert bool((attack.attack_label(y) == TARGET).all())


def test_attack_target_must_be_a_class() -> None:
    with pytest.raises(ValueError, match="target"):
        create_attack("badnet", {"target": NUM_CLASSES}, (1, 28, 28), NUM_CLASSES, 0)


def test_attack_unknown_param_rejected() -> None:
    with pytest.raises(ValueError, match="patch"):
        create_attack("badnet", {"patch": 3}, (1, 28, 28), NUM_CLASSES, 0)


def test_none_attack_cannot_poison() -> None:
    with pytest.raises(ValueError):
        create_attack("none", {"poison_rate": 0.1}, (1, 28, 28), NUM_CLASSES, 0)


# --------------------------------------------------------------------------------- registry contract


@pytest.mark.parametrize(
    ("registry", "lookup"),
    [
        (ARCHITECTURES, lambda n: create_model(n, (1, 16, 16), 10, (0.5,), (0.5,))),
        (ATTACKS, lambda n: create_attack(n, {}, (1, 16, 16), 10, 0)),
        (DATASETS, dataset_info),
    ],
    ids=["architecture", "attack", "dataset"],
)
def test_unknown_name_lists_known_names(registry: Registry[object], lookup) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownNameError) as ei:
        lookup("no_such_thing")
    msg = str(ei.value)
    assert "no_such_thing" in msg
    assert registry.kind in msg
    for known in registry.names():
        assert known in msg
    assert isinstance(ei.value, KeyError)


def test_registry_names_sorted_and_contains() -> None:
    for reg in (ARCHITECTURES, ATTACKS, DATASETS):
        names = reg.names()
        assert names == sorted(names) and names
        for n in names:
            assert n in reg
        assert "no_such_thing" not in reg
    assert {"none", "badnet", "blend"} <= set(ATTACKS.names())
    assert {"small_cnn", "resnet18"} <= set(ARCHITECTURES.names())
    assert {"digits", "mnist", "fashion_mnist", "cifar10"} <= set(DATASETS.names())


@pytest.mark.parametrize("registry", [ARCHITECTURES, ATTACKS, DATASETS], ids=["architecture", "attack", "dataset"])
def test_duplicate_registration_raises(registry: Registry[object]) -> None:
    name = registry.names()[0]
    before = registry.get(name)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(name)(object())
    assert registry.get(name) is before  # the original entry survives


def test_fresh_registry() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    assert reg.get("a") == 1 and reg.names() == ["a", "b"]
    with pytest.raises(ValueError, match="widget 'a' is registered twice"):
        reg.register("a")(3)
    assert reg.get("a") == 1
    with pytest.raises(UnknownNameError, match="unknown widget 'c'; known: a, b"):
        reg.get("c")
