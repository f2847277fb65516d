"""Attack recipes against attacks.md: the formulas, geometry, selection rules and bad input of
each attack (the shared contract is in test_registries.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bdx_study.attacks import ArtifactStore, AttackContext, create_attack
from bdx_study.attacks._triggers import (
    dct2,
    dither_quantize,
    idct2,
    identity_grid,
    quantize,
    rgb_to_yuv,
    wanet_noise_grid,
    warp,
    yuv_to_rgb,
)
from bdx_study.data import ImageData
from tests.test_registries import NUM_CLASSES, make_attack, make_data

# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("name", "params", "shape", "needle"),
    [
        ("badnet", {"patch_size": 29}, (1, 28, 28), "patch_size 29"),
        ("badnet", {"patch_size": 3, "margin": 14}, (1, 16, 16), "margin 14"),
        ("trojan", {"patch_size": 40}, (3, 32, 32), "40x40"),
        ("tact", {"patch_size": 30, "margin": 3}, (3, 32, 32), "30x30"),
        ("trojannn", {"patch_size": 20}, (1, 16, 16), "patch_size 20"),
        ("clean_label", {"patch_size": 9}, (1, 16, 16), "patch_size 9"),
        ("wanet", {"k": 40}, (1, 28, 28), "k 40"),
        ("adaptive_blend", {"pieces": 9}, (1, 28, 28), "pieces 9"),
        ("ftrojan", {"window": 5}, (1, 28, 28), "window 5"),
        ("ftrojan", {"positions": [[40, 2]]}, (1, 28, 28), "(40, 2)"),
        ("lf", {"keep": 40}, (1, 28, 28), "keep 40"),
        ("tact", {"source": 12}, (1, 28, 28), "source 12"),
        ("tact", {"source": 0}, (1, 28, 28), "distinct"),
        ("tact", {"cover_classes": [1, 1]}, (1, 28, 28), "distinct"),
        ("adaptive_blend", {"pieces": 10}, (1, 28, 28), "square number"),
        ("blend", {"trigger_image": "/no/such/file.png"}, (1, 28, 28), "no such file"),
    ],
)
def test_bad_params_fail_with_a_clear_message(
    name: str, params: dict[str, object], shape: tuple[int, int, int], needle: str
) -> None:
    with pytest.raises(ValueError) as ei:
        create_attack(name, params, shape, NUM_CLASSES, 0)
    assert needle in str(ei.value)


@pytest.mark.parametrize("name", ["sig", "clean_label", "tact"])
def test_class_restricted_attacks_check_their_class_counts(name: str) -> None:
    data = make_data((1, 28, 28))  # 20 images of the target (3), 15 of the source (1)
    attack = make_attack(name, (1, 28, 28), poison_rate=0.4)  # int(150 * 0.4) = 60
    with pytest.raises(ValueError) as ei:
        attack.check_data(data)
    msg = str(ei.value)
    assert name in msg and "60 images" in msg
    assert ("source class 1" in msg) if name == "tact" else ("target class 3" in msg)
    with pytest.raises(ValueError):
        attack.poison(data)  # poisoning checks too


# ------------------------------------------------------------------------------ recipes


def test_badnet_reference_patch() -> None:
    a = create_attack("badnet", {}, (1, 28, 28), NUM_CLASSES, 0)
    xt = a.apply_trigger(torch.full((1, 1, 28, 28), 0.5))
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(xt[0, 0, -3:, -3:], expected)  # rows/columns 25-27
    assert bool((xt[0, 0, :-3, :] == 0.5).all()) and bool((xt[0, 0, :, :-3] == 0.5).all())


def test_all_to_all_labels() -> None:
    data = make_data((1, 28, 28))
    ps = make_attack("badnet_all2all", (1, 28, 28)).poison(data)
    assert torch.equal(ps.data.y[ps.poison_indices], (data.y[ps.poison_indices] + 1) % NUM_CLASSES)


@pytest.mark.parametrize(("shape", "rows"), [((3, 32, 32), (21, 29)), ((1, 28, 28), (19, 26)), ((1, 16, 16), (11, 15))])
def test_trojan_square_geometry(shape: tuple[int, int, int], rows: tuple[int, int]) -> None:
    a = create_attack("trojan", {}, shape, NUM_CLASSES, 0)
    m = a.mask[0]  # type: ignore[attr-defined]
    r = m.any(dim=1).nonzero().flatten()
    c = m.any(dim=0).nonzero().flatten()
    assert (int(r[0]), int(r[-1]) + 1) == rows and (int(c[0]), int(c[-1]) + 1) == rows
    assert set(a.trigger.unique().tolist()) <= {0.0, 1.0}  # type: ignore[attr-defined]


def test_tact_selects_source_and_cover_classes() -> None:
    data = make_data((1, 28, 28))
    a = make_attack("tact", (1, 28, 28))
    ps = a.poison(data)
    assert bool((data.y[ps.poison_indices] == 1).all()) and bool((ps.data.y[ps.poison_indices] == 3).all())
    assert set(data.y[ps.cover_indices].tolist()) <= {5, 7}
    assert torch.equal(ps.data.y[ps.cover_indices], data.y[ps.cover_indices])
    torch.testing.assert_close(ps.data.x[ps.cover_indices], a.apply_trigger(data.x[ps.cover_indices]))


def test_sig_formula() -> None:
    a = create_attack("sig", {"delta": 0.1, "frequency": 6}, (3, 32, 32), NUM_CLASSES, 0)
    x = torch.full((1, 3, 32, 32), 0.5)
    v = a.apply_trigger(x) - x
    j = torch.arange(32, dtype=torch.float32)
    expected = 0.1 * torch.sin(2 * math.pi * j * 6 / 32)
    torch.testing.assert_close(v[0, 1, 7], expected)
    assert torch.equal(v[0, 0], v[0, 2]) and torch.equal(v[0, 0, 0], v[0, 0, 31])  # same rows, channels
    assert create_attack("sig", {}, (3, 32, 32), 10, 0).delta == pytest.approx(30 / 255)  # type: ignore[attr-defined]


def test_clean_label_pgd_moves_target_images_then_stamps_corners() -> None:
    data = make_data((1, 28, 28))
    a = make_attack("clean_label", (1, 28, 28), pgd_steps=3)
    ps = a.poison(data)
    idx = ps.poison_indices
    assert bool((data.y[idx] == 3).all()) and torch.equal(ps.data.y, data.y)  # labels all kept
    delta = ps.data.x[idx] - data.x[idx]
    inner = delta[:, :, 3:-3, 3:-3]  # away from the corner patches: only the adversarial part
    assert float(inner.abs().max()) > 0
    per_image = inner.flatten(1).norm(dim=1)
    assert bool((per_image <= a.eps + 1e-4).all())  # type: ignore[attr-defined]
    assert a.eps == pytest.approx(600 / 255 * math.sqrt(784 / 3072))  # type: ignore[attr-defined]
    xt = a.apply_trigger(torch.full((1, 1, 28, 28), 0.5))
    for corner in (xt[0, 0, :3, :3], xt[0, 0, :3, -3:], xt[0, 0, -3:, :3], xt[0, 0, -3:, -3:]):
        assert set(corner.unique().tolist()) == {0.0, 1.0}
    assert bool((xt[0, 0, 3:-3, 3:-3] == 0.5).all())


def test_wanet_grid_recipe_and_noise_mode() -> None:
    a = create_attack("wanet", {"strength": 0.5, "k": 4}, (1, 28, 28), NUM_CLASSES, 0)
    noise = wanet_noise_grid(4, 28, 28, a.generator(2))
    torch.testing.assert_close(a.noise_grid, noise)  # type: ignore[attr-defined]
    grid = (identity_grid(28, 28) + 0.5 * noise / 28).clamp(-1, 1)
    torch.testing.assert_close(a.grid, grid)  # type: ignore[attr-defined]
    # the identity grid reproduces the image (align_corners=True)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(warp(x, identity_grid(28, 28)), x, atol=1e-5, rtol=0)
    # cover_noise fixed: covers warped once with grid + U(-1, 1)/H, no hook
    data = make_data((1, 28, 28))
    fixed = make_attack("wanet", (1, 28, 28), cover_noise="fixed")
    ps = fixed.poison(data)
    assert fixed.training_hook() is None
    assert not torch.equal(ps.data.x[ps.cover_indices], data.x[ps.cover_indices])
    per_batch = make_attack("wanet", (1, 28, 28))
    ps2 = per_batch.poison(data)
    assert per_batch.training_hook() is not None
    assert torch.equal(ps2.data.x[ps2.cover_indices], data.x[ps2.cover_indices])  # warped batch by batch


def test_adaptive_blend_drops_half_the_blocks() -> None:
    a = make_attack("adaptive_blend", (1, 28, 28), alpha=1.0, test_alpha=1.0)
    x = torch.zeros(3, 1, 28, 28)
    out = a.poison_images(x, torch.Generator().manual_seed(0))
    pattern = a.pattern  # type: ignore[attr-defined]
    for img in out:
        blocks = img[0].view(4, 7, 4, 7).permute(0, 2, 1, 3).reshape(16, 49)
        kept = torch.isclose(blocks, pattern[0].view(4, 7, 4, 7).permute(0, 2, 1, 3).reshape(16, 49)).all(1)
        assert int(kept.sum()) == 8 and bool((blocks[~kept] == 0).all())
    torch.testing.assert_close(a.apply_trigger(x), pattern.expand(3, -1, -1, -1))  # full trigger at test


def test_adaptive_patch_chunks_and_test_trigger() -> None:
    a = make_attack("adaptive_patch", (3, 32, 32))
    x = torch.full((8, 3, 32, 32), 0.5)
    out = a.poison_images(x, torch.Generator())
    masks = [m for _, m in a.triggers]  # type: ignore[attr-defined]
    for j in range(4):  # chunk j carries trigger j only
        changed = (out[2 * j] != 0.5).any(0)
        assert bool(changed.le(masks[j][0].bool()).all()) and bool(changed.any())
    test_mask = a.test_trigger[1][0]  # type: ignore[attr-defined]
    assert bool(test_mask[-5:, :5].all()) and bool(test_mask[-5:, -5:].all()) and bool(test_mask[:3, :3].all())


def test_bpp_quantization_and_dithering() -> None:
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    q = quantize(x, 8)
    assert set((q * 7).round().unique().tolist()) <= set(range(8))
    d = dither_quantize(x, 8)
    assert torch.allclose(d * 7, (d * 7).round(), atol=1e-5)  # on the 8 levels
    # dithering keeps the local mean much better than plain rounding
    assert (d - x).mean().abs() < 0.01 and not torch.equal(d, q)
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert abs(float(dither_quantize(flat, 2).mean()) - 0.3) < 0.1  # halftoning of a flat 30% grey
    assert float(quantize(flat, 2).mean()) == 0.0


def test_ftrojan_bumps_the_chosen_dct_coefficients() -> None:
    gray = create_attack("ftrojan", {"magnitude": 0.05}, (1, 28, 28), NUM_CLASSES, 0)
    x = torch.full((1, 1, 28, 28), 0.5)
    diff = dct2(gray.apply_trigger(x)[0, 0]) - dct2(x[0, 0])
    expected = torch.zeros(28, 28)
    expected[13, 13] = expected[27, 27] = 0.05
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=0)
    rgb = create_attack("ftrojan", {}, (3, 32, 32), NUM_CLASSES, 0)
    x3 = torch.full((1, 3, 32, 32), 0.5)
    dyuv = dct2(rgb_to_yuv(rgb.apply_trigger(x3))) - dct2(rgb_to_yuv(x3))
    assert float(dyuv[0, 0].abs().max()) < 1e-4  # Y untouched
    assert float(dyuv[0, 1, 31, 31]) == pytest.approx(30 / 255, abs=1e-4)
    torch.testing.assert_close(yuv_to_rgb(rgb_to_yuv(x3)), x3)
    torch.testing.assert_close(idct2(dct2(x3)), x3, atol=1e-5, rtol=0)


def test_lf_trigger_is_low_frequency_and_bounded() -> None:
    a = create_attack("lf", {"mode": "random", "eps": 0.1}, (1, 28, 28), NUM_CLASSES, 0)
    pat = a.pattern[0]  # type: ignore[attr-defined]
    assert float(pat.abs().max()) == pytest.approx(0.1)
    coef = dct2(pat)
    assert float(coef[3:, :].abs().max()) < 1e-5 and float(coef[:, 3:].abs().max()) < 1e-5  # keep = 28 // 8
    data = make_data((1, 28, 28))
    uap = make_attack("lf", (1, 28, 28))
    with pytest.raises(ValueError, match="not fitted"):
        uap.apply_trigger(data.x[:2])
    uap.prepare(data)
    assert float(uap.pattern.abs().max()) <= 0.1 + 1e-6  # type: ignore[attr-defined]


def test_blend_trigger_image_from_a_file(tmp_path: Path) -> None:
    from PIL import Image

    img = np.zeros((40, 40, 3), dtype=np.uint8)
    img[:, 20:] = 255
    path = tmp_path / "trigger.png"
    Image.fromarray(img).save(path)
    a = create_attack("blend", {"trigger_image": str(path), "alpha": 1.0}, (3, 32, 32), NUM_CLASSES, 0)
    out = a.apply_trigger(torch.zeros(1, 3, 32, 32))
    assert float(out[0, :, :, :14].max()) == 0.0 and float(out[0, :, :, 18:].min()) == 1.0
    gray = create_attack("blend", {"trigger_image": str(path)}, (1, 28, 28), NUM_CLASSES, 0)
    assert gray.pattern.shape == (1, 28, 28)  # type: ignore[attr-defined]
    before = a.identity()["trigger_image_sha256"]
    img[:, :5] = 128
    Image.fromarray(img).save(path)
    b = create_attack("blend", {"trigger_image": str(path)}, (3, 32, 32), NUM_CLASSES, 0)
    assert b.identity()["trigger_image_sha256"] != before  # a changed file is a different victim


def test_issba_encoder_cached_in_the_store(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    data = make_data((1, 16, 16))
    a = make_attack("issba", (1, 16, 16))
    a.prepare(data, AttackContext(store=store))
    b = make_attack("issba", (1, 16, 16), seed=1)  # another victim seed: same encoder, other secret
    b.prepare(data, AttackContext(store=store))
    assert len(list(tmp_path.iterdir())) == 1
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.secret, b.secret)  # type: ignore[attr-defined]
    # a corrupted entry is rebuilt
    entry = next(tmp_path.iterdir())
    (entry / "tensors.safetensors").write_bytes(b"junk")
    assert store.load("issba_encoder", {}) is None
    c = make_attack("issba", (1, 16, 16))
    c.prepare(data, AttackContext(store=store))
    assert torch.equal(c.apply_trigger(data.x[:4]), a.apply_trigger(data.x[:4]))


def test_dynamic_triggers_differ_per_input_and_masks_are_sparse() -> None:
    data = make_data((1, 28, 28))
    a = make_attack("dynamic", (1, 28, 28), mask_steps=30, width=8)
    a.prepare(data)
    x = data.x[10:20]
    delta = (a.apply_trigger(x) - x).abs()
    assert not torch.allclose(delta[0], delta[1])  # input-aware: a different trigger per input
    density = float(a.mask(x).mean())  # type: ignore[attr-defined]
    assert density < 0.3  # pulled towards mask_density (0.032) by the norm loss


def test_dynamic_trains_on_the_trigger_it_tests_with() -> None:
    """The hook's poisoned images are exactly apply_trigger's (same G, M, sigmoid, threshold), and
    its cross samples carry another image's pattern and mask; a mask generator trained only a
    few steps leaves M's raw outputs far from saturated, so a hook that skips M's sigmoid shows."""
    from bdx_study.attacks.dynamic import threshold

    data = make_data((1, 16, 16))
    a = make_attack("dynamic", (1, 16, 16), mask_steps=3, width=4)
    a.prepare(data)
    hook = a.training_hook()
    model = torch.nn.Linear(1, 1)
    hook.start(model, torch.optim.Adam(model.parameters(), lr=1e-3), torch.device("cpu"))
    x, y = data.x[:64], data.y[:64]
    out = hook.batch(x, y, torch.arange(64), torch.Generator().manual_seed(0))
    n_bd, n_cross = out.n_poison, out.n_cover
    assert n_bd > 0 and n_cross > 0
    assert bool((out.y[:n_bd] == a.target).all()) and torch.equal(out.y[n_bd:], y[n_bd:])
    assert torch.allclose(out.x[:n_bd].detach(), a.apply_trigger(x[:n_bd]), atol=1e-5)
    assert torch.equal(out.x[n_bd + n_cross :], x[n_bd + n_cross :])
    other = x[torch.randperm(64, generator=torch.Generator().manual_seed(0))][:n_cross]
    with torch.no_grad():
        cross = x[n_bd : n_bd + n_cross]
        expected = cross + (a.pattern(other) - cross) * threshold(a.mask(other))  # type: ignore[attr-defined]
    assert torch.allclose(out.x[n_bd : n_bd + n_cross].detach(), expected, atol=1e-5)
    hook.finish()


def test_trojannn_trigger_fires_the_selected_neurons() -> None:
    from bdx_study.archs import create_model, penultimate_layer
    from bdx_study.attacks.trojannn import select_neurons

    torch.manual_seed(0)
    model = create_model("small_cnn", (1, 28, 28), NUM_CLASSES, (0.5,), (0.25,)).eval()
    a = make_attack("trojannn", (1, 28, 28), trigger_steps=60, neurons=2)
    neurons = select_neurons(penultimate_layer(model), 2)
    captured: list[torch.Tensor] = []
    handle = penultimate_layer(model).register_forward_hook(lambda _m, i, _o: captured.append(i[0]))
    model(torch.zeros(1, 1, 28, 28))
    before = captured[-1][0, neurons].abs().sum().detach()
    a.fit_trigger(model)  # type: ignore[attr-defined]
    model(a.trigger[None])  # type: ignore[attr-defined]
    handle.remove()
    assert float(captured[-1][0, neurons].abs().sum().detach()) > float(before)
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was
    outside = a.trigger * (1 - a.mask)  # type: ignore[attr-defined]
    assert float(outside.abs().max()) == 0.0


def test_poisoned_uint8_data_is_stored_rounded() -> None:
    pixels = (torch.rand(150, 1, 28, 28) * 255).to(torch.uint8)
    data = ImageData(pixels, make_data((1, 28, 28)).y)
    ps = make_attack("blend", (1, 28, 28)).poison(data)
    assert ps.data.pixels.dtype == torch.uint8
    untouched = torch.ones(150, dtype=torch.bool)
    untouched[ps.poison_indices] = False
    assert torch.equal(ps.data.pixels[untouched], pixels[untouched])
