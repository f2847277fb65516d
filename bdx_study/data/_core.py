"""The torch-free data contract: dataset facts, the dataset registry, images as numpy arrays and
the study's disjoint splits as index arrays. ``bdx-study validate`` reads datasets through this
module alone; :mod:`bdx_study.data._tensors` wraps the same arrays into torch tensors
(:class:`~bdx_study.data.ImageData`) without copying them.

Splits, all disjoint:
- ``train``: the victim's training data (the attacker poisons it);
- ``reserve``: the defender's reserved clean pool; a trial takes its first ``clean_set_size``
  images and splits them into a part to finetune on and a part to calibrate the threshold on
  (:func:`~bdx_study.data.defender_split`);
- ``selection``: inputs the hyperparameter search scores trials on (its objective);
- ``evaluation``: inputs every reported figure comes from: never seen by training, finetuning,
  calibration or the search that picked the hyperparameters.
Reserve, selection and evaluation come from the dataset's test portion (as in the paper); none
depends on ``clean_set_size``, so trials with different clean-set sizes are judged on the same
inputs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from bdx_study._registry import Registry


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


class Arrays(NamedTuple):
    """One portion of a dataset as numpy arrays: what every built-in loader returns.

    ``pixels`` (N, C, H, W) is uint8 0..255 (decoded image files), or float32 in [0, 1] where the
    images are computed rather than read (digits: interpolated); ``labels`` (N,) is int64.
    """

    pixels: np.ndarray
    labels: np.ndarray


class TensorPortion(Protocol):
    """What a loader may return instead of :class:`Arrays`: an :class:`~bdx_study.data.ImageData`
    (torch), read through its ``pixels`` and ``y`` and converted on load without copying."""

    @property
    def pixels(self) -> Any: ...

    @property
    def y(self) -> Any: ...


# (root, download) -> (train, test)
Loader = Callable[[Path | None, bool], "tuple[Arrays, Arrays] | tuple[TensorPortion, TensorPortion]"]
DATASETS: Registry[tuple[DatasetInfo, Loader]] = Registry("dataset")


def register_dataset(info: DatasetInfo) -> Callable[[Loader], Loader]:
    """Decorator: register ``info.name`` with its loader (root, download) -> (train, test), each
    portion :class:`Arrays` (or :class:`~bdx_study.data.ImageData`)."""

    def deco(fn: Loader) -> Loader:
        DATASETS.register(info.name)((info, fn))
        return fn

    return deco


def dataset_info(name: str) -> DatasetInfo:
    return DATASETS.get(name)[0]


def list_datasets() -> list[str]:
    return DATASETS.names()


def resolve_root(root: str | os.PathLike[str] | None) -> Path | None:
    return None if root is None else Path(root).expanduser().resolve()


def check_portion(name: str, part: str, shape: tuple[int, ...], labels_min: int | None, labels_max: int | None) -> None:
    """One loaded portion matches ``name``'s registered facts: image shape (C, H, W) and label
    range (``labels_min``/``labels_max``: None when the portion is empty)."""
    info = dataset_info(name)
    if shape != info.input_shape:
        raise DataError(f"dataset {name!r}: {part} images are {shape}, expected {info.input_shape}")
    if labels_min is not None and labels_max is not None and (labels_min < 0 or labels_max >= info.num_classes):
        raise DataError(f"dataset {name!r}: {part} labels outside [0, {info.num_classes})")


def _as_arrays(name: str, part: str, data: Any) -> Arrays:
    """A loader's portion as :class:`Arrays` (ImageData is converted without copying), checked."""
    if not isinstance(data, Arrays):
        if not (hasattr(data, "pixels") and hasattr(data, "y")):
            raise DataError(f"dataset {name!r}: the loader returned {type(data).__name__} for {part}, not Arrays")
        data = Arrays(data.pixels.numpy(force=True), data.y.numpy(force=True))  # ImageData: torch is loaded
    pixels, labels = data
    if not isinstance(pixels, np.ndarray) or pixels.dtype not in (np.uint8, np.float32) or pixels.ndim != 4:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DataError(f"dataset {name!r}: {part} pixels must be a uint8 or float32 (N, C, H, W) array, got {got}")
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu" or labels.shape != pixels.shape[:1]:
        got = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise DataError(f"dataset {name!r}: {part} has {len(pixels)} images but labels {got} (integers (N,) expected)")
    return Arrays(pixels, labels.astype(np.int64, copy=False))


def check_arrays(name: str, train: Arrays, test: Arrays) -> None:
    """A loader's output matches its registered facts (shape, label range)."""
    for part, data in (("train", train), ("test", test)):
        px, y = data
        c, h, w = px.shape[1:]
        lo, hi = (int(y.min()), int(y.max())) if len(y) else (None, None)
        check_portion(name, part, (int(c), int(h), int(w)), lo, hi)


@functools.lru_cache(maxsize=4)
def load_arrays(name: str, root: Path | None, download: bool) -> tuple[Arrays, Arrays]:
    """The (train, test) portions of dataset ``name`` as numpy arrays, checked against its
    registered facts; cached (``root`` as :func:`resolve_root` gives it). Torch is imported only
    for a loader that returns ImageData, and torchvision only to download."""
    _, loader = DATASETS.get(name)
    raw_train, raw_test = loader(root, download)
    train, test = _as_arrays(name, "train", raw_train), _as_arrays(name, "test", raw_test)
    check_arrays(name, train, test)
    return train, test


