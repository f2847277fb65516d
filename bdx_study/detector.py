"""Detector bundles: an exported detector of any registered family for one model, and its loader.

A bundle is a folder holding ``model.safetensors`` (the served model M), one
``<component>.safetensors`` per fitted component of the family (BaDExpert: ``expert`` and
``auxiliary``; a committee: each member's, e.g. ``ted.main``), ``reference.safetensors`` for a
family scored against a clean reference (a committee's member scales), and ``manifest.json``:
the family and its exact parameters, the protocol settings, architecture, input shape,
normalization, classes, threshold, target FPR, measured metrics, provenance, the sha256 of each
weight file and a sha256 over the fields that decide what the detector does. Weights are
safetensors only: nothing is unpickled. Loading checks every hash and refuses a bundle whose
weights or decision fields were changed, or whose family this
installation does not know.
"""

from __future__ import annotations

import glob
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from bdx_study._io import atomic_dir, atomic_path, sha256_file, sha256_json, special_kind, write_json_atomic
from bdx_study.archs import create_model
from bdx_study.data import DatasetInfo
from bdx_study.detectors import DETECTORS, DetectorFamily, Fitted, create_detector
from bdx_study.detectors._activations import ACTIVATION_BATCH, model_pass
from bdx_study.training import PREDICT_BATCH

FORMAT = "bdx-study/detector"
FORMAT_VERSION = 2
MODEL_FILE = "model.safetensors"
REFERENCE_FILE = "reference.safetensors"  # a committee's clean scales (the members' reference scores)
NONFINITE = "score_not_finite"  # extras: inputs flagged because their score is NaN or infinite
FLAGGED_BY = "flagged_by_"  # extras naming what flagged an input: flagged_by_<member> (a committee)
# Manifest fields that decide what the detector does; their hash is checked at load.
DECISION_FIELDS = (
    "format_version",
    "detector",
    "params",
    "architecture",
    "input_shape",
    "normalization",
    "num_classes",
    "threshold",
    "target_fpr",
    "components",
)


class BundleError(ValueError):
    """A detector bundle that is incomplete, tampered with, or used with the wrong inputs."""


class InputError(ValueError):
    """An input file ``detect`` cannot use; the message names it and says what is expected."""


NPY_MAGIC = b"\x93NUMPY"
PIXEL_KINDS = "uif"  # unsigned and signed integers, floats


