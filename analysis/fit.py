"""``bdx-study fit``: apply a recipe to a user's own model and clean data.

The flow, with every check before any work:

1. the recipe: a family, its parameters and protocol (the seed policy applied, as ``export``
   does), and its domain (:mod:`bdx_study.analysis.domain`: warnings when the model lies
   outside it);
2. the model: a registered architecture built with the class count, input shape and
   normalization it was trained with, and weights read from a safetensors file (nothing is
   unpickled; weights that do not fit the architecture are refused, naming the mismatches);
3. the clean data: an ``.npz`` (arrays ``x`` and ``y``, read without pickles) or a folder of
   class folders of images; shape, pixel range and labels checked against the model;
4. the split (seeded): a held-out part never used to fit or calibrate, on which the realized
   false-positive rate is measured, and the defender's reserve, from which the recipe's
   protocol takes D_c (its finetune and calibration parts; a clean set larger than the reserve
   is scaled down, with a notice);
5. the fit under the shared protocol (:func:`bdx_study.stages.run_detector`, no cache, the
   attack ``none``: there are no triggered inputs, so only clean figures are measured) and a
   bundle that ``bdx-study detect`` serves.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bdx_study._io import interrupts_deferred, sha256_file, special_kind
from bdx_study.archs import Classifier, create_model
from bdx_study.attacks import create_attack
from bdx_study.data import DatasetInfo, ImageData, Splits, dataset_info, list_datasets
from bdx_study.detector import save_bundle
from bdx_study.detectors import DetectorFamily, create_detector
from bdx_study.detectors.params import MIN_REFERENCE
from bdx_study.metrics import min_calibration
from bdx_study.protocol import Evaluation, ProtocolConfig
from bdx_study.stages import StageStore, run_detector
from bdx_study.training import pick_device, predict_proba

from .domain import check_domain, unseen_triggers
from .export import load_recipe, recipe_config, recipe_entry

Shape = tuple[int, int, int]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_CLEAN_BYTES = 4 << 30  # an .npz array's decompressed size: a clean set is thousands of images
MIN_PIXEL_STD = 1e-3  # clean images whose pixels vary less are blank or collapsed on conversion
CHANCE_MARGIN = 0.05  # a model must beat chance on the clean data by this much to be worth a detector
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header


class FitError(ValueError):
    """Bad input to ``bdx-study fit``; the message names the file or value and what is expected."""


# ------------------------------------------------------------------------------------ arguments


def parse_input_shape(text: str) -> Shape:
    """``"C,H,W"`` (or ``CxHxW``) -> (C, H, W), each a positive integer."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise FitError(f"--input-shape {text!r}: expected C,H,W as three positive integers, e.g. 3,32,32")
    return shape  # type: ignore[return-value]


def per_channel(values: Sequence[float] | None, channels: int, flag: str) -> tuple[float, ...] | None:
    """One value per channel (a single value is repeated); None stays None."""
    if values is None:
        return None
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels or not all(math.isfinite(v) for v in vals):
        raise FitError(f"{flag} {' '.join(map(str, values))}: expected 1 or {channels} finite value(s)")
    if flag == "--std" and min(vals) <= 0:
        raise FitError(f"--std {' '.join(map(str, values))}: every value must be > 0")
    return vals