class Labels(NamedTuple):
    """One portion as the checks that need no pixels see it (``validate``): the image array's
    shape (N, C, H, W) and the labels (N,) int64."""

    shape: tuple[int, int, int, int]
    labels: np.ndarray


# dataset name -> a reader of its labels and image shapes that decodes no pixels (root, download) -> (train, test)
LabelReader = Callable[[Path | None, bool], "tuple[Labels, Labels]"]
_LABEL_READERS: dict[str, LabelReader] = {}


def register_label_reader(name: str) -> Callable[[LabelReader], LabelReader]:
    """Decorator: a cheaper reader of dataset ``name`` for :func:`load_labels`: the labels and the
    image files' shapes from their headers, refusing files whose size disagrees with their
    header (what the full loader would refuse); datasets without one are read whole."""

    def deco(fn: LabelReader) -> LabelReader:
        _LABEL_READERS[name] = fn
        return fn

    return deco


@functools.lru_cache(maxsize=4)
def load_labels(name: str, root: Path | None, download: bool) -> tuple[Labels, Labels]:
    """The (train, test) labels and image shapes of dataset ``name``, checked against its
    registered facts like :func:`load_arrays`, without decoding pixels where the dataset has a
    label reader (Fashion-MNIST's 30 MB of .gz images are most of ``validate``'s time otherwise)."""
    reader = _LABEL_READERS.get(name)
    if reader is None:
        train, test = load_arrays(name, root, download)
        return Labels(train.pixels.shape, train.labels), Labels(test.pixels.shape, test.labels)
    portions = reader(root, download)
    for part, (shape, y) in zip(("train", "test"), portions, strict=True):
        lo, hi = (int(y.min()), int(y.max())) if len(y) else (None, None)
        check_portion(name, part, tuple(shape[1:]), lo, hi)
    return portions


# torch's CPU randperm keeps its 32-bit Fisher-Yates below this size (ATen's randperm_cpu).
_RANDPERM_MAX = (2**32 - 1) // 20


def randperm(n: int, seed: int) -> np.ndarray:
    """A permutation of 0..n-1 (int64), bit-identical to ``torch.randperm(n,
    generator=torch.Generator().manual_seed(seed))`` on CPU: torch's Fisher-Yates swaps position
    i with i + (draw % (n - i)), the draws being mt19937's 32-bit outputs; numpy's RandomState
    runs the same mt19937, seeded the same way (torch keeps the seed's low 32 bits)."""
    if not 0 <= n < _RANDPERM_MAX:
        raise ValueError(f"randperm: n must be in [0, {_RANDPERM_MAX}) (torch's 32-bit shuffle), got {n}")
    draws = np.random.RandomState(seed % 2**32).randint(0, 2**32, size=max(n - 1, 0), dtype=np.uint64)
    offsets = (draws % np.arange(n, 1, -1, dtype=np.uint64)).tolist()
    perm = list(range(n))
    for i, z in enumerate(offsets):
        j = i + z
        perm[i], perm[j] = perm[j], perm[i]
    return np.array(perm, dtype=np.int64)


class SplitIndices(NamedTuple):
    """Row indices of the splits: ``train`` into the training portion (None: all of it), the
    others into the test portion."""

    train: np.ndarray | None
    reserve: np.ndarray
    selection: np.ndarray
    evaluation: np.ndarray


def split_indices(
    name: str,
    n_train: int,
    n_test: int,
    *,
    reserve_size: int,
    eval_size: int | None = None,
    selection_fraction: float = 0.5,
    train_size: int | None = None,
    split_seed: int = 0,
) -> SplitIndices:
    """The disjoint splits of dataset ``name`` (``n_train`` training, ``n_test`` test images) as
    index arrays.

    ``reserve_size`` test-portion images form the defender's pool; of the next ``eval_size``
    (default: all the rest), ``selection_fraction`` form the selection split and the others the
    evaluation split. ``train_size`` (default: all) caps the victim's training set. The
    permutations are fixed by ``split_seed``, so every trial and victim sees the same splits.
    """
    train = None
    if train_size is not None:
        if train_size > n_train:
            raise DataError(f"dataset {name!r}: train_size {train_size} > {n_train} training images")
        train = randperm(n_train, split_seed + 1)[:train_size]  # independent of the test permutation
    available = n_test - reserve_size
    if reserve_size < 1 or available < 1:
        raise DataError(
            f"dataset {name!r}: reserve_size {reserve_size} must be in [1, {n_test - 1}] "
            f"(the test portion has {n_test} images)"
        )
    n_held = available if eval_size is None else eval_size
    if not 2 <= n_held <= available:
        raise DataError(f"dataset {name!r}: eval_size {eval_size} must be in [2, {available}]")
    n_sel = round(n_held * selection_fraction)
    if not 1 <= n_sel < n_held:
        raise DataError(f"selection_fraction {selection_fraction} leaves {n_sel} of {n_held} images for selection")
    perm = randperm(n_test, split_seed)
    held = perm[reserve_size : reserve_size + n_held]
    return SplitIndices(train, perm[:reserve_size], held[:n_sel], held[n_sel:])
