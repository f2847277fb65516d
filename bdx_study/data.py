"""Datasets (a registry) and the study's disjoint splits.

Images are float32 tensors in pixel space [0, 1], shape (N, C, H, W); labels are int64. Triggers
are applied in that space; normalization belongs to the model (see ``bdx_study.archs``).

Splits, all disjoint:
- ``train``: the victim's training data (the attacker poisons it);
- ``reserve``: the defender's reserved clean pool; a trial takes its first ``clean_set_size``
  images and splits them into a part to finetune on and a part to calibrate the threshold on
  (:func:`defender_split`);
- ``selection``: inputs the hyperparameter search scores trials on (its objective);
- ``evaluation``: inputs every reported figure comes from: never seen by training, finetuning,
  calibration or the search that picked the hyperparameters.
Reserve, selection and evaluation come from the dataset's test portion (as in the paper); none
depends on ``clean_set_size``, so trials with different clean-set sizes are judged on the same
inputs.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bdx_study._registry import Registry

FASHION_MNIST_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")


class DataError(ValueError):
    """Data that cannot be found or read; the message says where it looked."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shape, classes, normalization and training augmentation."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per channel, applied inside the model
    std: tuple[float, ...]
    crop_padding: int  # random-crop padding in pixels for training augmentation
    horizontal_flip: bool  # whether training augmentation flips


@dataclass(frozen=True)
class ImageData:
    """Images in [0, 1], (N, C, H, W) float32, and int64 labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: Tensor | slice) -> ImageData:
        return ImageData(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Splits:
    info: DatasetInfo
    train: ImageData
    reserve: ImageData
    selection: ImageData
    evaluation: ImageData


Loader = Callable[[Path | None, bool], tuple[ImageData, ImageData]]  # (root, download) -> (train, test)
DATASETS: Registry[tuple[DatasetInfo, Loader]] = Registry("dataset")


def _register(info: DatasetInfo) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        DATASETS.register(info.name)((info, fn))
        return fn

    return deco


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)[0]


def list_datasets() -> list[str]:
    return DATASETS.names()


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits, resized to 16x16.


@_register(DatasetInfo("digits", (1, 16, 16), 10, (0.31,), (0.38,), crop_padding=1, horizontal_flip=False))
def _load_digits(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # digits has no official split: a fixed permutation, 700 images form the test portion.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    test, train = perm[:700], perm[700:]
    return ImageData(x[train], y[train]), ImageData(x[test], y[test])


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: IDX files (optionally .gz) read with numpy; no pickle involved.

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or .gz) into a numpy array of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {body.size}")
    return body.reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _load_idx_dataset(
    name: str, tv_class: str, subdirs: list[str], root: Path | None, download: bool, system_root: Path | None
) -> tuple[ImageData, ImageData]:
    roots = [root] if root is not None else []
    if system_root is not None:
        roots.append(system_root)
    dirs = [r / s for r in roots for s in ["", *subdirs]]
    if _find_idx(dirs, _IDX_FILES["train"][0]) is None and download and root is not None:
        import torchvision.datasets as tvd

        getattr(tvd, tv_class)(str(root), train=True, download=True)
        getattr(tvd, tv_class)(str(root), train=False, download=True)
    portions = []
    for part in ("train", "test"):
        img_stem, lbl_stem = _IDX_FILES[part]
        img, lbl = _find_idx(dirs, img_stem), _find_idx(dirs, lbl_stem)
        if img is None or lbl is None:
            looked = ", ".join(str(d) for d in dirs) or "(no data root given)"
            raise DataError(
                f"dataset {name!r}: IDX files {img_stem}[.gz] and {lbl_stem}[.gz] not found; looked in: "
                f"{looked}. Set data.root to a folder holding them"
                + (" (or install Debian's dataset-fashion-mnist)" if name == "fashion_mnist" else "")
                + ", or set data.download: true where the network allows."
            )
        x = torch.from_numpy(read_idx(img).copy()).float().div_(255.0).unsqueeze(1)
        y = torch.from_numpy(read_idx(lbl).astype(np.int64))
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{img} has {x.shape[0]} images but {lbl} has {y.shape[0]} labels")
        portions.append(ImageData(x, y))
    return portions[0], portions[1]


@_register(DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), crop_padding=2, horizontal_flip=False))
def _load_mnist(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    return _load_idx_dataset("mnist", "MNIST", ["mnist", "MNIST/raw"], root, download, None)


@_register(DatasetInfo("fashion_mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), crop_padding=2, horizontal_flip=False))
def _load_fashion_mnist(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    return _load_idx_dataset(
        "fashion_mnist",
        "FashionMNIST",
        ["fashion-mnist", "FashionMNIST/raw"],
        root,
        download,
        FASHION_MNIST_SYSTEM_ROOT,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10: the binary version (cifar-10-batches-bin), read with numpy. The python version of
# CIFAR-10 is pickled, and bdx-study never unpickles files it is handed.

CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def read_cifar_binary(path: Path) -> ImageData:
    """Read one CIFAR-10 binary batch: records of 1 label byte + 3,072 pixel bytes (CHW)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise DataError(f"{path}: size {raw.size} is not a multiple of 3073 bytes (CIFAR-10 binary records)")
    rec = raw.reshape(-1, 3073)
    x = torch.from_numpy(rec[:, 1:].reshape(-1, 3, 32, 32).copy()).float().div_(255.0)
    return ImageData(x, torch.from_numpy(rec[:, 0].astype(np.int64)))


