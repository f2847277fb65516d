"""The real dataset loaders on tiny files the tests write, and the study's disjoint splits."""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bdx_study.data import (
    DATASETS,
    DataError,
    ImageData,
    augment_batch,
    dataset_info,
    defender_split,
    load_arrays,
    load_labels,
    load_splits,
    read_cifar_binary,
    read_idx,
)

# ------------------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = _idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(blob)
    else:
        path.write_bytes(blob)
    return path


def _unique_images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """n distinct uint8 images (the index is written into the first two pixels)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    img[:, 0, 0] = np.arange(n) % 256
    img[:, 0, 1] = np.arange(n) // 256
    img[0, 5, 5], img[1, 5, 5] = 0, 255  # the extremes occur
    return img


def _write_idx_dataset(folder: Path, n_train: int, n_test: int, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    arrays = {
        "train-images-idx3-ubyte": _unique_images(n_train, 28, 28, seed),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": _unique_images(n_test, 28, 28, seed + 2),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        _write_idx(folder / stem, arr, gz)
    return arrays


def _hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha256(r.numpy().tobytes()).hexdigest() for r in x]


def _check_images(data: ImageData, raw_images: np.ndarray, raw_labels: np.ndarray) -> None:
    n, h, w = raw_images.shape
    assert data.pixels.dtype == torch.uint8  # held as bytes, converted per batch
    assert data.x.shape == (n, 1, h, w)
    assert data.x.dtype == torch.float32
    assert data.y.dtype == torch.int64
    assert float(data.x.min()) == 0.0 and float(data.x.max()) == 1.0
    np.testing.assert_allclose(data.x[:, 0].numpy(), raw_images.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(data.y.numpy(), raw_labels.astype(np.int64))


# ------------------------------------------------------------------------------------- IDX


def test_read_idx_plain_and_gz(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    plain = _write_idx(tmp_path / "a-idx3-ubyte", arr, gz=False)
    gzipped = _write_idx(tmp_path / "b-idx3-ubyte", arr, gz=True)
    assert gzipped.suffix == ".gz"
    np.testing.assert_array_equal(read_idx(plain), arr)
    np.testing.assert_array_equal(read_idx(gzipped), arr)


@pytest.mark.parametrize("gz", [False, True])
def test_labels_without_pixels_agree_with_the_full_read(tmp_path: Path, gz: bool) -> None:
    """validate's reader (labels and image shapes from the headers) gives what the full loader
    gives, and refuses an image file whose size disagrees with its header, as the full read does."""
    arrays = _write_idx_dataset(tmp_path / "d", 30, 20, gz)
    root = (tmp_path / "d").resolve()
    for full, quick in zip(load_arrays("mnist", root, False), load_labels("mnist", root, False), strict=True):
        assert quick.shape == full.pixels.shape
        np.testing.assert_array_equal(quick.labels, full.labels)
    assert load_labels("mnist", root, False)[0].shape == (30, 1, 28, 28)
    np.testing.assert_array_equal(load_labels("mnist", root, False)[1].labels, arrays["t10k-labels-idx1-ubyte"])
    cut = tmp_path / "cut"
    _write_idx_dataset(cut, 30, 20, gz)
    images = next(cut.glob("train-images-idx3-ubyte*"))
    if gz:  # a gzip member of fewer images: its trailer records the size it really holds
        with gzip.open(images, "wb") as f:
            f.write(_idx_bytes(np.zeros((30, 28, 28), np.uint8))[: -28 * 28])
    else:
        images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"declares shape \[30, 28, 28\]"):
        load_labels("mnist", cut.resolve(), False)
    with pytest.raises(DataError, match="expected 23520 values"):
        load_arrays("mnist", cut.resolve(), False)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0]))  # float IDX
    with pytest.raises(DataError, match="not an unsigned-byte IDX"):
        read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(_idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3])
    with pytest.raises(DataError, match=r"expected 16 values for shape \[4, 2, 2\], found 13"):
        read_idx(short)
    long = tmp_path / "long"
    long.write_bytes(_idx_bytes(np.zeros((4, 2, 2), np.uint8)) + b"\x00")
    with pytest.raises(DataError, match=r"found more than 16"):
        read_idx(long)
    header = tmp_path / "header"
    header.write_bytes(bytes([0, 0, 0x08, 3, 0, 0, 0, 4]))  # 3 dims announced, 1 given
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(header)
    arr = read_idx(_write_idx(tmp_path / "w-idx3-ubyte", np.ones((2, 2, 2), np.uint8), gz=True))
    assert arr.flags.writeable  # torch.from_numpy takes it without a copy or a warning


@pytest.mark.parametrize(
    ("name", "subdir", "gz"),
    [
        ("mnist", "", False),
        ("mnist", "", True),
        ("mnist", "MNIST/raw", True),
        ("mnist", "mnist", False),
        ("fashion_mnist", "", True),
        ("fashion_mnist", "FashionMNIST/raw", False),
        ("fashion_mnist", "fashion-mnist", True),
    ],
)
def test_idx_loaders(tmp_path: Path, name: str, subdir: str, gz: bool) -> None:
    arrays = _write_idx_dataset(tmp_path / subdir, n_train=30, n_test=25, gz=gz)
    splits = load_splits(name, root=tmp_path, reserve_size=10, eval_size=None)
    assert splits.info == dataset_info(name)
    assert splits.info.input_shape == (1, 28, 28)
    _check_images(splits.train, arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"])
    assert len(splits.reserve) == 10 and len(splits.selection) == 8 and len(splits.evaluation) == 7
    # reserve + selection + evaluation = the whole test portion, each image once
    test_hashes = Counter(_hashes(torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255.0)))
    got = sum((Counter(_hashes(p.x[:, 0])) for p in (splits.reserve, splits.selection, splits.evaluation)), Counter())
    assert got == test_hashes
    for part in (splits.reserve, splits.selection, splits.evaluation):
        assert float(part.x.min()) >= 0.0 and float(part.x.max()) <= 1.0
        assert part.y.dtype == torch.int64
        assert bool(((part.y >= 0) & (part.y < 10)).all())


def test_idx_splits_disjoint_and_labels_follow_images(tmp_path: Path) -> None:
    arrays = _write_idx_dataset(tmp_path, n_train=40, n_test=50, gz=True)
    splits = load_splits("mnist", root=tmp_path, reserve_size=12, eval_size=20, train_size=30)
    tr, res, sel, ev = (_hashes(p.x[:, 0]) for p in (splits.train, splits.reserve, splits.selection, splits.evaluation))
    assert len(tr) == 30 and len(res) == 12 and len(sel) == 10 and len(ev) == 10
    assert len(set(tr) | set(res) | set(sel) | set(ev)) == 62  # all distinct: the splits are disjoint
    # each image keeps its own label
    raw = arrays["t10k-images-idx3-ubyte"]
    lbl = arrays["t10k-labels-idx1-ubyte"]
    index_of = {h: i for i, h in enumerate(_hashes(torch.from_numpy(raw.astype(np.float32) / 255.0)))}
    for part, hs in ((splits.reserve, res), (splits.selection, sel), (splits.evaluation, ev)):
        assert [int(lbl[index_of[h]]) for h in hs] == part.y.tolist()


def test_idx_image_label_count_mismatch(tmp_path: Path) -> None:
    arrays = _write_idx_dataset(tmp_path, n_train=10, n_test=10, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"][:7], gz=False)
    with pytest.raises(DataError, match="10 images but .* 7 labels"):
        load_splits("mnist", root=tmp_path, reserve_size=2)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_missing_root_names_where_it_looked(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nowhere"
    if name == "fashion_mnist":
        from bdx_study.data import FASHION_MNIST_SYSTEM_ROOT

        if (FASHION_MNIST_SYSTEM_ROOT / "train-images-idx3-ubyte.gz").exists():
            pytest.skip("system Fashion-MNIST installed")
    with pytest.raises(DataError) as ei:
        load_splits(name, root=root, reserve_size=10)
    msg = str(ei.value)
    assert name in msg
    assert str(root) in msg
    assert "train-images-idx3-ubyte" in msg
    assert "data.root" in msg


def test_mnist_no_root_at_all(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data root given"):
        load_splits("mnist", root=None, reserve_size=10)


def test_load_splits_size_errors(tmp_path: Path) -> None:
    _write_idx_dataset(tmp_path, n_train=10, n_test=10, gz=False)
    with pytest.raises(DataError, match="reserve_size 10 must be in"):
        load_splits("mnist", root=tmp_path, reserve_size=10)
    with pytest.raises(DataError, match="reserve_size 0"):
        load_splits("mnist", root=tmp_path, reserve_size=0)
    with pytest.raises(DataError, match="eval_size 5"):
        load_splits("mnist", root=tmp_path, reserve_size=6, eval_size=5)
    with pytest.raises(DataError, match="train_size 11"):
        load_splits("mnist", root=tmp_path, reserve_size=6, train_size=11)


# ------------------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(n: int, first_label: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    pixels[:, 0] = np.minimum(pixels[:, 0], 100)  # channel 0 dark,
    pixels[:, 2] = np.maximum(pixels[:, 2], 200)  # channel 2 bright: the CHW layout is checked
    labels = (np.arange(n) + first_label) % 10
    rec = np.concatenate([labels.astype(np.uint8)[:, None], pixels.reshape(n, -1)], axis=1)
    return rec.tobytes(), pixels, labels


def _write_cifar(
    root: Path, per_batch: int = 3, n_test: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        blob, px, lb = _cifar_batch(per_batch, i, seed=i)
        (folder / f"data_batch_{i}.bin").write_bytes(blob)
        xs.append(px)
        ys.append(lb)
    blob, tx, ty = _cifar_batch(n_test, 0, seed=99)
    (folder / "test_batch.bin").write_bytes(blob)
    return np.concatenate(xs), np.concatenate(ys), tx, ty


def test_cifar10_binary_loader(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = _write_cifar(tmp_path)
    splits = load_splits("cifar10", root=tmp_path, reserve_size=3)
    assert splits.info.input_shape == (3, 32, 32)
    tr = splits.train
    assert tr.pixels.dtype == torch.uint8
    assert tr.x.shape == (15, 3, 32, 32) and tr.x.dtype == torch.float32
    assert tr.y.dtype == torch.int64
    # batches 1..5 concatenated in order, CHW, scaled to [0, 1]
    np.testing.assert_allclose(tr.x.numpy(), train_x.astype(np.float32) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(tr.y.numpy(), train_y)
    assert float(tr.x[:, 0].max()) <= 100 / 255 + 1e-6 and float(tr.x[:, 2].min()) >= 200 / 255 - 1e-6
    parts = (splits.reserve, splits.selection, splits.evaluation)
    assert [len(p) for p in parts] == [3, 2, 3]
    got = sum((Counter(_hashes(p.x)) for p in parts), Counter())
    assert got == Counter(_hashes(torch.from_numpy(test_x.astype(np.float32) / 255.0)))
    for part in parts:
        assert float(part.x.min()) >= 0.0 and float(part.x.max()) <= 1.0
    assert sorted(sum((p.y.tolist() for p in parts), [])) == sorted(test_y.tolist())


def test_cifar_binary_bad_size(tmp_path: Path) -> None:
    p = tmp_path / "broken.bin"
    p.write_bytes(bytes(3073 + 5))
    with pytest.raises(DataError, match="not a multiple of 3073"):
        read_cifar_binary(p)


def test_cifar10_missing_files_named(tmp_path: Path) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin").unlink()
    with pytest.raises(DataError) as ei:
        load_splits("cifar10", root=tmp_path, reserve_size=3)
    assert "data_batch_4.bin" in str(ei.value)
    assert "data_batch_3.bin" not in str(ei.value)


def test_cifar10_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    with pytest.raises(DataError) as ei:
        load_splits("cifar10", root=root, reserve_size=3)
    assert str(root) in str(ei.value)
    with pytest.raises(DataError, match="needs data.root"):
        load_splits("cifar10", root=None, reserve_size=3)


# ------------------------------------------------------------------------------------- digits


def test_digits_splits_disjoint_and_sized() -> None:
    s = load_splits("digits", reserve_size=300)
    assert s.info.input_shape == (1, 16, 16)
    assert (len(s.train), len(s.reserve), len(s.selection), len(s.evaluation)) == (1097, 300, 200, 200)
    for part in (s.train, s.reserve, s.selection, s.evaluation):
        assert part.x.shape[1:] == (1, 16, 16) and part.x.dtype == torch.float32
        assert float(part.x.min()) >= 0.0 and float(part.x.max()) <= 1.0
        assert set(part.y.unique().tolist()) <= set(range(10))
    hashes = [_hashes(p.x) for p in (s.train, s.reserve, s.selection, s.evaluation)]
    # digits' 1,797 images are distinct after resizing, so equal hashes would mean shared inputs
    total = sum(len(h) for h in hashes)
    assert total == 1797
    assert len(set().union(*hashes)) == total


def test_digits_deterministic_and_seeded() -> None:
    a = load_splits("digits", reserve_size=300)
    b = load_splits("digits", reserve_size=300)
    for pa, pb in (
        (a.train, b.train),
        (a.reserve, b.reserve),
        (a.selection, b.selection),
        (a.evaluation, b.evaluation),
    ):
        assert torch.equal(pa.x, pb.x) and torch.equal(pa.y, pb.y)
    c = load_splits("digits", reserve_size=300, split_seed=1)
    assert not torch.equal(a.reserve.x, c.reserve.x)
    # a different split seed reshuffles the test portion, which stays the same set of images
    assert Counter(_hashes(a.reserve.x) + _hashes(a.selection.x) + _hashes(a.evaluation.x)) == Counter(
        _hashes(c.reserve.x) + _hashes(c.selection.x) + _hashes(c.evaluation.x)
    )


def test_digits_evaluation_independent_of_clean_set_and_eval_size() -> None:
    s = load_splits("digits", reserve_size=300)
    ev_hashes = set(_hashes(s.evaluation.x)) | set(_hashes(s.selection.x))
    for clean_set_size in (10, 40, 150, 300):
        ft, cal = defender_split(s.reserve, clean_set_size, 0.5)
        used = _hashes(ft.x) + _hashes(cal.x)
        assert len(used) == clean_set_size
        assert not set(used) & ev_hashes
    # a smaller eval_size takes a prefix of the same held-out order (selection first)
    small = load_splits("digits", reserve_size=300, eval_size=100)
    assert torch.equal(small.selection.x, s.selection.x[:50])
    assert torch.equal(small.reserve.x, s.reserve.x)
    # train_size caps the training set only
    capped = load_splits("digits", reserve_size=300, train_size=200)
    assert len(capped.train) == 200
    assert set(_hashes(capped.train.x)) <= set(_hashes(s.train.x))


def test_digits_evaluation_independent_of_train_size() -> None:
    s = load_splits("digits", reserve_size=300)
    capped = load_splits("digits", reserve_size=300, train_size=200)
    assert torch.equal(capped.reserve.x, s.reserve.x)
    assert torch.equal(capped.selection.x, s.selection.x)
    assert torch.equal(capped.evaluation.x, s.evaluation.x)


def _numbered(n: int) -> ImageData:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous() / n
    return ImageData(x, torch.arange(n) % 10)


@pytest.mark.parametrize(
    ("size", "frac", "n_ft", "n_cal"), [(40, 0.5, 20, 20), (41, 0.25, 31, 10), (300, 0.5, 150, 150)]
)
def test_defender_split_sizes_and_disjoint(size: int, frac: float, n_ft: int, n_cal: int) -> None:
    reserve = _numbered(300)
    ft, cal = defender_split(reserve, size, frac)
    assert (len(ft), len(cal)) == (n_ft, n_cal)
    ids_ft = set((ft.x[:, 0, 0, 0] * 300).round().long().tolist())
    ids_cal = set((cal.x[:, 0, 0, 0] * 300).round().long().tolist())
    assert not ids_ft & ids_cal
    assert ids_ft | ids_cal == set(range(size))  # D_c = the first clean_set_size reserved images
    assert min(ids_cal) > max(ids_ft)  # calibration is the tail of D_c
    assert torch.equal(ft.y, reserve.y[:n_ft]) and torch.equal(cal.y, reserve.y[n_ft:size])


def test_defender_split_errors() -> None:
    reserve = _numbered(50)
    with pytest.raises(DataError, match="clean_set_size 51 must be in"):
        defender_split(reserve, 51, 0.5)
    with pytest.raises(DataError, match="clean_set_size 1"):
        defender_split(reserve, 1, 0.5)
    with pytest.raises(DataError, match="leaves 0 of 4"):
        defender_split(reserve, 4, 0.1)
    with pytest.raises(DataError, match="leaves 4 of 4"):
        defender_split(reserve, 4, 0.9)


def test_defender_split_beyond_real_reserve() -> None:
    s = load_splits("digits", reserve_size=300)
    with pytest.raises(DataError, match=r"\[2, 300\]"):
        defender_split(s.reserve, 301, 0.5)


# ------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("name", ["digits", "mnist", "cifar10"])
def test_augment_batch_keeps_shape_and_range(name: str) -> None:
    info = dataset_info(name)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, *info.input_shape, generator=g)
    out = augment_batch(x, info, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # deterministic under the same generator seed
    assert torch.equal(out, augment_batch(x, info, torch.Generator().manual_seed(1)))
    # crops with zero padding only move pixels around or pad with zeros
    src = set(x.flatten().tolist()) | {0.0}
    assert set(out.flatten().tolist()) <= src
    assert not torch.equal(out, x)  # 16 random crops: at least one moves


def test_augment_crop_is_a_shift() -> None:
    info = dataset_info("digits")  # padding 1, no flip
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 7, 7] = 1.0
    out = augment_batch(x, info, torch.Generator().manual_seed(3))
    # one bright pixel each, moved by at most the padding
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(64))
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 16, pos % 16
    assert bool(((rows - 7).abs() <= 1).all()) and bool(((cols - 7).abs() <= 1).all())
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 1


# ------------------------------------------------------------------------------------- ImageData


def test_image_data_uint8_storage_converts_per_batch() -> None:
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    data = ImageData(pixels, torch.tensor([0, 1, 2]))
    assert data.shape == (1, 2, 2) and len(data) == 3
    assert data.images(torch.tensor([1])).dtype == torch.float32
    torch.testing.assert_close(data.images(torch.tensor([2, 1]))[:, 0, 0, 0], torch.tensor([1.0, 0.2]))
    torch.testing.assert_close(data.x[:, 0, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert data.take(slice(0, 2)).pixels.dtype == torch.uint8  # taking keeps the storage
    # replaced rows are stored rounded to 0..255, as an image file would hold them
    out = data.with_rows(torch.tensor([0]), torch.full((1, 1, 2, 2), 0.5), torch.tensor([7]))
    assert out.pixels.dtype == torch.uint8 and int(out.pixels[0, 0, 0, 0]) == 128
    assert out.y.tolist() == [7, 1, 2] and data.y.tolist() == [0, 1, 2]  # a copy
    assert torch.equal(out.pixels[1:], data.pixels[1:])
    # float storage keeps floats exactly
    f = ImageData(torch.rand(3, 1, 2, 2), torch.arange(3))
    g = f.with_rows(torch.tensor([2]), torch.full((1, 1, 2, 2), 0.123), torch.tensor([0]))
    assert float(g.x[2, 0, 0, 0]) == pytest.approx(0.123) and torch.equal(g.x[:2], f.x[:2])
    assert [b.tolist() for b in ImageData(torch.rand(5, 1, 2, 2), torch.arange(5)).batches(2)] == [[0, 1], [2, 3], [4]]


def test_image_data_rejects_bad_storage() -> None:
    with pytest.raises(TypeError, match="uint8 or float32"):
        ImageData(torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="N, C, H, W"):
        ImageData(torch.zeros(2, 2, 2), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="3 images but labels"):
        ImageData(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))


# ------------------------------------------------------------------------------------- GTSRB


def _rgb(rng: np.random.Generator, h: int, w: int, index: int) -> np.ndarray:
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = [index % 256, index // 256, 17]  # a flat block that survives resizing
    return img


def _write_gtsrb(
    root: Path, classes: tuple[int, ...] = (0, 7, 42), per_class: int = 4, n_test: int = 9
) -> dict[str, list[int]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / "gtsrb"
    labels: dict[str, list[int]] = {"train": [], "test": []}
    k = 0
    for c in classes:
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        (folder / f"GT-{c:05d}.csv").write_text("Filename;ClassId\n")  # present in real GTSRB; ignored
        for i in range(per_class):
            Image.fromarray(_rgb(rng, 30 + i, 41 - i, k)).save(folder / f"00000_{i:05d}.ppm")
            labels["train"].append(c)
            k += 1
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(n_test):
        c = classes[i % len(classes)]
        Image.fromarray(_rgb(rng, 35, 33, k)).save(test_dir / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;33;35;5;5;28;30;{c}")
        labels["test"].append(c)
        k += 1
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return labels


def test_gtsrb_folder_loader(tmp_path: Path) -> None:
    labels = _write_gtsrb(tmp_path)
    splits = load_splits("gtsrb", root=tmp_path, reserve_size=3)
    assert splits.info.input_shape == (3, 32, 32) and splits.info.num_classes == 43
    tr = splits.train
    assert tr.pixels.dtype == torch.uint8 and tr.pixels.shape == (12, 3, 32, 32)  # resized from 30-41 px
    assert sorted(tr.y.tolist()) == sorted(labels["train"])
    parts = (splits.reserve, splits.selection, splits.evaluation)
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(sum((p.y.tolist() for p in parts), [])) == sorted(labels["test"])
    hashes = [h for p in parts for h in _hashes(p.pixels)]
    assert len(set(hashes)) == 9  # disjoint
    # the flat block keeps its colour through PIL's resize: labels follow their images
    assert int(tr.pixels[0, 2, 0, 0]) == 17
    # the gtsrb folder itself works as data.root too
    assert len(load_splits("gtsrb", root=tmp_path / "gtsrb", reserve_size=3).train) == 12


def test_gtsrb_missing_root_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(DataError) as ei:
        load_splits("gtsrb", root=tmp_path / "nowhere", reserve_size=3)
    msg = str(ei.value)
    assert "gtsrb" in msg and str(tmp_path / "nowhere") in msg and "GTSRB/Training" in msg
    with pytest.raises(DataError, match="gtsrb.*needs data.root"):
        load_splits("gtsrb", root=None, reserve_size=3)
    _write_gtsrb(tmp_path / "broken")
    (tmp_path / "broken" / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match="GT-final_test.csv"):
        load_splits("gtsrb", root=tmp_path / "broken", reserve_size=3)


# ------------------------------------------------------------------------------------- image folders

WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079", "n03394916", "n03417042", "n03425413",
         "n03445777", "n03888257"]  # fmt: skip


def _write_image_folder(base: Path, per_class: int = 2, val_per_class: int = 1, classes: list[str] = WNIDS) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    k = 0
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in classes:
            folder = base / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                ext = ".JPEG" if (k % 2) else ".png"
                Image.fromarray(_rgb(rng, 80 + 7 * (k % 3), 100 - 5 * (k % 4), k)).save(folder / f"{c}_{i}{ext}")
                k += 1
        (base / split / "notes.txt").write_text("not an image, not a class")  # ignored


@pytest.mark.parametrize("sub", ["", "imagenette2-160"])
def test_imagenette_folder_loader(tmp_path: Path, sub: str) -> None:
    _write_image_folder(tmp_path / sub if sub else tmp_path)
    splits = load_splits("imagenette", root=tmp_path, reserve_size=4, eval_size=6)
    assert splits.info.input_shape == (3, 64, 64) and splits.info.num_classes == 10
    assert splits.train.pixels.dtype == torch.uint8 and splits.train.pixels.shape == (20, 3, 64, 64)
    assert sorted(splits.train.y.tolist()) == sorted(list(range(10)) * 2)  # classes: sorted folder names
    parts = (splits.reserve, splits.selection, splits.evaluation)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(sum((p.y.tolist() for p in parts), [])) == list(range(10))
    hashes = [h for p in (splits.train, *parts) for h in _hashes(p.pixels)]
    assert len(set(hashes)) == 30  # all distinct: the splits are disjoint


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as ei:
        load_splits("imagenette", root=tmp_path / "nowhere", reserve_size=2)
    msg = str(ei.value)
    assert "imagenette" in msg and str(tmp_path / "nowhere") in msg and "imagenette2-160" in msg
    with pytest.raises(DataError, match="imagenette.*needs data.root"):
        load_splits("imagenette", root=None, reserve_size=2)
    _write_image_folder(tmp_path / "few", classes=WNIDS[:3])
    with pytest.raises(DataError, match="3 class folders, expected 10"):
        load_splits("imagenette", root=tmp_path / "few", reserve_size=1)


# ------------------------------------------------------------------------------------- every dataset


def _write_files(name: str, root: Path) -> None:
    """Small files of dataset ``name`` in its own format (every registered dataset needs one)."""
    if name in ("mnist", "fashion_mnist"):
        _write_idx_dataset(root, n_train=30, n_test=25, gz=True)
    elif name == "cifar10":
        _write_cifar(root, per_batch=6, n_test=25)
    elif name == "gtsrb":
        _write_gtsrb(root, per_class=10, n_test=25)
    elif name == "imagenette":
        _write_image_folder(root, per_class=3, val_per_class=3)
    elif name != "digits":  # built into scikit-learn
        raise AssertionError(f"no test files for dataset {name!r}: add a writer to _write_files")


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_shapes_labels_and_disjoint_splits(tmp_path: Path, name: str) -> None:
    _write_files(name, tmp_path)
    info = dataset_info(name)
    root = None if name == "digits" else tmp_path
    s = load_splits(name, root=root, reserve_size=10, eval_size=12, train_size=20)
    parts = (s.train, s.reserve, s.selection, s.evaluation)
    assert [len(p) for p in parts] == [20, 10, 6, 6]
    hashes = []
    for p in parts:
        assert p.shape == info.input_shape
        assert p.pixels.dtype in (torch.uint8, torch.float32) and p.x.dtype == torch.float32
        assert float(p.x.min()) >= 0.0 and float(p.x.max()) <= 1.0
        assert p.y.dtype == torch.int64 and bool(((p.y >= 0) & (p.y < info.num_classes)).all())
        hashes += _hashes(p.x)
    assert len(set(hashes)) == len(hashes)  # disjoint (every test image is distinct)
    assert len(info.mean) == len(info.std) == info.input_shape[0]