def load_input_array(path: str | os.PathLike[str]) -> np.ndarray:
    """Open a ``.npy`` file of inputs without trusting it: never unpickled, never an ``.npz``
    or other format, numeric pixels only, and a header whose shape the file's size confirms
    (so a forged header cannot make us allocate memory it does not back). The array is
    memory-mapped: callers read it in chunks."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: a folder; --input takes one .npy file")
    kind = special_kind(p)
    if kind is not None:
        raise InputError(f"{p}: {kind}, not a regular file; --input takes one .npy file")
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(len(NPY_MAGIC))
        if size == 0:
            raise InputError(f"{p}: an empty file, not a .npy array")
        if head.startswith(b"PK"):
            raise InputError(f"{p}: a zip archive (.npz); save one array with numpy.save to a .npy file")
        if head != NPY_MAGIC:
            raise InputError(f"{p}: not a .npy file (numpy.save format)")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError) as e:
            raise InputError(f"{p}: a damaged .npy header ({e})") from None
        offset = f.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in PIXEL_KINDS:
        raise InputError(f"{p}: dtype {dtype} is not numeric pixels; expected uint8 (0-255) or float (0-1)")
    if len(shape) == 0:
        raise InputError(f"{p}: a single value (shape ()), not an array of inputs; --input takes (N, C, H, W) images")
    expected = math.prod(shape) * dtype.itemsize
    if expected != size - offset:
        raise InputError(
            f"{p}: the header claims shape {tuple(shape)} ({expected} bytes) but the file holds {size - offset} bytes"
        )
    return np.load(p, mmap_mode="r" if expected else None, allow_pickle=False)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_bundle(
    path: str | os.PathLike[str],
    family: DetectorFamily,
    fitted: dict[str, Fitted],
    model: nn.Module,
    *,
    threshold: float,
    target_fpr: float,
    protocol: dict[str, Any],
    architecture: str,
    info: DatasetInfo,
    metrics: dict[str, float],
    provenance: dict[str, Any],
    reference: Fitted | None = None,
    force: bool = False,
) -> Path:
    """Write a fitted family as a bundle at ``path``: a new or empty folder, or (with ``force``)
    a folder holding a bundle, whose own files are then replaced. Files the bundle does not own
    (a user's notes, inputs) are never touched."""
    out = Path(path)
    if not math.isfinite(threshold):
        raise BundleError(f"threshold {threshold!r} is not a finite number: a bundle must flag something")
    replace = check_bundle_target(out, force)
    if not replace and out.is_dir():
        out.rmdir()  # empty: the new bundle's folder is renamed into its place
    files, components = _bundle_files(family, fitted, model, reference)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "detector": family.name,
        "params": family.params.model_dump(mode="json"),
        "protocol": protocol,
        "architecture": architecture,
        "dataset": info.name,
        "input_shape": list(info.input_shape),
        "input_range": [0.0, 1.0],
        "normalization": {"mean": list(info.mean), "std": list(info.std), "applied_inside_model": True},
        "num_classes": info.num_classes,
        "classes": list(range(info.num_classes)),
        "score_direction": "higher = more suspicious; flagged iff score > threshold",
        "threshold": threshold,
        "target_fpr": target_fpr,
        "components": components,
        **({"reference": {"file": REFERENCE_FILE, "meta": reference.meta}} if reference is not None else {}),
        "metrics": {k: (None if not np.isfinite(v) else float(v)) for k, v in metrics.items()},
        "sha256": {},
        "provenance": provenance,
    }
    if not replace:  # a new folder appears whole or not at all
        with atomic_dir(out) as tmp:
            _write_files(tmp, files, manifest)
        if not (out / "manifest.json").is_file():
            raise BundleError(f"{out} appeared while the bundle was written; nothing was changed there")
        return out
    _replace_files(out, files, manifest)
    return out


def _bundle_files(
    family: DetectorFamily, fitted: dict[str, Fitted], model: nn.Module, reference: Fitted | None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """(the tensors of each file of the bundle, the manifest's component entries)."""
    files: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: _state(model)}
    components = {}
    for name, state in fitted.items():
        files[f"{name}.safetensors"] = {k: v.detach().cpu().contiguous() for k, v in state.tensors.items()}
        components[name] = {"file": f"{name}.safetensors", "meta": state.meta}
    if reference is not None:
        if REFERENCE_FILE in files:
            raise BundleError(f"a component's file is named {REFERENCE_FILE}, the clean reference's")
        files[REFERENCE_FILE] = {k: v.detach().cpu().contiguous() for k, v in reference.tensors.items()}
    elif family.reference_fraction > 0:
        raise BundleError(f"{family.name} scores against a clean reference, and none was given to save")
    return files, components


REPLACING = ".replacing.json"  # names the files a replace in progress writes (its orphans if it dies)


def _replace_files(out: Path, files: dict[str, dict[str, torch.Tensor]], manifest: dict[str, Any]) -> None:
    """Replace the bundle in ``out`` so that, killed at any point, the folder holds the old
    bundle or the new one, whole. The new files take names of their own (none is written over a
    file the old manifest names); writing the manifest is the one step that switches; the old
    files go after it. A replace that died leaves its files named in :data:`REPLACING`, and the
    next replace removes those the manifest in place does not own."""
    _remove_orphans(out)
    tag = uuid.uuid4().hex[:8]
    renamed = {fname: f"{Path(fname).stem}.{tag}{Path(fname).suffix}" for fname in files}
    old_own = _own_files(out)
    write_json_atomic(out / REPLACING, sorted(old_own - {"manifest.json"} | set(renamed.values())))
    for entry in [*manifest["components"].values(), *([manifest["reference"]] if "reference" in manifest else [])]:
        entry["file"] = renamed[entry["file"]]
    manifest["model_file"] = renamed[MODEL_FILE]
    _write_files(out, {renamed[f]: t for f, t in files.items()}, manifest)  # the manifest last: the switch
    for stale in old_own - {"manifest.json", *manifest["sha256"]}:
        (out / stale).unlink(missing_ok=True)
    (out / REPLACING).unlink(missing_ok=True)