@_register(
    DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, horizontal_flip=True)
)
def _load_cifar10(root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    if root is None:
        raise DataError("dataset 'cifar10' needs data.root (a folder holding cifar-10-batches-bin)")
    folder = root / "cifar-10-batches-bin"
    if not folder.is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10_BINARY_URL, str(root), md5=CIFAR10_BINARY_MD5)
    train_files = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
    test_file = folder / "test_batch.bin"
    missing = [str(p) for p in [*train_files, test_file] if not p.is_file()]
    if missing:
        raise DataError(
            f"dataset 'cifar10': missing {', '.join(missing)}. Put the binary version of CIFAR-10 "
            f"(cifar-10-binary.tar.gz, extracted) under {root}, or set data.download: true."
        )
    parts = [read_cifar_binary(p) for p in train_files]
    train = ImageData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    return train, read_cifar_binary(test_file)


# ---------------------------------------------------------------------------------------------


def resolve_root(root: str | os.PathLike[str] | None) -> Path | None:
    return None if root is None else Path(root).expanduser().resolve()


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: Path | None, download: bool) -> tuple[ImageData, ImageData]:
    _, loader = DATASETS.get(name)
    return loader(root, download)


def load_test_portion(name: str, *, root: str | os.PathLike[str] | None = None, download: bool = False) -> ImageData:
    """The whole test portion of ``name`` (reserve, selection and evaluation come from it)."""
    return _load_cached(name, resolve_root(root), download)[1]


def load_splits(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    reserve_size: int,
    eval_size: int | None = None,
    selection_fraction: float = 0.5,
    train_size: int | None = None,
    split_seed: int = 0,
    download: bool = False,
) -> Splits:
    """Load ``name`` and cut its disjoint splits.

    ``reserve_size`` test-portion images form the defender's pool; of the next ``eval_size``
    (default: all the rest), ``selection_fraction`` form the selection split and the others the
    evaluation split. ``train_size`` (default: all) caps the victim's training set. The
    permutation is fixed by ``split_seed``, so every trial and victim sees the same splits.
    """
    info = dataset_info(name)
    train, test = _load_cached(name, resolve_root(root), download)
    if train_size is not None:
        if train_size > len(train):
            raise DataError(f"dataset {name!r}: train_size {train_size} > {len(train)} training images")
        sub_gen = torch.Generator().manual_seed(split_seed + 1)  # independent of the test permutation
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
    return Splits(
        info=info,
        train=train,
        reserve=test.take(perm[:reserve_size]),
        selection=test.take(held[:n_sel]),
        evaluation=test.take(held[n_sel:]),
    )


def defender_split(reserve: ImageData, clean_set_size: int, calibration_fraction: float) -> tuple[ImageData, ImageData]:
    """The defender's clean set D_c (the first ``clean_set_size`` reserved images), split into
    (finetune part, calibration part); the calibration part is the last
    ``round(clean_set_size * calibration_fraction)`` images of D_c."""
    if not 2 <= clean_set_size <= len(reserve):
        raise DataError(f"clean_set_size {clean_set_size} must be in [2, {len(reserve)}] (the reserved pool)")
    n_cal = round(clean_set_size * calibration_fraction)
    if not 1 <= n_cal < clean_set_size:
        raise DataError(
            f"calibration_fraction {calibration_fraction} leaves {n_cal} of {clean_set_size} images to calibrate on"
        )
    cut = clean_set_size - n_cal
    return reserve.take(slice(0, cut)), reserve.take(slice(cut, clean_set_size))


def augment_batch(x: Tensor, info: DatasetInfo, gen: torch.Generator) -> Tensor:
    """Training augmentation in pixel space: random crop with zero padding, optional flip."""
    n, c, h, w = x.shape
    p = info.crop_padding
    if p > 0:
        xp = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)
        cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)
        n_idx = torch.arange(n, device=x.device)[:, None, None, None]
        c_idx = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]
    if info.horizontal_flip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x
