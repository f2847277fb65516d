"""Reading a user's own files: model weights (safetensors, never a pickle) and clean images (an
``.npz`` read without pickles, or a folder of class folders of images), each checked against the
model they are meant for (architecture, input shape, class count, normalization, pixel range)
before any work. Errors name the file, the command-line flag that gave it, and what is expected:
``bdx-study fit`` hands them to the user as they are.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bdx_study._io import special_kind
from bdx_study.archs import Classifier, create_model
from bdx_study.data import ImageData
from bdx_study.data._images import IMAGE_EXTENSIONS, decode_pixels, image_files

Shape = tuple[int, int, int]
MAX_CLEAN_BYTES = 4 << 30  # an .npz array's decompressed size: a clean set is thousands of images
MIN_PIXEL_STD = 1e-3  # clean images whose pixels vary less are blank or collapsed on conversion
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header


class UserFileError(ValueError):
    """A user's file that cannot be used as given; the message names the file (and the flag that
    gave it) and what is expected."""


# ------------------------------------------------------------------------------------ the model


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a pickle (torch.save, pickle.dump) or any other format
    is refused before anything is deserialized."""
    kind = special_kind(path)
    if kind is not None or path.is_dir():
        raise UserFileError(
            f"--weights {path}: {kind or 'a folder'}, not a regular file; give the model's .safetensors file"
        )
    if not path.is_file():
        raise UserFileError(f"--weights {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    convert = "save the weights with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not (0 < header_len <= min(SAFETENSORS_MAX_HEADER, size - 8) and head[8:9] == b"{"):
        if head.startswith(b"PK"):
            raise UserFileError(
                f"--weights {path}: a zip archive (PyTorch's torch.save format, which holds a pickle); bdx-study "
                f"never unpickles files. In your own environment, {convert}"
            )
        if head[:1] == b"\x80":
            raise UserFileError(
                f"--weights {path}: a Python pickle; bdx-study never unpickles files. {convert[0].upper()}{convert[1:]}"
            )
        raise UserFileError(f"--weights {path}: not a safetensors file; {convert}")
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise UserFileError(f"--weights {path}: a damaged safetensors file ({' '.join(str(e).split())})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserFileError(
            f"--weights {path}: {len(bad)} tensor(s) hold NaN or infinite values (first: {', '.join(bad[:3])}); "
            "the weights are broken (a diverged training run?): give finite weights"
        )
    return state


def _layers(body: nn.Module, kind: type[nn.Module]) -> list[str]:
    return [name for name, m in body.named_modules() if isinstance(m, kind)]


def _check_state(
    model: Classifier, state: dict[str, Tensor], path: Path, architecture: str, shape: Shape, classes: int
) -> None:
    """Refuse weights that do not fit ``model``, naming the first mismatches."""
    own = model.state_dict()
    convs, heads = _layers(model.body, nn.Conv2d), _layers(model.body, nn.Linear)
    if heads and (w := state.get(f"body.{heads[-1]}.weight")) is not None and w.shape[0] != classes:
        raise UserFileError(
            f"--weights {path}: the classifier head (body.{heads[-1]}) has {w.shape[0]} outputs, but --num-classes "
            f"is {classes}"
        )
    if convs and (w := state.get(f"body.{convs[0]}.weight")) is not None and w.ndim == 4 and w.shape[1] != shape[0]:
        raise UserFileError(
            f"--weights {path}: the first layer (body.{convs[0]}) takes {w.shape[1]} input channel(s), but "
            f"--input-shape has {shape[0]}"
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} is {tuple(state[k].shape)} where the architecture has {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{len(found)} tensor(s) {what} (first: {sep.join(found[:3])})"
            for what, found, sep in (
                ("missing", missing, ", "),
                ("unexpected", unexpected, ", "),
                ("of the wrong shape", wrong, "; "),
            )
            if found
        ]
        raise UserFileError(
            f"--weights {path} does not match --architecture {architecture} ({shape[0]} channel(s), {classes} "
            f"classes): {'. '.join(problems)}. Check --architecture and --num-classes"
        )


def _floats(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def load_model(
    path: Path,
    architecture: str,
    input_shape: Shape,
    num_classes: int,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> Classifier:
    """The registered ``architecture`` with the weights of ``path`` (safetensors), normalizing
    inside. The weights may be a bdx-study model's (with its ``mean``/``std`` buffers, which
    must then agree with ``mean``/``std`` when those are given) or the bare network's."""
    state = read_safetensors(path)
    saved: dict[str, tuple[float, ...]] = {
        k: tuple(float(v) for v in state.pop(k).flatten()) for k in ("mean", "std") if k in state
    }
    if mean is None or std is None:
        if len(saved) < 2:
            raise UserFileError(
                f"--weights {path} holds no normalization: give --mean and --std, per channel, as the model was "
                "trained with (--mean 0 --std 1 for a model fed raw [0, 1] pixels)"
            )
        mean, std = saved["mean"], saved["std"]
    for name, given in (("mean", mean), ("std", std)):
        held = saved.get(name)
        if held is not None and (len(held) != len(given) or not np.allclose(held, given, atol=1e-4)):
            raise UserFileError(
                f"--weights {path} was saved with normalization {name} {_floats(held)}, but --{name} says "
                f"{_floats(given)}: drop --mean/--std to use the saved values, or fix them"
            )
    try:
        model = create_model(architecture, input_shape, num_classes, mean, std)
    except (ValueError, RuntimeError) as e:  # an unknown name, or a shape the architecture refuses
        raise UserFileError(f"--architecture {architecture}: {e}") from None
    if not any(k.startswith("body.") for k in state):  # the bare network: it goes inside the Classifier
        state = {f"body.{k}": v for k, v in state.items()}
    state.update(mean=model.get_buffer("mean").clone(), std=model.get_buffer("std").clone())
    _check_state(model, state, path, architecture, input_shape, num_classes)
    if len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise UserFileError(
            f"--weights {path}: normalization of {len(mean)} channel(s), but --input-shape has {input_shape[0]}"
        )
    model.load_state_dict(state)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    except RuntimeError as e:
        raise UserFileError(
            f"--architecture {architecture} with --weights {path} does not run on {'x'.join(map(str, input_shape))} "
            f"inputs ({e}); check --input-shape"
        ) from None
    return model


# ------------------------------------------------------------------------------------ the data


def load_clean(path: Path, input_shape: Shape, num_classes: int) -> ImageData:
    """The user's clean images (float32 (N, C, H, W) in [0, 1]) and labels, from an ``.npz`` or
    a folder of class folders; checked against ``input_shape`` and ``num_classes``."""
    kind = special_kind(path)
    if kind is not None:
        raise UserFileError(f"--clean {path}: {kind}, not a regular file; give an .npz or a folder of class folders")
    if path.is_dir():
        data = _load_folder(path, input_shape, num_classes)
    elif path.is_file():
        data = _load_npz(path, input_shape, num_classes)
    else:
        raise UserFileError(f"--clean {path}: no such file or folder")
    if len(data) == 0:
        raise UserFileError(f"--clean {path}: no images")
    spread = float(data.x.std())
    if spread < MIN_PIXEL_STD:
        raise UserFileError(
            f"--clean {path}: the pixel values barely vary (standard deviation {spread:.2g} on the [0, 1] scale): the "
            "images are blank or collapsed on conversion; check how they were saved"
        )
    return data


def check_classes(data: ImageData, num_classes: int, path: Path) -> list[str]:
    """Refuse clean images of one class only (finetuning and calibration on one class say nothing
    of the others); a warning when they cover less than half of the model's classes."""
    present = sorted(int(c) for c in torch.unique(data.y))
    if len(present) == 1:
        raise UserFileError(
            f"--clean {path}: all {len(data)} images are labelled class {present[0]}; a detector is fitted and its "
            f"threshold calibrated on clean images of the model's classes: give images of all {num_classes}"
        )
    if len(present) < num_classes / 2:
        shown = ", ".join(map(str, present[:10])) + (", ..." if len(present) > 10 else "")
        return [
            f"--clean has images of only {len(present)} of the model's {num_classes} classes ({shown}): the "
            "detector is fitted and its threshold calibrated on those; inputs of the other classes may be flagged "
            "far more (or less) often than target_fpr"
        ]
    return []


def _npz_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """(shape, dtype, bytes claimed) of one array in an .npz, read from its header alone."""
    info = zf.getinfo(member)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        offset = f.tell()
    if not dtype.hasobject and math.prod(shape) * dtype.itemsize != info.file_size - offset:
        raise ValueError(f"its header claims shape {tuple(shape)} but the member holds {info.file_size - offset} bytes")
    return tuple(shape), dtype, offset


def _load_npz(path: Path, input_shape: Shape, num_classes: int) -> ImageData:
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise UserFileError(
            f"--clean {path}: a single .npy array; save images and labels together: np.savez(f, x=x, y=y)"
        )
    if head[:1] == b"\x80":
        raise UserFileError(f"--clean {path}: a Python pickle; bdx-study never unpickles files: np.savez(f, x=x, y=y)")
    if not head.startswith(b"PK"):
        raise UserFileError(
            f"--clean {path}: not an .npz archive; expected np.savez(f, x=images, y=labels) or a folder"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            if "x" not in names or "y" not in names:
                raise UserFileError(f"--clean {path}: expected arrays 'x' (images) and 'y' (labels); it holds {names}")
            for key in ("x", "y"):
                _, dtype, _ = _npz_header(zf, f"{key}.npy")
                claimed = zf.getinfo(f"{key}.npy").file_size
                if claimed > MAX_CLEAN_BYTES:
                    raise UserFileError(
                        f"--clean {path}: array {key!r} holds {claimed} bytes once decompressed; at most "
                        f"{MAX_CLEAN_BYTES} (a clean set is thousands of images, not millions)"
                    )
                if dtype.hasobject or dtype.fields is not None:
                    raise UserFileError(
                        f"--clean {path}: array {key!r} holds Python objects (dtype {dtype}), which would need "
                        "unpickling; bdx-study never unpickles files: save numeric arrays"
                    )
        with np.load(path, allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
    except UserFileError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise UserFileError(f"--clean {path}: a damaged .npz ({e})") from None
    return ImageData(_as_images(x, path, input_shape), _as_labels(y, len(x), path, num_classes))


def _as_images(x: np.ndarray, path: Path, input_shape: Shape) -> Tensor:
    c, h, w = input_shape
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise UserFileError(f"--clean {path}: x has dtype {x.dtype}; expected uint8 (0-255) or float (0-1) pixels")
    if x.ndim == 4 and x.shape[1:] == (c, h, w):
        pass
    elif x.ndim == 4 and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        x = x[:, None]
    else:
        raise UserFileError(
            f"--clean {path}: x has shape {x.shape}, but --input-shape is {c},{h},{w}: expected (N, {c}, {h}, {w}) "
            f"or (N, {h}, {w}, {c})"
        )
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not bool(torch.isfinite(t).all()) or (t.numel() and (float(t.min()) < 0 or float(t.max()) > 1)):
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        raise UserFileError(
            f"--clean {path}: float pixels span [{lo:.3g}, {hi:.3g}] (or are not finite); expected [0, 1] "
            "(or uint8 0-255)"
        )
    return t


def _as_labels(y: np.ndarray, n: int, path: Path, num_classes: int) -> Tensor:
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != n:
        raise UserFileError(
            f"--clean {path}: y has dtype {y.dtype} and shape {y.shape}; expected {n} integer labels, one per image"
        )
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise UserFileError(
            f"--clean {path}: labels span [{int(y.min())}, {int(y.max())}], but --num-classes is {num_classes}: "
            f"{int(bad.sum())} label(s) outside [0, {num_classes - 1}]"
        )
    return torch.from_numpy(y.astype(np.int64))


def _class_folders(root: Path, num_classes: int) -> list[tuple[Path, int]]:
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise UserFileError(f"--clean {root}: no class folders; expected {root}/<class>/<image> (or an .npz)")
    names = [d.name for d in folders]
    if all(n.isdigit() for n in names):
        out = [(d, int(d.name)) for d in folders]
        bad = [d.name for d, i in out if i >= num_classes]
        if bad:
            raise UserFileError(
                f"--clean {root}: class folder(s) {', '.join(bad)} name classes beyond --num-classes {num_classes} "
                f"(indices 0-{num_classes - 1})"
            )
        return out
    if len(folders) != num_classes:
        raise UserFileError(
            f"--clean {root}: {len(folders)} class folders ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            f", but --num-classes is {num_classes}: name the folders by class index (0-{num_classes - 1}), or give "
            f"all {num_classes}, whose sorted names are the class order"
        )
    return [(d, i) for i, d in enumerate(folders)]


def _load_folder(root: Path, input_shape: Shape, num_classes: int) -> ImageData:
    """Class folders of images, read through PIL: converted to 8-bit grayscale ("L") for one
    channel or "RGB" for three (alpha dropped), resized to H x W (bilinear) when their size
    differs, scaled to [0, 1]."""
    from PIL import Image

    c, h, w = input_shape
    if c not in (1, 3):
        raise UserFileError(f"--clean {root}: a folder of images gives 1 (grayscale) or 3 (RGB) channels, not {c}")
    images, labels = [], []
    for folder, label in _class_folders(root, num_classes):
        for f in image_files(folder):
            kind = special_kind(f)
            if kind is not None or not f.is_file():
                raise UserFileError(f"--clean {f}: {kind or 'a folder'}, not a regular file; an image file is expected")
            try:
                with Image.open(f) as im:
                    arr = decode_pixels(im, c, h, w)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise UserFileError(f"--clean {f}: not a readable image ({e})") from None
            images.append(arr.reshape(h, w, c).transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise UserFileError(f"--clean {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return ImageData(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64))
