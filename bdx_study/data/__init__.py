"""Datasets (a registry) and the study's disjoint splits.

Two layers:

- torch-free (:mod:`bdx_study.data._core`; what ``bdx-study validate`` uses): dataset facts and
  the registry, :func:`load_arrays` (images as numpy :class:`Arrays`) and :func:`split_indices`
  (the splits as index arrays, :func:`randperm` being ``torch.randperm`` in numpy);
- torch (:mod:`bdx_study.data._tensors`, imported on first use of one of its names):
  :class:`ImageData`, :func:`load_splits` and the rest, wrapping the same arrays and indices.

One module per dataset family registers itself (all torch-free): digits, IDX (MNIST,
Fashion-MNIST), CIFAR-10 (binary), GTSRB (torchvision's folders, PIL) and image folders
(Imagenette).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bdx_study._lazy import lazy_exports
from bdx_study.data import digits  # noqa: F401  (registers the digits dataset)
from bdx_study.data._core import (
    DATASETS,
    Arrays,
    DataError,
    DatasetInfo,
    Labels,
    Loader,
    SplitIndices,
    check_arrays,
    dataset_info,
    list_datasets,
    load_arrays,
    load_labels,
    randperm,
    register_dataset,
    register_label_reader,
    resolve_root,
    split_indices,
)
from bdx_study.data._images import read_image, read_images
from bdx_study.data.cifar import CIFAR10_BINARY_MD5, CIFAR10_BINARY_URL, read_cifar_binary
from bdx_study.data.gtsrb import GTSRB_CLASSES
from bdx_study.data.idx import FASHION_MNIST_SYSTEM_ROOT, read_idx
from bdx_study.data.image_folder import IMAGE_EXTENSIONS, register_image_folder

if TYPE_CHECKING:  # re-exported for type checkers; at run time __getattr__ serves _TORCH_NAMES
    from bdx_study.data._tensors import (  # noqa: F401  (exported through __all__'s _TORCH_NAMES)
        ImageData,
        Splits,
        augment_batch,
        check_loaded,
        defender_split,
        load_splits,
        load_test_portion,
        to_uint8,
    )

# Names served by the torch layer, imported on first access (PEP 562).
_TORCH_NAMES = (
    "ImageData",
    "Splits",
    "augment_batch",
    "check_loaded",
    "defender_split",
    "load_splits",
    "load_test_portion",
    "to_uint8",
)


__getattr__ = lazy_exports(__name__, dict.fromkeys(_TORCH_NAMES, "bdx_study.data._tensors"))


__all__ = [
    "CIFAR10_BINARY_MD5",
    "CIFAR10_BINARY_URL",
    "DATASETS",
    "FASHION_MNIST_SYSTEM_ROOT",
    "GTSRB_CLASSES",
    "IMAGE_EXTENSIONS",
    "Arrays",
    "DataError",
    "DatasetInfo",
    "Labels",
    "Loader",
    "SplitIndices",
    "check_arrays",
    "dataset_info",
    "list_datasets",
    "load_arrays",
    "load_labels",
    "randperm",
    "read_cifar_binary",
    "read_idx",
    "read_image",
    "read_images",
    "register_dataset",
    "register_label_reader",
    "register_image_folder",
    "resolve_root",
    "split_indices",
    *_TORCH_NAMES,
]