def _remove_orphans(out: Path) -> None:
    """Remove what a replace that died left: the files it named that the manifest in place does
    not own (the old bundle's or the new one's), and the temporary files of its atomic writes."""
    try:
        named = json.loads((out / REPLACING).read_text())
    except (OSError, ValueError):
        named = []
    named = [f for f in named if _plain_name(f)] if isinstance(named, list) else []
    owned = _own_files(out)
    for fname in named:
        if fname not in owned:
            (out / fname).unlink(missing_ok=True)
    for fname in {*named, "manifest.json", REPLACING}:  # atomic_path's temporaries: .<name>.<random>.tmp
        for tmp in out.glob(f".{glob.escape(fname)}.*.tmp"):
            tmp.unlink(missing_ok=True)
    (out / REPLACING).unlink(missing_ok=True)


def _write_files(folder: Path, files: dict[str, dict[str, torch.Tensor]], manifest: dict[str, Any]) -> None:
    for fname, tensors in files.items():
        with atomic_path(folder / fname) as tmp:
            save_file(tensors, tmp)
        manifest["sha256"][fname] = sha256_file(folder / fname)
    manifest["decision_sha256"] = sha256_json(_decision(manifest))
    write_json_atomic(folder / "manifest.json", manifest)


def _decision(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields whose hash the manifest carries: :data:`DECISION_FIELDS`, the clean reference
    of a family scored against one, and the model's file of a replaced bundle (KeyError names a
    missing field)."""
    fields = (*DECISION_FIELDS, *(k for k in OPTIONAL_DECISION_FIELDS if k in manifest))
    return {k: manifest[k] for k in fields}


OPTIONAL_DECISION_FIELDS = ("reference", "model_file")


REFERENCE = "reference"  # the manifest key of a family's clean reference (beside "components")


def _entries(manifest: dict[str, Any], mpath: Path) -> dict[str, dict[str, Any]]:
    """The manifest's component entries, and its clean reference under :data:`REFERENCE`; each a
    mapping with a plain file name inside the bundle (no folder, no '..') and a mapping of
    metadata. Anything else is refused, naming it."""
    comps = manifest.get("components")
    if not isinstance(comps, dict) or not comps:
        raise BundleError(f"{mpath}: components must be a non-empty mapping, got {type(comps).__name__}")
    found = dict(comps)
    if manifest.get(REFERENCE) is not None:
        found[REFERENCE] = manifest[REFERENCE]
    for key, entry in found.items():
        fname = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("meta", {}), dict | None):
            raise BundleError(f"{mpath}: {key}: an entry must be a mapping with `file` and `meta`")
        if not _plain_name(fname):
            raise BundleError(f"{mpath}: {key}: file {fname!r} is not a plain file name inside the bundle; refusing it")
    return found


class _Normalization(BaseModel):
    model_config = ConfigDict(extra="allow")
    mean: list[float]
    std: list[float]


class _Manifest(BaseModel):
    """The types of the manifest fields a bundle is loaded from (their meaning is checked after)."""

    model_config = ConfigDict(extra="allow")
    detector: str
    params: dict[str, Any]
    architecture: str
    input_shape: list[int]
    num_classes: int
    normalization: _Normalization
    threshold: float
    target_fpr: float | None = None
    components: dict[str, Any]
    reference: dict[str, Any] | None = None
    model_file: str | None = None
    sha256: dict[str, str]


def _one_line(e: Exception) -> str:
    """An exception as one line: a pydantic error as its first problem with its field."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            more = len(errors()) - 1
            return f"{where}: {first['msg']} (got {first.get('input')!r:.80})" + (f" (and {more} more)" if more else "")
        except (TypeError, IndexError, KeyError):
            pass
    return f"{type(e).__name__}: " + " ".join(str(e).split())


def _model_file(manifest: dict[str, Any], mpath: Path) -> str:
    """The file holding M's weights: ``model_file`` (a replaced bundle's own name) or the default."""
    fname = manifest.get("model_file", MODEL_FILE)
    if not _plain_name(fname):
        raise BundleError(f"{mpath}: model_file {fname!r} is not a plain file name inside the bundle; refusing it")
    return str(fname)


