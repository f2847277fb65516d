"""CIFAR-10: the binary version (cifar-10-batches-bin), read with numpy. The python version of
CIFAR-10 is pickled, and bdx-study never unpickles files it is handed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bdx_study.data._core import Arrays, DataError, DatasetInfo, register_dataset

CIFAR10_BINARY_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_BINARY_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"


def read_cifar_binary(path: Path) -> Arrays:
    """Read one CIFAR-10 binary batch: records of 1 label byte + 3,072 pixel bytes (CHW); uint8."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise DataError(f"{path}: size {raw.size} is not a multiple of 3073 bytes (CIFAR-10 binary records)")
    rec = raw.reshape(-1, 3073)
    return Arrays(rec[:, 1:].reshape(-1, 3, 32, 32).copy(), rec[:, 0].astype(np.int64))


@register_dataset(
    DatasetInfo("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, horizontal_flip=True)
)
def _load_cifar10(root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
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
    train = Arrays(np.concatenate([p.pixels for p in parts]), np.concatenate([p.labels for p in parts]))
    return train, read_cifar_binary(test_file)