# ------------------------------------------------------------------------------------ the model


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a pickle (torch.save, pickle.dump) or any other format
    is refused before anything is deserialized."""
    if not path.is_file():
        raise FitError(f"--weights {path}: no such file")
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    convert = "save the weights with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not (0 < header_len <= min(SAFETENSORS_MAX_HEADER, size - 8) and head[8:9] == b"{"):
        if head.startswith(b"PK"):
            raise FitError(
                f"--weights {path}: a zip archive (PyTorch's torch.save format, which holds a pickle); bdx-study "
                f"never unpickles files. In your own environment, {convert}"
            )
        if head[:1] == b"\x80":
            raise FitError(
                f"--weights {path}: a Python pickle; bdx-study never unpickles files. {convert[0].upper()}{convert[1:]}"
            )
        raise FitError(f"--weights {path}: not a safetensors file; {convert}")
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error type on a damaged file
        raise FitError(f"--weights {path}: a damaged safetensors file ({e})") from None


def _layers(body: nn.Module, kind: type[nn.Module]) -> list[str]:
    return [name for name, m in body.named_modules() if isinstance(m, kind)]


def _check_state(
    model: Classifier, state: dict[str, Tensor], path: Path, architecture: str, shape: Shape, classes: int
) -> None:
    """Refuse weights that do not fit ``model``, naming the first mismatches."""
    own = model.state_dict()
    convs, heads = _layers(model.body, nn.Conv2d), _layers(model.body, nn.Linear)
    if heads and (w := state.get(f"body.{heads[-1]}.weight")) is not None and w.shape[0] != classes:
        raise FitError(
            f"--weights {path}: the classifier head (body.{heads[-1]}) has {w.shape[0]} outputs, but --num-classes "
            f"is {classes}"
        )
    if convs and (w := state.get(f"body.{convs[0]}.weight")) is not None and w.ndim == 4 and w.shape[1] != shape[0]:
        raise FitError(
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
        raise FitError(
            f"--weights {path} does not match --architecture {architecture} ({shape[0]} channel(s), {classes} "
            f"classes): {'. '.join(problems)}. Check --architecture and --num-classes"
        )


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
            raise FitError(
                f"--weights {path} holds no normalization: give --mean and --std, per channel, as the model was "
                "trained with (--mean 0 --std 1 for a model fed raw [0, 1] pixels)"
            )
        mean, std = saved["mean"], saved["std"]
    for name, given in (("mean", mean), ("std", std)):
        held = saved.get(name)
        if held is not None and (len(held) != len(given) or not np.allclose(held, given, atol=1e-4)):
            raise FitError(
                f"--weights {path} was saved with normalization {name} {list(held)}, but --{name} says "
                f"{list(given)}: drop --mean/--std to use the saved values, or fix them"
            )
    try:
        model = create_model(architecture, input_shape, num_classes, mean, std)
    except (ValueError, RuntimeError) as e:  # an unknown name, or a shape the architecture refuses
        raise FitError(f"--architecture {architecture}: {e}") from None
    if not any(k.startswith("body.") for k in state):  # the bare network: it goes inside the Classifier
        state = {f"body.{k}": v for k, v in state.items()}
    state.update(mean=model.get_buffer("mean").clone(), std=model.get_buffer("std").clone())
    _check_state(model, state, path, architecture, input_shape, num_classes)
    if len(mean) != input_shape[0] or len(std) != input_shape[0]:
        raise FitError(
            f"--weights {path}: normalization of {len(mean)} channel(s), but --input-shape has {input_shape[0]}"
        )
    model.load_state_dict(state)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, *input_shape))
    except RuntimeError as e:
        raise FitError(
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
        raise FitError(f"--clean {path}: {kind}, not a regular file; give an .npz or a folder of class folders")
    if path.is_dir():
        data = _load_folder(path, input_shape, num_classes)
    elif path.is_file():
        data = _load_npz(path, input_shape, num_classes)
    else:
        raise FitError(f"--clean {path}: no such file or folder")
    if len(data) == 0:
        raise FitError(f"--clean {path}: no images")
    spread = float(data.x.std())
    if spread < MIN_PIXEL_STD:
        raise FitError(
            f"--clean {path}: the pixel values barely vary (standard deviation {spread:.2g} on the [0, 1] scale): the "
            "images are blank or collapsed on conversion; check how they were saved"
        )
    return data


def check_classes(data: ImageData, num_classes: int, path: Path) -> list[str]:
    """Refuse clean images of one class only (finetuning and calibration on one class say nothing
    of the others); a warning when they cover less than half of the model's classes."""
    present = sorted(int(c) for c in torch.unique(data.y))
    if len(present) == 1:
        raise FitError(
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
        raise FitError(f"--clean {path}: a single .npy array; save images and labels together: np.savez(f, x=x, y=y)")
    if head[:1] == b"\x80":
        raise FitError(f"--clean {path}: a Python pickle; bdx-study never unpickles files: np.savez(f, x=x, y=y)")
    if not head.startswith(b"PK"):
        raise FitError(f"--clean {path}: not an .npz archive; expected np.savez(f, x=images, y=labels) or a folder")
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n.removesuffix(".npy") for n in zf.namelist()]
            if "x" not in names or "y" not in names:
                raise FitError(f"--clean {path}: expected arrays 'x' (images) and 'y' (labels); it holds {names}")
            for key in ("x", "y"):
                _, dtype, _ = _npz_header(zf, f"{key}.npy")
                claimed = zf.getinfo(f"{key}.npy").file_size
                if claimed > MAX_CLEAN_BYTES:
                    raise FitError(
                        f"--clean {path}: array {key!r} holds {claimed} bytes once decompressed; at most "
                        f"{MAX_CLEAN_BYTES} (a clean set is thousands of images, not millions)"
                    )
                if dtype.hasobject or dtype.fields is not None:
                    raise FitError(
                        f"--clean {path}: array {key!r} holds Python objects (dtype {dtype}), which would need "
                        "unpickling; bdx-study never unpickles files: save numeric arrays"
                    )
        with np.load(path, allow_pickle=False) as npz:
            x, y = np.asarray(npz["x"]), np.asarray(npz["y"])
    except FitError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise FitError(f"--clean {path}: a damaged .npz ({e})") from None
    return ImageData(_as_images(x, path, input_shape), _as_labels(y, len(x), path, num_classes))