def _plain_name(fname: Any) -> bool:
    return isinstance(fname, str) and Path(fname).name == fname and fname not in ("", ".", "..") and "\\" not in fname


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    if special_kind(folder / "manifest.json") is not None:  # a FIFO would block the read forever
        return None
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _own_files(folder: Path) -> set[str]:
    manifest = _read_manifest(folder) or {}
    return {"manifest.json", *(manifest.get("sha256") or {})}


def check_bundle_target(out: Path, force: bool) -> bool:
    """The one write guard of a bundle folder: whether ``out`` holds a bundle to replace (False:
    it does not exist, or is an empty folder); refuse anything else, and a bundle without
    ``force``. Writes nothing: ``fit`` asks before any work, :func:`save_bundle` before writing."""
    if not out.exists():
        parent = out.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise BundleError(f"{out} cannot be created: {parent} is a file, not a folder; choose another place")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise BundleError(f"{out} cannot be created: {parent} is not writable; choose a folder you can write to")
        return False
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; choose a new or empty folder for the bundle")
    if not any(out.iterdir()):
        return False
    if _read_manifest(out) is None:
        raise BundleError(f"{out} exists and is not a detector bundle; choose a new or empty folder")
    if not force:
        raise BundleError(f"{out} already holds a detector bundle; pass --force to replace it")
    return True


def update_provenance(path: Path, **fields: Any) -> None:
    """Add provenance fields (not covered by the hashes: they do not change decisions)."""
    mpath = Path(path) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["provenance"].update(fields)
    write_json_atomic(mpath, manifest)


@dataclass
class Detection:
    """Per-input results: M's prediction, the flag, the score (higher = more suspicious) and the
    family's extra values (e.g. BaDExpert's ``expert_conf`` and ``aux_conf``)."""

    prediction: np.ndarray
    flagged: np.ndarray
    score: np.ndarray
    extras: dict[str, np.ndarray]

    @property
    def flagged_by(self) -> list[list[str]] | None:
        """Per input, which parts of the detector flag it on their own (a committee: its
        members, from the extras ``flagged_by_<member>``); None for a family without parts."""
        cols = {k.removeprefix(FLAGGED_BY): v for k, v in self.extras.items() if k.startswith(FLAGGED_BY)}
        if not cols:
            return None
        return [[m for m, v in cols.items() if bool(v[i])] for i in range(len(self.score))]

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"index": i, "prediction": int(p), "flagged": bool(f), "score": float(s)}
            for i, (p, f, s) in enumerate(zip(self.prediction, self.flagged, self.score, strict=True))
        ]
        by = self.flagged_by
        if by is not None:
            for r, members in zip(out, by, strict=True):
                r["flagged_by"] = members
        for i in np.flatnonzero(self.extras.get(NONFINITE, np.zeros(0, dtype=bool))):
            out[i]["note"] = "flagged: the score is not a finite number (fail closed)"
        return out


