"""MNIST and Fashion-MNIST: IDX files (optionally .gz) read with numpy; no pickle involved."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from bdx_study.data._core import Arrays, DataError, DatasetInfo, Labels, register_dataset, register_label_reader

FASHION_MNIST_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (plain or .gz) into a writable numpy array of unsigned bytes (decoded
    straight into one buffer sized from the header: no intermediate copies)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        head = f.read(4)
        if len(head) < 4 or head[:3] != b"\x00\x00\x08":
            raise DataError(f"{path}: not an unsigned-byte IDX file")
        ndim = head[3]
        raw = f.read(4 * ndim)
        if len(raw) < 4 * ndim:
            raise DataError(f"{path}: truncated IDX header")
        dims = [int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(ndim)]
        expected = int(np.prod(dims))
        body = bytearray(expected)
        view, filled = memoryview(body), 0
        while filled < expected:
            n = f.readinto(view[filled:])
            if not n:
                break
            filled += n
        if filled != expected or f.read(1):
            raise DataError(
                f"{path}: expected {expected} values for shape {dims}, found "
                + (f"{filled}" if filled < expected else f"more than {expected}")
            )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def idx_shape(path: Path) -> list[int]:
    """The dimensions an IDX file's header declares, checked against the file's size without
    decoding its values (a .gz by the uncompressed size its trailer records, modulo 2**32)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        head = f.read(4)
        if len(head) < 4 or head[:3] != b"\x00\x00\x08":
            raise DataError(f"{path}: not an unsigned-byte IDX file")
        raw = f.read(4 * head[3])
    if len(raw) < 4 * head[3]:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 * i : 4 * i + 4], "big") for i in range(head[3])]
    size = 4 + len(raw) + int(np.prod(dims))
    if path.suffix == ".gz":
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            stored = int.from_bytes(f.read(4), "little")
        ok = stored == size % 2**32
    else:
        stored = path.stat().st_size
        ok = stored == size
    if not ok:
        raise DataError(f"{path}: the header declares shape {dims} ({size} bytes) but the file holds {stored}")
    return dims


def _idx_files(
    name: str, tv_class: str, subdirs: list[str], root: Path | None, download: bool, system_root: Path | None
) -> list[tuple[Path, Path]]:
    """The (images, labels) files of the train and test portions (downloaded first where asked)."""
    roots = [root] if root is not None else []
    if system_root is not None:
        roots.append(system_root)
    dirs = [r / s for r in roots for s in ["", *subdirs]]
    if _find_idx(dirs, _IDX_FILES["train"][0]) is None and download and root is not None:
        import torchvision.datasets as tvd

        getattr(tvd, tv_class)(str(root), train=True, download=True)
        getattr(tvd, tv_class)(str(root), train=False, download=True)
    files = []
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
        files.append((img, lbl))
    return files


def _load_idx_dataset(files: list[tuple[Path, Path]]) -> tuple[Arrays, Arrays]:
    portions = []
    for img, lbl in files:
        x = read_idx(img)[:, None]  # uint8 (N, 1, 28, 28), a view of the decoded buffer
        y = read_idx(lbl).astype(np.int64)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{img} has {x.shape[0]} images but {lbl} has {y.shape[0]} labels")
        portions.append(Arrays(x, y))
    return portions[0], portions[1]


def _idx_labels(files: list[tuple[Path, Path]]) -> tuple[Labels, Labels]:
    portions = []
    for img, lbl in files:
        dims = idx_shape(img)
        if len(dims) != 3:
            raise DataError(f"{img}: images of shape {dims}; expected (N, H, W)")
        n, h, w = dims
        y = read_idx(lbl).astype(np.int64)
        if n != y.shape[0]:
            raise DataError(f"{img} has {n} images but {lbl} has {y.shape[0]} labels")
        portions.append(Labels((n, 1, h, w), y))
    return portions[0], portions[1]


_MNIST = ("mnist", "MNIST", ["mnist", "MNIST/raw"])
_FASHION = ("fashion_mnist", "FashionMNIST", ["fashion-mnist", "FashionMNIST/raw"])


@register_dataset(DatasetInfo("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,), crop_padding=2, horizontal_flip=False))
def _load_mnist(root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
    return _load_idx_dataset(_idx_files(*_MNIST, root, download, None))


@register_label_reader("mnist")
def _mnist_labels(root: Path | None, download: bool) -> tuple[Labels, Labels]:
    return _idx_labels(_idx_files(*_MNIST, root, download, None))


@register_dataset(
    DatasetInfo("fashion_mnist", (1, 28, 28), 10, (0.2860,), (0.3530,), crop_padding=2, horizontal_flip=False)
)
def _load_fashion_mnist(root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
    return _load_idx_dataset(_idx_files(*_FASHION, root, download, FASHION_MNIST_SYSTEM_ROOT))


@register_label_reader("fashion_mnist")
def _fashion_mnist_labels(root: Path | None, download: bool) -> tuple[Labels, Labels]:
    return _idx_labels(_idx_files(*_FASHION, root, download, FASHION_MNIST_SYSTEM_ROOT))