def _as_images(x: np.ndarray, path: Path, input_shape: Shape) -> Tensor:
    c, h, w = input_shape
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise FitError(f"--clean {path}: x has dtype {x.dtype}; expected uint8 (0-255) or float (0-1) pixels")
    if x.ndim == 4 and x.shape[1:] == (c, h, w):
        pass
    elif x.ndim == 4 and x.shape[1:] == (h, w, c):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
        x = x[:, None]
    else:
        raise FitError(
            f"--clean {path}: x has shape {x.shape}, but --input-shape is {c},{h},{w}: expected (N, {c}, {h}, {w}) "
            f"or (N, {h}, {w}, {c})"
        )
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if not bool(torch.isfinite(t).all()) or (t.numel() and (float(t.min()) < 0 or float(t.max()) > 1)):
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        raise FitError(
            f"--clean {path}: float pixels span [{lo:.3g}, {hi:.3g}] (or are not finite); expected [0, 1] "
            "(or uint8 0-255)"
        )
    return t


def _as_labels(y: np.ndarray, n: int, path: Path, num_classes: int) -> Tensor:
    if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != n:
        raise FitError(
            f"--clean {path}: y has dtype {y.dtype} and shape {y.shape}; expected {n} integer labels, one per image"
        )
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise FitError(
            f"--clean {path}: labels span [{int(y.min())}, {int(y.max())}], but --num-classes is {num_classes}: "
            f"{int(bad.sum())} label(s) outside [0, {num_classes - 1}]"
        )
    return torch.from_numpy(y.astype(np.int64))


def _class_folders(root: Path, num_classes: int) -> list[tuple[Path, int]]:
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise FitError(f"--clean {root}: no class folders; expected {root}/<class>/<image> (or an .npz)")
    names = [d.name for d in folders]
    if all(n.isdigit() for n in names):
        out = [(d, int(d.name)) for d in folders]
        bad = [d.name for d, i in out if i >= num_classes]
        if bad:
            raise FitError(
                f"--clean {root}: class folder(s) {', '.join(bad)} name classes beyond --num-classes {num_classes} "
                f"(indices 0-{num_classes - 1})"
            )
        return out
    if len(folders) != num_classes:
        raise FitError(
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
        raise FitError(f"--clean {root}: a folder of images gives 1 (grayscale) or 3 (RGB) channels, not {c}")
    images, labels = [], []
    for folder, label in _class_folders(root, num_classes):
        for f in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            kind = special_kind(f)
            if kind is not None or not f.is_file():
                raise FitError(f"--clean {f}: {kind or 'a folder'}, not a regular file; an image file is expected")
            try:
                with Image.open(f) as im:
                    arr = _pixels(im, c, h, w, f)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise FitError(f"--clean {f}: not a readable image ({e})") from None
            images.append(arr.reshape(h, w, c).transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise FitError(f"--clean {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    return ImageData(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64))


HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL modes of 16-bit grayscale


def _pixels(im: Any, c: int, h: int, w: int, f: Path) -> np.ndarray:
    """One image as float32 (H, W, C) in [0, 1], converted by its value range: 8-bit images
    through PIL ("L" or "RGB"), 16-bit and 32-bit grayscale by their own range (PIL's conversion
    to 8 bits would clip them to white), float images as they are if in [0, 1]."""
    from PIL import Image

    if im.mode not in (*HIGH_DEPTH, "I", "F"):
        im = im.convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.float32).reshape(h, w, c) / 255.0
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"a float image with values in [{np.nanmin(a):.3g}, {np.nanmax(a):.3g}]; expected [0, 1]")
        scale = 1.0
    else:  # 16-bit, or 32-bit integers ("I": 16-bit PNGs in older PIL) holding 16- or 8-bit values
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"integer pixels span [{a.min():.0f}, {a.max():.0f}]; expected 8 or 16 bits")
        scale = 65535.0 if im.mode in HIGH_DEPTH or a.max() > 255 else 255.0
    g = Image.fromarray((a / scale).astype(np.float32))  # mode "F"
    if g.size != (w, h):
        g = g.resize((w, h), Image.Resampling.BILINEAR)
    out = np.clip(np.asarray(g, dtype=np.float32), 0.0, 1.0)[..., None]
    return np.repeat(out, c, axis=2)