class Detector:
    """A loaded bundle. ``Detector.load(path)`` verifies hashes; ``detect(x)`` serves inputs."""

    def __init__(
        self,
        manifest: dict[str, Any],
        family: DetectorFamily,
        model: nn.Module,
        fitted: dict[str, Fitted],
        device: torch.device,
    ) -> None:
        self.manifest = manifest
        self.family = family
        self.model = model
        self.fitted = fitted
        self.device = device

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["input_shape"]
        return int(c), int(h), int(w)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Detector:
        """Load the bundle at ``path`` onto ``device``: the manifest checked (format, version,
        decision hash, types, a known family, a finite threshold), then every file it names
        (plain names, no links, hashes) before any is read, then the model and components."""
        root = Path(path)
        mpath = root / "manifest.json"
        manifest = _checked_manifest(root, mpath)
        entries = _entries(manifest, mpath)
        _check_threshold(manifest["threshold"], mpath)
        model_file = _model_file(manifest, mpath)
        expected = manifest.get("sha256", {})
        paths = {f: _verified(root, f, expected) for f in [model_file, *(e["file"] for e in entries.values())]}
        dev = torch.device(device)
        name = manifest["detector"]
        try:
            family = create_detector(name, manifest["params"])
            model = create_model(
                manifest["architecture"],
                tuple(manifest["input_shape"]),
                manifest["num_classes"],
                manifest["normalization"]["mean"],
                manifest["normalization"]["std"],
            )
            model.load_state_dict(_tensors(paths[model_file], dev))
            fitted = {
                comp: Fitted(_tensors(paths[entry["file"]], dev), dict(entry.get("meta") or {}))
                for comp, entry in entries.items()
                if comp != REFERENCE
            }
            family = _with_reference(family, entries, paths, dev, mpath)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{mpath}: the bundle does not load ({_one_line(e)})") from None
        if set(fitted) != set(family.fitted_components()):
            raise BundleError(
                f"{mpath}: components {sorted(fitted)} do not match {name}'s {list(family.fitted_components())}"
            )
        return cls(manifest, family, model.to(dev).eval(), fitted, dev)

    def _as_batch(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            if x.dtype.is_complex or x.dtype == torch.bool:
                raise BundleError(f"inputs of dtype {x.dtype} are not numeric pixels; expected uint8 or float")
            t = x.detach().cpu()
            t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        else:
            a = np.asarray(x)
            if a.dtype.kind not in PIXEL_KINDS:
                raise BundleError(f"inputs of dtype {a.dtype} are not numeric pixels; expected uint8 or float")
            with np.errstate(over="ignore"):  # out-of-range values become inf and are refused below
                t = torch.from_numpy(a.astype(np.float32))  # a native-order copy
            if a.dtype == np.uint8:
                t = t / 255.0
        c, h, w = self.input_shape
        if t.dim() == 3 and tuple(t.shape) == (c, h, w):
            t = t.unsqueeze(0)
        elif t.dim() == 3 and c == 1 and tuple(t.shape[1:]) == (h, w):
            t = t.unsqueeze(1)
        if t.dim() != 4 or tuple(t.shape[1:]) != (c, h, w):
            raise BundleError(
                f"inputs of shape {tuple(t.shape)} do not fit this detector: expected (N, {c}, {h}, {w})"
                + (f" or (N, {h}, {w})" if c == 1 else "")
            )
        if not bool(torch.isfinite(t).all()):
            raise BundleError("inputs contain NaN or infinite values; expected pixels in [0, 1]")
        if t.numel() and (float(t.min()) < -1e-6 or float(t.max()) > 1 + 1e-6):
            raise BundleError(
                f"input values span [{float(t.min()):.3g}, {float(t.max()):.3g}]; expected pixels in [0, 1] "
                "(or uint8 0-255)"
            )
        return t

    def detect(self, x: np.ndarray | torch.Tensor) -> Detection:
        """Score a batch of pixel-space inputs (N, C, H, W) in [0, 1] (uint8 0-255 also accepted).

        M runs once per input: components that read its layer activations (TED, alone or in a
        committee) get them from the same forward pass as the prediction, batch by batch."""
        t = self._as_batch(x)
        shared = [c for c in self.fitted if self.family.stage_of(c)[0].uses_activations]
        step = ACTIVATION_BATCH if shared else PREDICT_BATCH
        preds, chunks = [], []
        for i in range(0, max(len(t), 1), step):
            batch = t[i : i + step]
            with model_pass(self.model, batch, self.device, activations=bool(shared)) as probs:
                p = probs.argmax(1)
                feats_now: dict[str, torch.Tensor] = {}
                for c in shared:
                    feats_now.update(self.family.features(c, self.fitted[c], self.model, batch, p, self.device))
            preds.append(p)
            chunks.append(feats_now)
        pred = torch.cat(preds)
        feats: dict[str, torch.Tensor] = {k: torch.cat([ch[k] for ch in chunks]) for k in chunks[0]}
        for comp, state in self.fitted.items():
            if comp not in shared:
                feats.update(self.family.features(comp, state, self.model, t, pred, self.device))
        s = self.family.score(feats, pred)
        extras = {k: v.numpy() for k, v in self.family.extras(feats, pred).items()}
        extras.update(self.family.flagged_by(extras, self.threshold))
        broken = ~torch.isfinite(s)  # fail closed: an input the detector cannot score is flagged, and says why
        if bool(broken.any()):
            extras[NONFINITE] = broken.numpy()
        return Detection(pred.numpy(), ((s > self.threshold) | broken).numpy(), s.numpy(), extras)


def _checked_manifest(root: Path, mpath: Path) -> dict[str, Any]:
    """The bundle's manifest, refused unless it is readable JSON of this format and version, its
    decision fields match their hash, its fields have the types read below, and its family is
    known to this installation."""
    written = "a detector bundle is a folder written by `bdx-study export` or `bdx-study fit`"
    if not root.exists():
        raise BundleError(f"{root}: no such folder; {written}")
    if not root.is_dir():
        raise BundleError(f"{root}: {special_kind(root) or 'a file'}, not a folder; {written}")
    kind = special_kind(mpath)
    if kind is not None or mpath.is_dir():
        raise BundleError(f"{mpath}: {kind or 'a folder'}, not a regular file; refusing the bundle")
    if not mpath.is_file():
        raise BundleError(f"{root}: no manifest.json; not a detector bundle ({written})")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: not readable JSON ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: a manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT and manifest.get("format") != "bdx-study/badexpert-detector":
        raise BundleError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{mpath}: bundle format version {manifest.get('format_version')!r}; this bdx-study reads version "
            f"{FORMAT_VERSION}: export the detector again"
        )
    try:
        decision = sha256_json(_decision(manifest))
    except KeyError as e:
        raise BundleError(f"{mpath}: missing field {e}") from None
    if decision != manifest.get("decision_sha256"):
        raise BundleError(
            f"{mpath}: decision fields (threshold, params, architecture, ...) do not match their "
            "sha256; the manifest was modified, refusing it"
        )
    try:  # the types of what is read below (hashes vouch for nothing: anyone can recompute them)
        _Manifest.model_validate_json(json.dumps(manifest), strict=True)
    except ValidationError as e:
        raise BundleError(f"{mpath}: {_one_line(e)}; refusing the bundle") from None
    if manifest["detector"] not in DETECTORS:
        from bdx_study.plugins import load_entry_points

        load_entry_points()  # an installed plugin's family
    if manifest["detector"] not in DETECTORS:
        raise BundleError(
            f"{mpath}: detector family {manifest['detector']!r} is not known to this installation; known: "
            f"{', '.join(DETECTORS.names())} (a family of your own: import the module that registers it first, "
            "`detect --plugins MODULE` on the command line)"
        )
    return manifest


