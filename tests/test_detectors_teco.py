"""TeCo: the corruptions (pure, in range, seeded per input), never compounded, and the score."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import Tensor, nn

from bdx_study.archs import Classifier, create_model
from bdx_study.data import DatasetInfo, ImageData
from bdx_study.detectors import FitContext, create_detector
from bdx_study.detectors._corruptions import CORRUPTIONS, TABLES, Corruption, applicable, corrupt, draw_batch

CPU = torch.device("cpu")
SHAPES = [(1, 16, 16), (1, 28, 28), (3, 32, 32)]


def _info(shape: tuple[int, int, int]) -> DatasetInfo:
    return DatasetInfo("probe", shape, 10, (0.5,) * shape[0], (0.5,) * shape[0], crop_padding=0, horizontal_flip=False)


def _ctx(shape: tuple[int, int, int]) -> FitContext:
    model = create_model("small_cnn", shape, 10, (0.5,) * shape[0], (0.5,) * shape[0]).eval()
    empty = ImageData(torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long))
    return FitContext(model=model, clean=empty, holdout=empty, info=_info(shape), device=CPU)


@pytest.mark.parametrize("table", sorted(TABLES))
@pytest.mark.parametrize("shape", SHAPES)
def test_every_corruption_is_pure_in_range_and_seeded_per_input(shape: tuple[int, int, int], table: str) -> None:
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    assert set(TABLES[table]) == set(CORRUPTIONS)
    for name in applicable(shape):
        c = CORRUPTIONS[name]
        draws = draw_batch(c, x, 0, table)
        alone = draw_batch(c, x[1:2], 0, table)
        if draws is not None:
            assert alone is not None and torch.equal(draws[1:2], alone), name  # same draws in any batch
        change = 0.0
        for s in range(1, 6):
            y = corrupt(x, name, s, draws, table)
            assert y.shape == x.shape and y.dtype == x.dtype, name
            assert y.min() >= 0 and y.max() <= 1, (name, s)
            change = max(change, float((y - x).abs().mean()))
        assert change > 1e-3, name  # it does change the image
        assert torch.equal(x, before), f"{name} changed its input"
    assert ("saturate" in applicable(shape)) == (shape[0] == 3)


def test_first_change_matches_every_severity_evaluated() -> None:
    """Leaving a corruption type at an input's first change gives what evaluating every
    severity of every type on the whole batch gives."""
    shape = (1, 16, 16)
    names = ["gaussian_noise", "contrast", "pixelate"]
    family = create_detector("teco", {"teco_corruptions": names})
    fitted = family.fit("main", _ctx(shape))
    torch.manual_seed(0)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(256, 10)), (0.5,), (0.5,)).eval()  # labels that move
    x = torch.rand(16, *shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pred = model(x).argmax(1)
        got = family.features("main", fitted, model, x, pred, CPU)["teco_first_change"]
        want = torch.full((16, 3), 6.0)
        for k, name in enumerate(names):
            draws = draw_batch(CORRUPTIONS[name], x, 0, "imagenet_c")
            for s in range(5, 0, -1):
                changed = model(corrupt(x, name, s, draws, "imagenet_c")).argmax(1) != pred
                want[changed, k] = float(s)
    assert torch.equal(got, want)
    assert (got < 6).any() and (got > 1).any()  # the check is not vacuous


def test_each_corruption_sees_the_original_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """BackdoorBench compounds corruptions in place; every call here must get the original x."""
    seen: list[Tensor] = []

    def spy(x: Tensor, severity: int, draws: Tensor | None) -> Tensor:
        seen.append(x.clone())
        return torch.zeros_like(x) if severity % 2 else torch.ones_like(x)  # a large change each time

    for name in ("spy_a", "spy_b"):
        monkeypatch.setitem(CORRUPTIONS, name, Corruption(name, spy))
        monkeypatch.setitem(TABLES["imagenet_c"], name, [1, 2, 3, 4, 5])
    shape = (1, 16, 16)
    family = create_detector("teco", {"teco_corruptions": ["spy_a", "spy_b"]})
    ctx = _ctx(shape)
    fitted = family.fit("main", ctx)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(2))
    pred = ctx.model(x).argmax(1)
    family.features("main", fitted, ctx.model, x, pred, CPU)
    assert len(seen) >= 2
    for got in seen:  # each call gets original images (the inputs whose label has not changed yet)
        assert ((got[:, None] == x[None]).flatten(2).all(2).sum(1) == 1).all()


def test_scores_do_not_depend_on_the_batch() -> None:
    shape = (1, 16, 16)
    family = create_detector("teco", {"teco_corruptions": ["gaussian_noise", "glass_blur", "contrast"]})
    ctx = _ctx(shape)
    fitted = family.fit("main", ctx)
    x = torch.rand(6, *shape, generator=torch.Generator().manual_seed(3))
    pred = ctx.model(x).argmax(1)
    full = family.features("main", fitted, ctx.model, x, pred, CPU)["teco_first_change"]
    part = family.features("main", fitted, ctx.model, x[2:4], pred[2:4], CPU)["teco_first_change"]
    assert torch.equal(full[2:4], part)
    s = family.score({"teco_first_change": full}, pred)
    assert torch.allclose(s, full.std(1, unbiased=False))


def test_corruption_lists_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown torch corruptions"):
        create_detector("teco", {"teco_corruptions": ["gaussian_noise", "frost"]})
    with pytest.raises(ValueError, match="do not apply to 1-channel"):
        create_detector("teco", {"teco_corruptions": ["contrast", "saturate"]}).fit("main", _ctx((1, 16, 16)))
    with pytest.raises(ValueError, match="refuses images smaller than 32x32"):
        create_detector("teco", {"teco_backend": "imagecorruptions"}).fit("main", _ctx((1, 28, 28)))
    fitted = create_detector("teco").fit("main", _ctx((3, 32, 32)))
    assert fitted.meta["corruptions"] == applicable((3, 32, 32)) and len(fitted.meta["corruptions"]) == 16


@pytest.mark.skipif(importlib.util.find_spec("imagecorruptions") is None, reason="imagecorruptions not installed")
def test_library_backend_on_colour_images() -> None:
    shape = (3, 32, 32)
    params = {"teco_backend": "imagecorruptions", "teco_corruptions": ["shot_noise", "contrast"]}
    family = create_detector("teco", params)
    ctx = _ctx(shape)
    fitted = family.fit("main", ctx)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(4))
    pred = ctx.model(x).argmax(1)
    a = family.features("main", fitted, ctx.model, x, pred, CPU)["teco_first_change"]
    b = family.features("main", fitted, ctx.model, x, pred, CPU)["teco_first_change"]
    assert a.shape == (2, 2) and torch.equal(a, b)
