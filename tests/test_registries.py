"""Contract tests over the registries: every architecture on every shape it claims, every attack
on 1x16x16, 1x28x28 and 3x32x32 data, plus the registry itself. Attacks that fit something
(a surrogate, an encoder, generators) run with the tiny budgets their class gives
(``quick_params``, required of every built-in that trains something)."""

from __future__ import annotations

import pytest
import torch

from bdx_study._registry import Registry, UnknownNameError
from bdx_study.archs import ARCHITECTURES, check_input_shape, create_model
from bdx_study.attacks import ATTACKS, Attack, PoisonedSet, create_attack
from bdx_study.data import DATASETS, ImageData, dataset_info
from bdx_study.training import fit

NUM_CLASSES = 10
TARGET = 3
POISON_RATE = 0.07
COVER_RATE = 0.04
N = 150  # int(150 * 0.07) = 10, int(150 * 0.04) = 6
SHAPES = [(1, 16, 16), (1, 28, 28), (3, 32, 32)]

LABEL_KEEPING = {"sig", "clean_label"}  # clean-label: poisoned images keep their (target) labels


def _ids(v: object) -> str:
    return "x".join(map(str, v)) if isinstance(v, tuple) else str(v)


# --------------------------------------------------------------------------------- architectures


def _arch_cases() -> list[tuple[str, tuple[int, int, int]]]:
    return [(name, shape) for name in ARCHITECTURES.names() for shape in ARCHITECTURES.get(name).input_shapes]


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


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_architecture_metadata(name: str) -> None:
    spec = ARCHITECTURES.get(name)
    assert spec.name == name and spec.description
    assert spec.input_shapes and len(set(spec.input_shapes)) == len(spec.input_shapes)
    for c, h, w in spec.input_shapes:
        assert c in (1, 3) and h >= 16 and w >= 16


@pytest.mark.parametrize(
    ("name", "shape"), [("vgg16_bn", (1, 28, 28)), ("resnet18", (3, 64, 64)), ("small_cnn", (2, 28, 28))]
)
def test_architecture_refuses_other_shapes(name: str, shape: tuple[int, int, int]) -> None:
    for call in (lambda: check_input_shape(name, shape), lambda: create_model(name, shape, 10, (0.5,), (0.5,))):
        with pytest.raises(ValueError) as ei:
            call()
        msg = str(ei.value)
        assert name in msg and "x".join(map(str, shape)) in msg
        for ok in ARCHITECTURES.get(name).input_shapes:
            assert "x".join(map(str, ok)) in msg


def test_architecture_normalizes_inside() -> None:
    """The model sees (x - mean) / std: shifting mean and x together leaves the logits unchanged."""
    torch.manual_seed(0)
    a = create_model("small_cnn", (1, 16, 16), NUM_CLASSES, (0.0,), (1.0,)).eval()
    b = create_model("small_cnn", (1, 16, 16), NUM_CLASSES, (0.5,), (1.0,)).eval()
    b.body.load_state_dict(a.body.state_dict())
    x = torch.rand(3, 1, 16, 16) * 0.5
    torch.testing.assert_close(a(x), b(x + 0.5))


def test_every_dataset_has_an_architecture() -> None:
    shapes = {s for n in ARCHITECTURES.names() for s in ARCHITECTURES.get(n).input_shapes}
    for name in DATASETS.names():
        assert dataset_info(name).input_shape in shapes, name


# --------------------------------------------------------------------------------- attacks


def params(name: str, **extra: object) -> dict[str, object]:
    """Contract-test params: target 3, rates 0.07 / 0.04 where the attack has them, tiny budgets."""
    if name == "none":
        return {}
    quick = ATTACKS.get(name).quick_params or {}
    p: dict[str, object] = {"poison_rate": POISON_RATE, "target": TARGET, **quick}
    if "cover_rate" in ATTACKS.get(name).Params.model_fields:
        p["cover_rate"] = COVER_RATE
    return {**p, **extra}