def _check_threshold(threshold: Any, mpath: Path) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise BundleError(f"{mpath}: threshold {threshold!r} is not a finite number; refusing the bundle")


def _verified(root: Path, fname: str, expected: Any) -> Path:
    """A file the manifest names: the bundle's own (no link), present, and matching its hash."""
    f = root / fname
    if f.is_symlink():
        raise BundleError(f"{f}: a symbolic link; a bundle's files must be its own, refusing it")
    if not f.is_file():
        raise BundleError(f"{root}: missing {fname}")
    if not isinstance(expected, dict) or fname not in expected or sha256_file(f) != expected[fname]:
        raise BundleError(f"{f}: sha256 does not match the manifest; the bundle was modified, refusing it")
    return f


def _tensors(path: Path, dev: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of one verified safetensors file, refused if unreadable or not finite."""
    try:
        state = load_file(path, device=str(dev))
    except Exception as e:  # safetensors' own error type for a malformed header or body
        why = f"{type(e).__name__}: {e}"
        raise BundleError(f"{path}: not a readable safetensors file ({' '.join(why.split())})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise BundleError(f"{path}: non-finite values in {bad[:3]}; refusing the bundle")
    return state


def _with_reference(
    family: DetectorFamily, entries: dict[str, dict[str, Any]], paths: dict[str, Path], dev: torch.device, mpath: Path
) -> DetectorFamily:
    """``family`` scored against the bundle's clean reference, when it has one (a committee)."""
    if REFERENCE in entries:
        entry = entries[REFERENCE]
        return family.with_reference(Fitted(_tensors(paths[entry["file"]], dev), dict(entry.get("meta") or {})))
    if family.reference_fraction > 0:
        raise BundleError(f"{mpath}: {family.name} scores against a clean reference, and the bundle holds none")
    return family
