"""Datasets (a registry) and the study's disjoint splits; see :mod:`bdx_study.data._core`.

One module per dataset family registers itself: digits, IDX (MNIST, Fashion-MNIST), CIFAR-10
(binary), GTSRB (torchvision's folders, PIL) and image folders (Imagenette).
"""

from bdx_study.data._core import (
    DATASETS,
    DataError,
    DatasetInfo,
    ImageData,
    Loader,
    Splits,
    _load_cached,
    _register,
    augment_batch,
    check_loaded,
    dataset_info,
    defender_split,
    list_datasets,
    load_splits,
    load_test_portion,
    register_dataset,
    resolve_root,
    to_uint8,
)
from bdx_study.data._images import read_image, read_images
from bdx_study.data.cifar import CIFAR10_BINARY_MD5, CIFAR10_BINARY_URL, read_cifar_binary
from bdx_study.data.digits import _load_digits
from bdx_study.data.gtsrb import GTSRB_CLASSES
from bdx_study.data.idx import FASHION_MNIST_SYSTEM_ROOT, read_idx
from bdx_study.data.image_folder import IMAGE_EXTENSIONS, register_image_folder

__all__ = [
    "CIFAR10_BINARY_MD5",
    "CIFAR10_BINARY_URL",
    "DATASETS",
    "FASHION_MNIST_SYSTEM_ROOT",
    "GTSRB_CLASSES",
    "IMAGE_EXTENSIONS",
    "DataError",
    "DatasetInfo",
    "ImageData",
    "Loader",
    "Splits",
    "_load_cached",
    "_load_digits",
    "_register",
    "augment_batch",
    "check_loaded",
    "dataset_info",
    "defender_split",
    "list_datasets",
    "load_splits",
    "load_test_portion",
    "read_cifar_binary",
    "read_idx",
    "read_image",
    "read_images",
    "register_dataset",
    "register_image_folder",
    "resolve_root",
    "to_uint8",
]