def make_data(shape: tuple[int, int, int], seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, *shape, generator=g)
    x[:5] = 0.0  # extremes: the trigger must keep them in range
    x[5:10] = 1.0
    y = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    y[:20] = TARGET  # clean-label attacks need 10 target images
    y[20:35] = 1  # TaCT's source class
    y[35:45] = 5  # and its cover classes
    return ImageData(x, y)


def make_attack(name: str, shape: tuple[int, int, int], seed: int = 0, **extra: object) -> Attack:
    return create_attack(name, params(name, **extra), shape, NUM_CLASSES, seed)


def trained(attack: Attack, data: ImageData, steps: int = 2) -> PoisonedSet:
    """Poison ``data`` and, for attacks that control training, train a small CNN for ``steps``
    steps through the hook (so that their learned trigger exists)."""
    ps = attack.poison(data)
    hook = attack.training_hook()
    if hook is not None:
        c = attack.input_shape[0]
        torch.manual_seed(0)
        model = create_model("small_cnn", attack.input_shape, NUM_CLASSES, (0.5,) * c, (0.25,) * c)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        fit(
            model,
            ps.data,
            opt,
            epochs=1,
            batch_size=64,
            gen=torch.Generator().manual_seed(0),
            hook=hook,
            max_steps=steps,
        )
    return ps


def _attack_cases() -> list[tuple[str, tuple[int, int, int]]]:
    return [(name, shape) for name in ATTACKS.names() for shape in SHAPES]


@pytest.mark.parametrize(("name", "shape"), _attack_cases(), ids=_ids)
def test_attack_poison_contract(name: str, shape: tuple[int, int, int]) -> None:
    data = make_data(shape)
    x0, y0 = data.x.clone(), data.y.clone()
    attack = make_attack(name, shape)
    ps = attack.poison(data)

    assert torch.equal(data.x, x0) and torch.equal(data.y, y0)  # the input is not modified in place
    out = ps.data
    assert out.x.shape == data.x.shape and out.x.dtype == torch.float32
    assert out.y.shape == data.y.shape and out.y.dtype == torch.int64
    assert float(out.x.min()) >= 0.0 and float(out.x.max()) <= 1.0

    idx, cov = ps.poison_indices, ps.cover_indices
    if name == "none" or attack.controls_training:
        assert len(idx) == 0 and len(cov) == 0  # no fixed poisoned set (the hook poisons batches)
        assert torch.equal(out.x, x0) and torch.equal(out.y, y0)
        return
    assert len(idx) == int(N * attack.poison_rate) == 10
    assert len(cov) == int(N * attack.cover_rate) == (6 if attack.cover_rate else 0)
    both = torch.cat([idx, cov])
    assert len(torch.unique(both)) == len(both)  # disjoint, no repeats
    assert bool(((both >= 0) & (both < N)).all())
    assert torch.equal(idx, idx.sort().values) and torch.equal(cov, cov.sort().values)

    # label rules: poisons get the attack label (clean-label: their own), covers keep theirs
    if name in LABEL_KEEPING:
        assert bool((y0[idx] == TARGET).all()) and torch.equal(out.y[idx], y0[idx])
    else:
        assert torch.equal(out.y[idx], attack.attack_label(y0[idx]))
    assert torch.equal(out.y[cov], y0[cov])
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[both] = False
    assert torch.equal(out.x[untouched], x0[untouched]) and torch.equal(out.y[untouched], y0[untouched])
    assert not torch.equal(out.x[idx], x0[idx])  # the trigger changes the poisoned images


@pytest.mark.parametrize(("name", "shape"), _attack_cases(), ids=_ids)
def test_attack_trigger_range_and_shape(name: str, shape: tuple[int, int, int]) -> None:
    data = make_data(shape)
    attack = make_attack(name, shape)
    trained(attack, data)
    x = data.x
    x0 = x.clone()
    xt = attack.apply_trigger(x)
    assert xt.shape == x.shape and xt.dtype == torch.float32
    assert float(xt.min()) >= 0.0 and float(xt.max()) <= 1.0
    # a pure function: the input is untouched and the result repeatable
    assert torch.equal(x, x0)
    assert torch.equal(attack.apply_trigger(x), xt)
    assert attack.apply_trigger(x[:0]).shape == (0, *shape)
    if name == "none":
        assert torch.equal(xt, x)
    else:
        assert not torch.equal(xt, x)


