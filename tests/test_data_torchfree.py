"""The torch-free layers of bdx_study.data and bdx_study.archs: importing them loads no torch,
numpy's randperm is torch's, and the splits and images are the ones the torch code cut before
(victim caches depend on them)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bdx_study.archs as archs
import bdx_study.data as data
from bdx_study.archs import ARCHITECTURES, architecture_spec, register_architecture, register_body
from bdx_study.data import (
    DATASETS,
    Arrays,
    DataError,
    DatasetInfo,
    ImageData,
    Splits,
    load_arrays,
    load_splits,
    randperm,
    register_dataset,
    split_indices,
)
from bdx_study.data._tensors import _load_cached
from bdx_study.data.digits import _digits_arrays, _resize_bilinear

# ------------------------------------------------------------------------------------- randperm


def _torch_randperm(n: int, seed: int) -> np.ndarray:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 17, 700, 1797, 10_000, 60_000])
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1, 2**32 - 1, 2**32 + 7, 2**63, -5])
def test_randperm_is_torchs(n: int, seed: int) -> None:
    got = randperm(n, seed)
    assert got.dtype == np.int64 and got.shape == (n,)
    np.testing.assert_array_equal(got, _torch_randperm(n, seed))


def test_randperm_refuses_sizes_beyond_torchs_32_bit_shuffle() -> None:
    with pytest.raises(ValueError, match="32-bit"):
        randperm(2**32 // 20, 0)
    with pytest.raises(ValueError, match=r"n must be in \[0"):
        randperm(-1, 0)


# ------------------------------------------------------------------------------------- splits


def _old_load_splits(
    name: str,
    train: ImageData,
    test: ImageData,
    *,
    reserve_size: int,
    eval_size: int | None = None,
    selection_fraction: float = 0.5,
    train_size: int | None = None,
    split_seed: int = 0,
) -> tuple[ImageData, ImageData, ImageData, ImageData]:
    """load_splits as it was before numpy cut the splits (torch.randperm, the same checks)."""
    if train_size is not None:
        if train_size > len(train):
            raise DataError(f"dataset {name!r}: train_size {train_size} > {len(train)} training images")
        sub_gen = torch.Generator().manual_seed(split_seed + 1)
        train = train.take(torch.randperm(len(train), generator=sub_gen)[:train_size])
    available = len(test) - reserve_size
    if reserve_size < 1 or available < 1:
        raise DataError(
            f"dataset {name!r}: reserve_size {reserve_size} must be in [1, {len(test) - 1}] "
            f"(the test portion has {len(test)} images)"
        )
    n_held = available if eval_size is None else eval_size
    if not 2 <= n_held <= available:
        raise DataError(f"dataset {name!r}: eval_size {eval_size} must be in [2, {available}]")
    n_sel = round(n_held * selection_fraction)
    if not 1 <= n_sel < n_held:
        raise DataError(f"selection_fraction {selection_fraction} leaves {n_sel} of {n_held} images for selection")
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(split_seed))
    held = perm[reserve_size : reserve_size + n_held]
    return train, test.take(perm[:reserve_size]), test.take(held[:n_sel]), test.take(held[n_sel:])


def _same(a: ImageData, b: ImageData) -> None:
    assert a.pixels.dtype == b.pixels.dtype
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.y, b.y)


def _same_splits(new: Splits, old: tuple[ImageData, ImageData, ImageData, ImageData]) -> None:
    for a, b in zip((new.train, new.reserve, new.selection, new.evaluation), old, strict=True):
        _same(a, b)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _write_mnist(root: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(7)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for stem, arr in files.items():
        (root / stem).write_bytes(_idx_bytes(arr))


SPLIT_CASES: list[dict[str, Any]] = [
    {"reserve_size": 10},
    {"reserve_size": 12, "eval_size": 20, "train_size": 30, "split_seed": 3},
    {"reserve_size": 5, "selection_fraction": 0.3, "split_seed": 2**32 + 1},
    {"reserve_size": 1, "eval_size": 2, "train_size": 0, "split_seed": 99},
]


@pytest.mark.parametrize("kw", SPLIT_CASES, ids=str)
def test_idx_splits_equal_the_torch_computation(tmp_path: Path, kw: dict[str, Any]) -> None:
    _write_mnist(tmp_path, n_train=45, n_test=37)
    train, test = _load_cached("mnist", tmp_path.resolve(), False)
    new = load_splits("mnist", root=tmp_path, **kw)
    _same_splits(new, _old_load_splits("mnist", train, test, **kw))
    idx = split_indices("mnist", 45, 37, **kw)
    if kw.get("train_size") is None:
        assert idx.train is None
    else:
        _same(train.take(torch.from_numpy(idx.train)), new.train)
    held = np.concatenate([idx.reserve, idx.selection, idx.evaluation]).tolist()
    assert len(set(held)) == len(held)  # disjoint


@pytest.mark.parametrize(
    "kw",
    [
        {"reserve_size": 300},
        {"reserve_size": 300, "eval_size": 100, "train_size": 200, "split_seed": 7},
        {"reserve_size": 10, "selection_fraction": 0.3, "split_seed": 123},
        {"reserve_size": 500, "train_size": 1097, "split_seed": 1},
    ],
    ids=str,
)
def test_digits_splits_equal_the_torch_computation(kw: dict[str, Any]) -> None:
    train, test = _load_cached("digits", None, False)
    new = load_splits("digits", **kw)
    _same_splits(new, _old_load_splits("digits", train, test, **kw))


@pytest.mark.parametrize(
    "kw",
    [
        {"reserve_size": 10},
        {"reserve_size": 0},
        {"reserve_size": -2},
        {"reserve_size": 6, "eval_size": 5},
        {"reserve_size": 6, "eval_size": 1},
        {"reserve_size": 6, "train_size": 11},
        {"reserve_size": 2, "selection_fraction": 0.01},
        {"reserve_size": 2, "selection_fraction": 0.99},
    ],
    ids=str,
)
def test_split_errors_are_todays(kw: dict[str, Any]) -> None:
    empty = ImageData(torch.zeros(10, 1, 1, 1), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(DataError) as old:
        _old_load_splits("x", empty, empty, **kw)
    with pytest.raises(DataError) as new:
        split_indices("x", 10, 10, **kw)
    assert str(new.value) == str(old.value)


# ------------------------------------------------------------------------------------- arrays


def _old_digits() -> tuple[ImageData, ImageData]:
    """The digits loader as it was, in torch."""
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.tensor(target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    return ImageData(x[perm[700:]], y[perm[700:]]), ImageData(x[perm[:700]], y[perm[:700]])


def test_load_arrays_digits() -> None:
    train, test = load_arrays("digits", None, False)
    assert isinstance(train, Arrays) and isinstance(test, Arrays)
    assert train.pixels.shape == (1097, 1, 16, 16) and test.pixels.shape == (700, 1, 16, 16)
    assert train.pixels.dtype == np.float32 and train.labels.dtype == np.int64
    assert float(train.pixels.min()) >= 0.0 and float(train.pixels.max()) <= 1.0
    assert load_arrays("digits", None, False)[0] is train  # cached
    # the very images and labels the torch loader produced
    for new, old in zip((train, test), _old_digits(), strict=True):
        np.testing.assert_array_equal(new.pixels, old.pixels.numpy(), strict=True)
        np.testing.assert_array_equal(new.labels, old.y.numpy(), strict=True)
    # ImageData wraps the arrays without copying
    tt, _ = _load_cached("digits", None, False)
    assert tt.pixels.data_ptr() == train.pixels.ctypes.data and tt.y.data_ptr() == train.labels.ctypes.data


def test_resize_bilinear_is_torchs_on_digits() -> None:
    images, _ = _digits_arrays()
    x = images.astype(np.float32)[:, None] / np.float32(16.0)
    got = _resize_bilinear(x, 16, 16)
    want = F.interpolate(torch.from_numpy(x), size=(16, 16), mode="bilinear", align_corners=False).numpy()
    assert got.dtype == np.float32
    assert got.tobytes() == want.tobytes()


def test_resize_bilinear_close_to_torch_elsewhere() -> None:
    x = np.random.default_rng(0).random((2, 3, 7, 9), dtype=np.float32)
    for h, w in ((13, 5), (3, 18), (7, 9)):
        want = F.interpolate(torch.from_numpy(x), size=(h, w), mode="bilinear", align_corners=False).numpy()
        np.testing.assert_allclose(_resize_bilinear(x, h, w), want, rtol=0, atol=1e-6)


@pytest.fixture
def user_dataset() -> Iterator[str]:
    """A user dataset whose loader still returns ImageData (removed from the registry after)."""
    name = "zz_user_imagedata"
    info = DatasetInfo(name, (1, 16, 16), 10, (0.5,), (0.5,), crop_padding=1, horizontal_flip=False)

    @register_dataset(info)
    def _load(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
        g = torch.Generator().manual_seed(0)
        tr = ImageData(torch.randint(0, 256, (20, 1, 16, 16), generator=g, dtype=torch.uint8), torch.arange(20) % 10)
        te = ImageData(torch.rand(30, 1, 16, 16, generator=g), torch.arange(30) % 10)
        return tr, te

    yield name
    DATASETS._entries.pop(name)
    load_arrays.cache_clear()
    _load_cached.cache_clear()


def test_user_loader_returning_image_data(user_dataset: str) -> None:
    train, test = load_arrays(user_dataset, None, False)
    assert train.pixels.dtype == np.uint8 and test.pixels.dtype == np.float32 and train.labels.dtype == np.int64
    s = load_splits(user_dataset, reserve_size=10, train_size=15, split_seed=4)
    tr, te = _load_cached(user_dataset, None, False)
    _same_splits(s, _old_load_splits(user_dataset, tr, te, reserve_size=10, train_size=15, split_seed=4))


@pytest.fixture
def bad_dataset() -> Iterator[str]:
    name = "zz_bad_shape"
    info = DatasetInfo(name, (1, 16, 16), 3, (0.5,), (0.5,), crop_padding=1, horizontal_flip=False)

    @register_dataset(info)
    def _load(root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
        px = np.zeros((4, 1, 16, 16), np.uint8)
        if root is None:  # wrong shape
            return Arrays(px, np.zeros(4, np.int64)), Arrays(np.zeros((4, 1, 8, 8), np.uint8), np.zeros(4, np.int64))
        return Arrays(px, np.array([0, 1, 2, 3])), Arrays(px, np.zeros(4, np.int64))  # label 3 of 3 classes

    yield name
    DATASETS._entries.pop(name)
    load_arrays.cache_clear()


def test_load_arrays_checks_the_registered_facts(bad_dataset: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test images are \(1, 8, 8\), expected \(1, 16, 16\)"):
        load_arrays(bad_dataset, None, False)
    with pytest.raises(DataError, match=r"train labels outside \[0, 3\)"):
        load_arrays(bad_dataset, tmp_path, False)


def test_every_public_name_resolves() -> None:
    for module in (data, archs):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
        with pytest.raises(AttributeError):
            module.no_such_name  # noqa: B018


# ------------------------------------------------------------------------------------- no torch


def _run(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_data_imports_and_reads_without_torch() -> None:
    _run(
        "import sys, bdx_study.data as d\n"
        "assert 'torch' not in sys.modules\n"
        "tr, te = d.load_arrays('digits', None, False)\n"
        "idx = d.split_indices('digits', len(tr.labels), len(te.labels), reserve_size=300, train_size=200)\n"
        "assert len(idx.train) == 200 and len(idx.reserve) == 300\n"
        "assert d.dataset_info('mnist').input_shape == (1, 28, 28) and 'gtsrb' in d.DATASETS\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
    )


def test_archs_import_and_check_without_torch() -> None:
    _run(
        "import sys, bdx_study.archs as a\n"
        "assert 'torch' not in sys.modules\n"
        "for n in a.list_architectures():\n"
        "    s = a.architecture_spec(n)\n"
        "    assert s.input_shapes and s.description\n"
        "    a.check_input_shape(n, s.input_shapes[0])\n"
        "assert a.architecture_spec('vgg16_bn').input_shapes == ((3, 32, 32), (3, 64, 64))\n"
        "try:\n"
        "    a.check_input_shape('resnet18', (3, 64, 64))\n"
        "except ValueError as e:\n"
        "    assert '3x64x64' in str(e)\n"
        "else:\n"
        "    raise AssertionError('accepted')\n"
        "assert 'torch' not in sys.modules and 'bdx_study.archs.resnet' not in sys.modules\n"
        "assert callable(a.architecture_spec('resnet18').build) and 'torch' in sys.modules\n"
    )


# ------------------------------------------------------------------------------------- archs


def test_declared_spec_equals_the_loaded_one() -> None:
    for name in ARCHITECTURES.names():
        declared, loaded = ARCHITECTURES.spec(name), ARCHITECTURES.get(name)
        assert declared == loaded and loaded.factory is not None
        assert architecture_spec(name).build is loaded.factory


def test_register_architecture_refuses_declared_and_body_needs_declaration() -> None:
    with pytest.raises(ValueError, match="'resnet18' is registered twice"):
        register_architecture("resnet18", input_shapes=[(3, 32, 32)])(lambda c, k, hw: torch.nn.Linear(1, 1))
    with pytest.raises(KeyError, match="unknown architecture 'zz_nowhere'"):
        register_body("zz_nowhere")(lambda c, k, hw: torch.nn.Linear(1, 1))