# ------------------------------------------------------------------------------------ the split


@dataclass(frozen=True)
class SplitPlan:
    """How the user's clean images are used: held out, or the defender's reserve (D_c taken by
    the protocol, possibly scaled down to fit)."""

    total: int
    heldout: int
    protocol: ProtocolConfig  # the recipe's, clean_set_size scaled down when the reserve is smaller
    notice: str | None  # what was scaled, for the user

    @property
    def reserve(self) -> int:
        return self.total - self.heldout

    @property
    def calibration(self) -> int:
        return self.protocol.calibration_images

    @property
    def finetune(self) -> int:
        p = self.protocol
        return p.clean_set_size if p.calibration_size is not None else p.clean_set_size - self.calibration


def _calibration_needed(protocol: ProtocolConfig, share: float = 0.0) -> int:
    """Correctly classified calibration images the threshold needs; a family scored against a
    clean reference (a committee) takes ``share`` of them for that first, at least MIN_REFERENCE."""
    need = min_calibration(protocol.target_fpr) if protocol.threshold_rule == "conformal" else 1
    n = need
    while share > 0 and (n - round(n * share) < need or round(n * share) < MIN_REFERENCE):
        n += 1
    return n


def _fits(protocol: ProtocolConfig, total: int, heldout_fraction: float, share: float = 0.0) -> ProtocolConfig | None:
    """The protocol scaled to ``total`` images, or None when they are too few."""
    heldout = round(total * heldout_fraction)
    reserve = total - heldout
    if heldout < 1 or reserve < 2:
        return None
    if reserve < protocol.reserve_needed:
        protocol = protocol.model_copy(update={"clean_set_size": reserve - (protocol.calibration_size or 0)})
    size, n_cal = protocol.clean_set_size, protocol.calibration_images
    finetune = size if protocol.calibration_size is not None else size - n_cal
    if size < 2 or finetune < 1 or n_cal < _calibration_needed(protocol, share):
        return None
    return protocol


def _fewest_images(protocol: ProtocolConfig, heldout_fraction: float, share: float = 0.0) -> int:
    """The fewest clean images that serve ``protocol`` and a held-out part (doubling, then
    bisection, then a step back over rounding)."""
    hi = 2
    while _fits(protocol, hi, heldout_fraction, share) is None:
        hi *= 2
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(protocol, mid, heldout_fraction, share) is not None else (mid, hi)
    while hi > 2 and _fits(protocol, hi - 1, heldout_fraction, share) is not None:
        hi -= 1
    return hi


def plan_split(
    total: int, protocol: ProtocolConfig, heldout_fraction: float, source: Path, share: float = 0.0
) -> SplitPlan:
    """Check that ``total`` clean images serve the recipe's protocol and a held-out part (and the
    ``share`` of the calibration images a committee's scales take); the error names the numbers
    and the fewest images that would do."""
    heldout = round(total * heldout_fraction)
    scaled = _fits(protocol, total, heldout_fraction, share)
    if scaled is None:
        reserve = total - heldout
        if protocol.calibration_size is not None:
            cal = f"the recipe's calibration_size {protocol.calibration_size} comes out of them besides D_c"
        else:
            size = max(0, min(protocol.clean_set_size, reserve))
            cal = (
                f"{round(size * protocol.calibration_fraction)} of them would calibrate the threshold "
                f"(calibration_fraction {protocol.calibration_fraction})"
            )
        need = _fewest_images(protocol, heldout_fraction, share)
        why = f" ({share} of them first set the committee's clean scales)" if share else ""
        raise FitError(
            f"--clean {source}: {total} clean images are too few for this recipe: --heldout-fraction "
            f"{heldout_fraction} holds out {heldout}, leaving {reserve} for the defender; {cal}, but its "
            f"{protocol.threshold_rule} threshold at target_fpr {protocol.target_fpr} needs at least "
            f"{_calibration_needed(protocol, share)} calibration images{why} and D_c at least 2. Give at least {need} "
            "clean images"
        )
    notice = None
    if scaled.clean_set_size != protocol.clean_set_size:
        budget = f" + calibration_size {protocol.calibration_size}" if protocol.calibration_size else ""
        notice = (
            f"the recipe's clean_set_size {protocol.clean_set_size}{budget} is more than the {total - heldout} "
            f"images left after holding out {heldout}: using clean_set_size {scaled.clean_set_size}; the "
            f"recipe's figures were measured with {protocol.clean_set_size}"
        )
    return SplitPlan(total, heldout, scaled, notice)