@pytest.mark.parametrize(("name", "shape"), _attack_cases(), ids=_ids)
def test_attack_deterministic_under_seed(name: str, shape: tuple[int, int, int]) -> None:
    data = make_data(shape)
    a, b = make_attack(name, shape, seed=7), make_attack(name, shape, seed=7)
    pa, pb = trained(a, data), trained(b, data)
    assert torch.equal(pa.poison_indices, pb.poison_indices)
    assert torch.equal(pa.cover_indices, pb.cover_indices)
    assert torch.equal(pa.data.x, pb.data.x)
    assert torch.equal(pa.data.y, pb.data.y)
    assert torch.equal(a.apply_trigger(data.x), b.apply_trigger(data.x))
    assert a.identity() == b.identity()


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n != "none"])
def test_attack_different_seed(name: str, shape: tuple[int, int, int]) -> None:
    """A different seed draws different poison indices and, where the trigger is random, a
    different trigger."""
    data = make_data(shape)
    a, b = make_attack(name, shape, seed=0), make_attack(name, shape, seed=1)
    pa, pb = trained(a, data), trained(b, data)
    if not a.controls_training:
        assert len(pa.poison_indices) == len(pb.poison_indices) > 0
        assert not torch.equal(pa.poison_indices, pb.poison_indices)
    x = data.x[10:20]
    same = torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    assert same != type(a).random_trigger, f"random_trigger={type(a).random_trigger} but same trigger: {same}"


@pytest.mark.parametrize(("name", "shape"), _attack_cases(), ids=_ids)
def test_attack_state_round_trip(name: str, shape: tuple[int, int, int]) -> None:
    """What training taught the trigger is in state_dict: a fresh instance loading it applies the
    same test-time trigger (how a cached victim's attack is rebuilt)."""
    data = make_data(shape)
    a = make_attack(name, shape)
    trained(a, data)
    b = make_attack(name, shape)
    b.load_state_dict(a.state_dict())
    x = data.x[:12]
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if ATTACKS.get(n).controls_training or n == "wanet"])
def test_training_hook_contract(name: str, shape: tuple[int, int, int]) -> None:
    data = make_data(shape)
    attack = make_attack(name, shape)
    ps = trained(attack, data)  # the hook has run (TrojanNN: its trigger is fitted)
    hook = attack.training_hook()
    assert hook is not None
    c = shape[0]
    model = create_model("small_cnn", shape, NUM_CLASSES, (0.5,) * c, (0.25,) * c)
    hook.start(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))
    hook.start_epoch(model, 0, 1)
    idx = torch.arange(10, 110)  # past the all-black and all-white images
    x, y = ps.data.images(idx), ps.data.y[idx]
    x0 = x.clone()
    out = hook.batch(x, y, idx, torch.Generator().manual_seed(0))
    again = hook.batch(x, y, idx, torch.Generator().manual_seed(0))
    hook.finish()
    assert torch.equal(x, x0)  # the batch is not modified in place
    xo = out.x.detach()
    assert xo.shape == x.shape and float(xo.min()) >= 0.0 and float(xo.max()) <= 1.0
    assert torch.equal(out.x.detach(), again.x.detach()) and torch.equal(out.y, again.y)  # the generator decides
    if name == "wanet":  # noise-mode covers: fresh noise on the batch's cover images, labels kept
        n_cov = int(torch.isin(idx, ps.cover_indices).sum())
        assert out.n_cover == n_cov and out.n_poison == 0 and torch.equal(out.y, y)
        return
    n_bd = int(100 * attack.poison_rate)
    n_cov = int(100 * attack.cover_rate)
    assert (out.n_poison, out.n_cover) == (n_bd, n_cov)
    assert bool((out.y[:n_bd] == TARGET).all())
    assert torch.equal(out.y[n_bd:], y[n_bd:])  # covers (negatives, cross samples) and the rest keep labels
    assert not torch.equal(out.x[:n_bd], x[:n_bd])
    assert torch.equal(out.x[n_bd + n_cov :].detach(), x[n_bd + n_cov :])  # the rest stay clean


