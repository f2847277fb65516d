"""Detector bundles: an exported BaDExpert detector for one model, and its loader.

A bundle is a folder holding ``model.safetensors``, ``expert.safetensors``,
``auxiliary.safetensors`` and ``manifest.json`` (architecture, input shape, normalization,
classes, score kind, ensemble weights, threshold, target FPR, measured metrics, provenance and
the sha256 of each weight file and of the manifest's decision fields). Weights are safetensors
only: nothing is unpickled. Loading checks every hash and refuses a bundle whose weights or
decision fields were changed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bdx_study._io import sha256_file, sha256_json, write_text_atomic
from bdx_study.archs import create_model
from bdx_study.data import DatasetInfo
from bdx_study.defense import BaDExpert, DefenseConfig

FORMAT = "bdx-study/badexpert-detector"
FORMAT_VERSION = 1
WEIGHT_FILES = {"model": "model.safetensors", "expert": "expert.safetensors", "auxiliary": "auxiliary.safetensors"}
# Manifest fields that decide what the detector does; their hash is checked at load.
DECISION_FIELDS = (
    "architecture",
    "input_shape",
    "normalization",
    "num_classes",
    "defense_config",
    "score_kind",
    "ensemble_alpha",
    "ensemble_beta",
    "threshold",
    "target_fpr",
)


class BundleError(ValueError):
    """A detector bundle that is incomplete, tampered with, or used with the wrong inputs."""


def save_bundle(
    path: str | os.PathLike[str],
    det: BaDExpert,
    *,
    architecture: str,
    info: DatasetInfo,
    metrics: dict[str, float],
    provenance: dict[str, Any],
) -> Path:
    """Write ``det`` as a bundle at ``path``. An existing bundle there is replaced; any other
    existing, non-empty folder is refused (nothing of the user's is deleted)."""
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not _is_bundle(out):
        raise BundleError(f"{out} exists and is not a detector bundle; choose an empty or new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    hashes = {}
    for role, fname in WEIGHT_FILES.items():
        module: nn.Module = getattr(det, role)
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp / fname)
        hashes[fname] = sha256_file(tmp / fname)
    cfg = det.cfg
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "dataset": info.name,
        "input_shape": list(info.input_shape),
        "input_range": [0.0, 1.0],
        "normalization": {"mean": list(info.mean), "std": list(info.std), "applied_inside_model": True},
        "num_classes": info.num_classes,
        "classes": list(range(info.num_classes)),
        "score_kind": cfg.score_kind,
        "ensemble_alpha": cfg.ensemble_alpha,
        "ensemble_beta": cfg.ensemble_beta,
        "score_direction": "higher = more suspicious; flagged iff score > threshold",
        "threshold": det.threshold,
        "target_fpr": cfg.target_fpr,
        "defense_config": cfg.model_dump(mode="json"),
        "metrics": {k: (None if not np.isfinite(v) else float(v)) for k, v in metrics.items()},
        "sha256": hashes,
        "provenance": provenance,
    }
    manifest["decision_sha256"] = sha256_json({k: manifest[k] for k in DECISION_FIELDS})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    tmp.chmod(0o755)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def _is_bundle(folder: Path) -> bool:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def update_provenance(path: Path, **fields: Any) -> None:
    """Add provenance fields (not covered by the hashes: they do not change decisions)."""
    mpath = Path(path) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["provenance"].update(fields)
    write_text_atomic(mpath, json.dumps(manifest, indent=2))


@dataclass
class Detection:
    """Per-input results: M's prediction, the flag and the score (higher = more suspicious)."""

    prediction: np.ndarray
    flagged: np.ndarray
    score: np.ndarray
    expert_conf: np.ndarray
    aux_conf: np.ndarray

    def records(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "prediction": int(p), "flagged": bool(f), "score": float(s)}
            for i, (p, f, s) in enumerate(zip(self.prediction, self.flagged, self.score, strict=True))
        ]


class Detector:
    """A loaded bundle. ``Detector.load(path)`` verifies hashes; ``detect(x)`` serves inputs."""

    def __init__(self, manifest: dict[str, Any], badexpert: BaDExpert, device: torch.device) -> None:
        self.manifest = manifest
        self.badexpert = badexpert
        self.device = device

    @property
    def threshold(self) -> float:
        return self.badexpert.threshold

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.manifest["input_shape"]
        return int(c), int(h), int(w)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Detector:
        root = Path(path)
        mpath = root / "manifest.json"
        if not mpath.is_file():
            raise BundleError(f"{root}: no manifest.json; not a detector bundle")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
        try:
            decision = sha256_json({k: manifest[k] for k in DECISION_FIELDS})
        except KeyError as e:
            raise BundleError(f"{mpath}: missing field {e}") from None
        if decision != manifest.get("decision_sha256"):
            raise BundleError(
                f"{mpath}: decision fields (threshold, score, architecture, ...) do not match their "
                "sha256; the manifest was modified, refusing it"
            )
        expected = manifest.get("sha256", {})
        models: dict[str, nn.Module] = {}
        dev = torch.device(device)
        for role, fname in WEIGHT_FILES.items():
            f = root / fname
            if not f.is_file():
                raise BundleError(f"{root}: missing {fname}")
            if fname not in expected or sha256_file(f) != expected[fname]:
                raise BundleError(f"{f}: sha256 does not match the manifest; the bundle was modified, refusing it")
            m = create_model(
                manifest["architecture"],
                tuple(manifest["input_shape"]),
                manifest["num_classes"],
                manifest["normalization"]["mean"],
                manifest["normalization"]["std"],
            )
            m.load_state_dict(load_file(f, device=str(dev)))
            models[role] = m.to(dev).eval()
        cfg = DefenseConfig.model_validate(manifest["defense_config"])
        det = BaDExpert(models["model"], models["expert"], models["auxiliary"], cfg, float(manifest["threshold"]))
        return cls(manifest, det, dev)

    def _as_batch(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        c, h, w = self.input_shape
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        t = t.float()
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

    @torch.no_grad()
    def detect(self, x: np.ndarray | torch.Tensor) -> Detection:
        """Score a batch of pixel-space inputs (N, C, H, W) in [0, 1] (uint8 0-255 also accepted)."""
        t = self._as_batch(x)
        conf = self.badexpert.confidences(t, self.device)
        s = self.badexpert.scores(conf)
        return Detection(
            conf.pred.numpy(), (s > self.threshold).numpy(), s.numpy(), conf.expert_conf.numpy(), conf.aux_conf.numpy()
        )