def split_clean(data: ImageData, heldout: int, seed: int) -> tuple[ImageData, ImageData]:
    """(defender's reserve, held-out part) of the user's clean images: a seeded permutation."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.take(order[heldout:]), data.take(order[:heldout])


def augmentation_info(input_shape: Shape, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> DatasetInfo:
    """Facts about the user's data for the finetuning families: the training augmentation of the
    registered dataset with this input shape (digits 16x16: 1 px crop padding; MNIST-like 28x28:
    2 px; CIFAR-10 32x32: 4 px and flips), else H // 8 px crop padding and no flips."""
    like = [dataset_info(n) for n in list_datasets() if tuple(dataset_info(n).input_shape) == tuple(input_shape)]
    pad, flip = (like[0].crop_padding, like[0].horizontal_flip) if like else (max(1, input_shape[1] // 8), False)
    return DatasetInfo("user", tuple(input_shape), num_classes, tuple(mean), tuple(std), pad, flip)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ the fit


@dataclass
class FitJob:
    """Everything ``fit`` checked before any work: what it will fit, on what."""

    recipe_path: Path
    recipe: dict[str, Any]
    family: DetectorFamily
    plan: SplitPlan
    model: Classifier
    architecture: str
    info: DatasetInfo
    reserve: ImageData
    heldout: ImageData
    weights: Path
    clean: Path
    split_seed: int
    heldout_fraction: float
    clean_accuracy: float  # of the model on all of the user's clean images
    domain_warnings: list[str] = field(default_factory=list)
    data_warnings: list[str] = field(default_factory=list)  # what the clean images cannot vouch for


def prepare_fit(
    *,
    recipe_path: Path,
    detector: str | None,
    architecture: str,
    input_shape: Shape,
    num_classes: int,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
    weights: Path,
    clean: Path,
    heldout_fraction: float = 0.2,
    split_seed: int = 0,
) -> FitJob:
    """Read and check every input of ``fit``; raise :class:`FitError` (a ValueError) on the first
    bad one. Costs one forward pass over the clean images, no fitting."""
    if num_classes < 2:
        raise FitError(f"--num-classes {num_classes}: a classifier has at least 2 classes")
    recipe = load_recipe(recipe_path)
    family_name, entry = recipe_entry(recipe, recipe_path, detector)
    params, protocol = recipe_config(entry)
    family = create_detector(family_name, params)
    if not 0 < heldout_fraction < 1:
        raise FitError(f"--heldout-fraction {heldout_fraction}: expected a fraction in (0, 1), e.g. 0.2")
    model = load_model(weights, architecture, input_shape, num_classes, mean, std)
    data = load_clean(clean, input_shape, num_classes)
    data_warnings = check_classes(data, num_classes, clean)
    plan = plan_split(len(data), protocol, heldout_fraction, clean, family.reference_fraction)
    pred = predict_proba(model, data.x).argmax(1)
    accuracy = float((pred == data.y).float().mean())
    _check_learned(accuracy, num_classes, data, model, clean)
    reserve, heldout = split_clean(data, plan.heldout, split_seed)
    _, calibration = plan.protocol.defender_split(reserve)
    correct = int((predict_proba(model, calibration.x).argmax(1) == calibration.y).sum())
    needed = _calibration_needed(plan.protocol, family.reference_fraction)
    if correct < needed:
        raise FitError(
            f"--clean {clean}: the model classifies {correct} of the {len(calibration)} calibration images correctly; "
            f"the threshold at target_fpr {plan.protocol.target_fpr} needs at least {needed} correct ones: give more "
            "clean images"
        )
    norm_mean, norm_std = model.get_buffer("mean").flatten().tolist(), model.get_buffer("std").flatten().tolist()
    return FitJob(
        recipe_path=recipe_path,
        recipe=recipe,
        family=family,
        plan=plan,
        model=model,
        architecture=architecture,
        info=augmentation_info(input_shape, num_classes, norm_mean, norm_std),
        reserve=reserve,
        heldout=heldout,
        weights=weights,
        clean=clean,
        split_seed=split_seed,
        heldout_fraction=heldout_fraction,
        clean_accuracy=accuracy,
        domain_warnings=check_domain(
            recipe,
            architecture=architecture,
            input_shape=input_shape,
            num_classes=num_classes,
            detector=family_name,
        ),
        data_warnings=data_warnings,
    )


def _check_learned(accuracy: float, num_classes: int, data: ImageData, model: Classifier, clean: Path) -> None:
    """A model near chance on the user's own clean images does not fit the data as given."""
    chance = 1.0 / num_classes
    if accuracy > chance + CHANCE_MARGIN:
        return
    data_mean = data.x.mean(dim=(0, 2, 3)).tolist()
    model_mean = model.get_buffer("mean").flatten().tolist()
    raise FitError(
        f"--clean {clean}: the model classifies {accuracy:.1%} of the clean images correctly (chance {chance:.1%}): "
        f"the labels (class order), the normalization (--mean {' '.join(f'{v:.3g}' for v in model_mean)}; the "
        f"images' own mean is {' '.join(f'{v:.3g}' for v in data_mean)}) or the architecture do not match the data"
    )


@dataclass
class FitResult:
    bundle: Path
    metrics: dict[str, float]  # on the held-out clean images (evaluation split), plus costs


def check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an ``--out`` that ``save_bundle`` would refuse."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FitError(f"--out {out} exists and is not a folder; choose a new or empty folder for the bundle")
    if not any(out.iterdir()):
        return
    if not (out / "manifest.json").is_file():
        raise FitError(f"--out {out} exists and is not a detector bundle; choose a new or empty folder")
    if not force:
        raise FitError(f"--out {out} already holds a detector bundle; pass --force to replace it")


def _check_not_degenerate(evaluation: Evaluation, job: FitJob) -> None:
    """Refuse a detector that cannot flag anything: scores on the clean calibration images that
    are all equal or not numbers, or that saturate (so many of them tie at the highest score that
    the threshold sits there, flagging none of them; a bounded score then flags no input at all)."""
    samples = evaluation.samples
    scores = np.asarray(samples["score"], dtype=np.float64)[np.asarray(samples["split"]) == "calibration"]
    finite = scores[np.isfinite(scores)]
    if len(finite) < len(scores):
        what = f"not all finite numbers ({len(scores) - len(finite)} are not)"
    elif len(finite) and float(np.ptp(finite)) == 0.0:
        what = f"all equal ({finite[0]:.6g})"
    elif len(finite) and evaluation.threshold >= finite.max() and (finite == finite.max()).sum() >= 2:
        top = int((finite == finite.max()).sum())
        what = f"saturated: {top} of them tie at the highest score ({finite.max():.6g}), where the threshold sits"
    else:
        return
    raise FitError(
        f"--recipe {job.recipe_path}: detectors.{job.family.name}: these settings give a detector whose scores on the "
        f"{len(scores)} clean calibration images are {what}: it cannot rank inputs and would flag nothing; check the "
        "recipe's defaults (or fit another family with --detector)"
    )


def run_fit(job: FitJob, out: Path, *, force: bool = False) -> FitResult:
    """Fit the recipe's family on the reserve, calibrate, measure on the held-out part and write
    the bundle."""
    device = pick_device()
    info = job.info
    empty = job.reserve.take(slice(0, 0))
    # No search runs here: the selection split is the held-out part too, and nothing is chosen on it.
    splits = Splits(info, train=empty, reserve=job.reserve, selection=job.heldout, evaluation=job.heldout)
    weights_sha = sha256_file(job.weights)
    run = run_detector(
        StageStore(None),
        job.family,
        job.plan.protocol,
        victim_key=weights_sha[:16],
        model=job.model,
        splits=splits,
        attack=create_attack("none", {}, info.input_shape, info.num_classes, 0),
        layout={"fit": "user clean data"},
        device=device,
    )
    _check_not_degenerate(run.evaluation, job)
    metrics = {**run.evaluation.metrics, **run.costs, "heldout_images": float(len(job.heldout))}
    entry = job.recipe["detectors"][job.family.name]
    provenance = {
        "kind": "fit",
        "recipe": str(job.recipe_path),
        "study": job.recipe.get("study"),
        "trial": (entry.get("selection") or {}).get("chosen_trial"),
        "weights": str(job.weights),
        "weights_sha256": weights_sha,
        "clean": str(job.clean),
        "clean_sha256": sha256_file(job.clean) if job.clean.is_file() else None,
        "clean_images": job.plan.total,
        "heldout_images": job.plan.heldout,
        "heldout_fraction": job.heldout_fraction,
        "split_seed": job.split_seed,
        "protocol_notice": job.plan.notice,
        "domain_warnings": job.domain_warnings,
        "data_warnings": job.data_warnings,
        "unchecked": unseen_triggers(job.recipe, job.family.name),
        "stage_keys": run.stage_keys,
        "metrics_protocol": "held-out part of the user's clean images, never used to fit or calibrate; clean "
        "images only (no triggered inputs): FPR and clean accuracy",
    }
    with interrupts_deferred():  # replacing a bundle: all of it or none
        bundle = save_bundle(
            out,
            job.family,
            run.fitted,
            job.model,
            threshold=run.evaluation.threshold,
            target_fpr=job.plan.protocol.target_fpr,
            protocol=job.plan.protocol.model_dump(mode="json"),
            architecture=job.architecture,
            info=info,
            metrics=metrics,
            provenance=provenance,
            reference=run.reference,
            force=force,
        )
    return FitResult(bundle, metrics)


# ------------------------------------------------------------------------------------ reports


def _floats(values: Sequence[float]) -> str:
    return " ".join(f"{v:.4g}" for v in values)


def describe_job(job: FitJob) -> list[str]:
    """What will be fitted, on what: printed before the work starts."""
    p, plan = job.plan.protocol, job.plan
    params = job.family.params.model_dump(mode="json")
    return [
        f"recipe {job.recipe_path} (study {job.recipe.get('study')}): {job.family.name}",
        "  settings: " + ", ".join(f"{k} {v}" for k, v in params.items()),
        f"  protocol: clean_set_size {p.clean_set_size}, calibration {plan.calibration} images, target_fpr "
        f"{p.target_fpr}, threshold_rule {p.threshold_rule}, clean_set_seed {p.clean_set_seed}",
        f"model: {job.architecture}, input {'x'.join(map(str, job.info.input_shape))}, {job.info.num_classes} classes, "
        f"mean {_floats(job.info.mean)}, std {_floats(job.info.std)}; clean accuracy {job.clean_accuracy:.3f} on "
        f"{plan.total} clean images ({job.clean})",
        f"split (seed {job.split_seed}): {plan.heldout} held out (never fitted or calibrated on); of the other "
        f"{plan.reserve}, D_c = {plan.finetune} to fit on + {plan.calibration} to calibrate on"
        + (
            f" ({plan.reserve - p.reserve_needed} unused: a larger --heldout-fraction would measure the FPR on them)"
            if plan.reserve > p.reserve_needed
            else ""
        ),
        *([f"notice: {plan.notice}"] if plan.notice else []),
        unseen_triggers(job.recipe, job.family.name),
    ]


def describe_result(job: FitJob, result: FitResult) -> list[str]:
    m = result.metrics
    target = job.plan.protocol.target_fpr

    def fpr(proto: str) -> str:
        lo, hi = m[f"fpr_at_threshold_low_{proto}"], m[f"fpr_at_threshold_high_{proto}"]
        return f"{m[f'fpr_at_threshold_{proto}']:.3f} (95% CI {lo:.3f}-{hi:.3f})"

    return [
        f"held-out clean images ({len(job.heldout)}, never used to fit or calibrate):",
        f"  realized FPR {fpr('correct_only')} on those the model classifies correctly (what the threshold "
        f"targets), {fpr('all_inputs')} on all; target {target}",
        f"  clean accuracy of the model {m['clean_acc_before']:.3f}, after filtering flagged inputs "
        f"{m['clean_acc_after']:.3f}",
        f"  threshold {m['threshold']:.4g} (flag iff score > threshold); fit {m['fit_seconds']:.1f} s",
        f"detector bundle: {result.bundle}  (serve it: bdx-study detect --detector {result.bundle} --input X.npy)",
    ]