@pytest.mark.parametrize("name", ATTACKS.names())
def test_counts_toward_asr(name: str) -> None:
    attack = make_attack(name, (1, 28, 28))
    y = torch.arange(NUM_CLASSES).repeat(3)
    mask = attack.counts_toward_asr(y)
    label = attack.attack_label(y)
    assert mask.dtype == torch.bool and mask.shape == y.shape
    if name == "none":
        assert not bool(mask.any())
    elif name == "tact":
        assert torch.equal(mask, y == 1) and bool((label == TARGET).all())  # the source class only
    elif name == "badnet_all2all":
        assert bool(mask.all()) and torch.equal(label, (y + 1) % NUM_CLASSES)
    else:
        assert torch.equal(mask, y != TARGET)
        assert bool((label == TARGET).all())


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n != "none"])
def test_reference_rates_adapted_per_size(name: str) -> None:
    """Defaults resolve per input size (16, 28, 32), and a given rate wins."""
    cls = ATTACKS.get(name)
    for shape in SHAPES:
        a = create_attack(name, {}, shape, NUM_CLASSES, 0)
        assert 0 < a.poison_rate < 1 and 0 <= a.cover_rate < 1
        assert a.identity()["poison_rate"] == a.poison_rate
        assert a.poison_rate == cls.reference_rates.get(shape[1], cls.reference_rates[32])
    assert create_attack(name, {"poison_rate": 0.123}, (1, 28, 28), NUM_CLASSES, 0).poison_rate == 0.123


def test_issue_attacks_registered() -> None:
    expected = {
        "badnet", "badnet_all2all", "blend", "trojan", "sig", "clean_label", "wanet", "tact", "adaptive_blend",
        "adaptive_patch", "lf", "ftrojan", "issba", "dynamic", "bpp", "trojannn",
    }  # fmt: skip
    assert expected <= set(ATTACKS.names()) and len(set(ATTACKS.names()) - {"none"}) >= 16


def test_attack_seed_param_overrides_victim_seed() -> None:
    shape = (1, 28, 28)
    a = create_attack("blend", {"seed": 5}, shape, NUM_CLASSES, 0)
    b = create_attack("blend", {"seed": 5}, shape, NUM_CLASSES, 99)
    c = create_attack("blend", {}, shape, NUM_CLASSES, 5)
    assert a.seed == b.seed == c.seed == 5
    assert torch.equal(a.pattern, b.pattern)  # type: ignore[attr-defined]
    assert torch.equal(a.pattern, c.pattern)  # type: ignore[attr-defined]


def test_attack_target_must_be_a_class() -> None:
    for name in [n for n in ATTACKS.names() if n != "none"]:
        with pytest.raises(ValueError, match=rf"{name}.*target {NUM_CLASSES} must be < num_classes"):
            create_attack(name, {"target": NUM_CLASSES}, (1, 28, 28), NUM_CLASSES, 0)


@pytest.mark.parametrize("name", [n for n in ATTACKS.names() if n != "none"])
def test_attack_unknown_param_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="no_such_param"):
        create_attack(name, {"no_such_param": 3}, (1, 28, 28), NUM_CLASSES, 0)


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
    assert {"digits", "mnist", "fashion_mnist", "cifar10", "gtsrb", "imagenette"} <= set(DATASETS.names())


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


def test_a_declared_name_is_known_before_its_module_and_registered_only_by_it() -> None:
    from bdx_study._registry import Registry, UnknownNameError

    reg: Registry[int] = Registry("thing")
    reg.declare("a", "json", spec="a's spec")
    assert "a" in reg and reg.names() == ["a"] and reg.spec("a") == "a's spec" and not reg.loaded("a")
    with pytest.raises(ValueError, match="registered twice: it is built in"):
        reg.register("a", "my_module")(1)
    with pytest.raises(RuntimeError, match="did not register thing 'a'"):
        reg.get("a")  # json imports, but registers nothing
    reg.register("a", "json")(2)
    assert reg.get("a") == 2 and reg.loaded("a")
    with pytest.raises(UnknownNameError, match="known: a"):
        reg.require("b")
