"""Detector bundles: save, load, serve the same scores; refuse tampered bundles and wrong inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bdx_study
from bdx_study.archs import create_model
from bdx_study.data import dataset_info
from bdx_study.detector import FORMAT, BundleError, Detector, save_bundle
from bdx_study.detectors import DetectorFamily, Fitted, create_detector
from bdx_study.detectors.badexpert import badexpert_score
from bdx_study.training import predict_proba

INFO = dataset_info("digits")
WEIGHT_FILES = ("model.safetensors", "expert.safetensors", "auxiliary.safetensors")


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = create_model("small_cnn", INFO.input_shape, INFO.num_classes, INFO.mean, INFO.std)
    # non-trivial BatchNorm statistics, so that buffers have to round-trip too
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _inputs(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *INFO.input_shape, generator=torch.Generator().manual_seed(seed))


def _fitted(*seeds: int) -> dict[str, Fitted]:
    return {
        name: Fitted(dict(_net(s).state_dict()), {"seed": s})
        for name, s in zip(("expert", "auxiliary"), seeds, strict=True)
    }


def _save(path: Path, family: DetectorFamily, threshold: float, **kw: object) -> Path:
    return save_bundle(
        path,
        family,
        _fitted(1, 2),
        _net(0),
        threshold=threshold,
        target_fpr=0.05,
        protocol={"clean_set_size": 100, "calibration_fraction": 0.5, "target_fpr": 0.05},
        architecture="small_cnn",
        info=INFO,
        metrics={"auroc_correct_only": 0.9, "attack_success_after": float("nan")},
        provenance={"test": True},
        **kw,  # type: ignore[arg-type]
    )


def _reference_scores(x: torch.Tensor, kind: str = "ensemble", alpha: float = 2.5, beta: float = 0.4) -> torch.Tensor:
    """BaDExpert's score computed by hand from the three networks."""
    pred = predict_proba(_net(0), x).argmax(1)
    b = predict_proba(_net(1), x).gather(1, pred[:, None]).squeeze(1)
    m = predict_proba(_net(2), x).gather(1, pred[:, None]).squeeze(1)
    return badexpert_score(b, m, kind, alpha, beta)  # type: ignore[arg-type]


@pytest.fixture()
def family() -> DetectorFamily:
    return create_detector("badexpert", {"ensemble_alpha": 2.5, "ensemble_beta": 0.4})


@pytest.fixture()
def threshold() -> float:
    return float(torch.quantile(_reference_scores(_inputs(40, seed=9)).double(), 0.5))  # flags about half


@pytest.fixture()
def bundle(tmp_path: Path, family: DetectorFamily, threshold: float) -> Path:
    return _save(tmp_path / "bundle", family, threshold)


def test_bundle_layout_and_manifest(bundle: Path, threshold: float) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*WEIGHT_FILES, "manifest.json"])
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["format"] == FORMAT and man["format_version"] == 2
    assert man["detector"] == "badexpert"
    assert man["params"]["ensemble_alpha"] == 2.5 and man["params"]["ensemble_beta"] == 0.4
    assert man["architecture"] == "small_cnn"
    assert man["input_shape"] == [1, 16, 16]
    assert man["num_classes"] == 10
    assert man["threshold"] == threshold
    assert man["components"]["expert"] == {"file": "expert.safetensors", "meta": {"seed": 1}}
    assert man["metrics"] == {"auroc_correct_only": 0.9, "attack_success_after": None}
    assert set(man["sha256"]) == set(WEIGHT_FILES)


def test_detect_matches_badexpert(bundle: Path, threshold: float) -> None:
    loaded = bdx_study.Detector.load(bundle)
    assert loaded.threshold == threshold
    assert loaded.input_shape == (1, 16, 16)
    x = _inputs()
    out = loaded.detect(x)
    scores = _reference_scores(x)
    np.testing.assert_array_equal(out.prediction, predict_proba(_net(0), x).argmax(1).numpy())
    np.testing.assert_array_equal(out.score, scores.numpy())
    np.testing.assert_array_equal(out.flagged, (scores > threshold).numpy())
    assert set(out.extras) == {"expert_conf", "aux_conf"}
    assert 0 < out.flagged.sum() < len(x)  # both outcomes occur
    # numpy input and a single (C, H, W) image give the same results
    np.testing.assert_array_equal(loaded.detect(x.numpy()).score, out.score)
    np.testing.assert_array_equal(loaded.detect(x[3]).score, out.score[3:4])
    # (N, H, W) for one-channel inputs
    np.testing.assert_array_equal(loaded.detect(x[:, 0]).score, out.score)
    recs = out.records()
    assert len(recs) == len(x) and recs[0]["index"] == 0
    assert recs[5]["score"] == pytest.approx(float(out.score[5]))


@pytest.mark.parametrize("kind", ["expert", "auxiliary"])
def test_detect_other_score_kinds(tmp_path: Path, kind: str) -> None:
    path = _save(tmp_path / "b", create_detector("badexpert", {"score_kind": kind}), 0.0)
    x = _inputs()
    np.testing.assert_array_equal(Detector.load(path).detect(x).score, _reference_scores(x, kind, 2.0, 0.5).numpy())


def test_replacing_a_bundle_needs_force_and_keeps_user_files(
    tmp_path: Path, family: DetectorFamily, bundle: Path
) -> None:
    (bundle / "notes.txt").write_text("mine")
    (bundle / "inputs").mkdir()
    (bundle / "inputs" / "good.npy").write_bytes(b"data")
    with pytest.raises(BundleError, match="--force"):
        _save(bundle, family, 123.0)
    assert Detector.load(bundle).threshold != 123.0
    _save(bundle, family, 123.0, force=True)
    assert Detector.load(bundle).threshold == 123.0
    assert (bundle / "notes.txt").read_text() == "mine"  # nothing of the user's is deleted
    assert (bundle / "inputs" / "good.npy").read_bytes() == b"data"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_threshold_refused(tmp_path: Path, family: DetectorFamily, bad: float) -> None:
    """A NaN threshold flags nothing (every comparison is false): refused when written and when read."""
    with pytest.raises(BundleError, match="threshold .* finite"):
        _save(tmp_path / "b", family, bad)
    path = _save(tmp_path / "c", family, 0.5)
    _rewrite(path, threshold=bad)
    with pytest.raises(BundleError, match="threshold .* not a finite number"):
        Detector.load(path)


def _rewrite(bundle: Path, **fields: object) -> None:
    """Change manifest fields and re-sign it as a forger would: the hashes only show corruption."""
    from bdx_study._io import sha256_json
    from bdx_study.detector import _decision

    mpath = bundle / "manifest.json"
    man = json.loads(mpath.read_text())
    man.update(fields)
    man["decision_sha256"] = sha256_json(_decision(man))
    mpath.write_text(json.dumps(man))


def _rehash(bundle: Path, fname: str) -> None:
    from bdx_study._io import sha256_file

    man = json.loads((bundle / "manifest.json").read_text())
    _rewrite(bundle, sha256={**man["sha256"], fname: sha256_file(bundle / fname)})


@pytest.mark.parametrize("where", ["../outside.safetensors", "/etc/passwd", "sub/expert.safetensors", ".."])
def test_files_outside_the_bundle_refused_before_reading(bundle: Path, where: str) -> None:
    man = json.loads((bundle / "manifest.json").read_text())
    (bundle / "model.safetensors").write_bytes(b"corrupt")  # would fail if anything were read first
    _rewrite(bundle, components={**man["components"], "expert": {"file": where, "meta": {}}})
    with pytest.raises(BundleError, match="not a plain file name inside the bundle"):
        Detector.load(bundle)


def test_symlinked_file_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((bundle / "expert.safetensors").read_bytes())
    (bundle / "expert.safetensors").unlink()
    (bundle / "expert.safetensors").symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link"):
        Detector.load(bundle)


def test_consistent_bundles_with_bad_contents_refused(bundle: Path) -> None:
    """What re-signed hashes cannot vouch for: a malformed safetensors header, non-finite weights,
    entries of the wrong type: one clear error each."""
    (bundle / "expert.safetensors").write_bytes(b"\xff" * 8 + b"{not json")
    _rehash(bundle, "expert.safetensors")
    with pytest.raises(BundleError, match="expert.safetensors: not a readable safetensors file"):
        Detector.load(bundle)
    from safetensors.torch import save_file

    key = next(k for k, v in _net(1).state_dict().items() if v.is_floating_point())
    state = {k: v.clone() for k, v in _net(1).state_dict().items()}
    state[key][..., 0] = float("inf")
    save_file(state, bundle / "expert.safetensors")
    _rehash(bundle, "expert.safetensors")
    with pytest.raises(BundleError, match="non-finite values"):
        Detector.load(bundle)
    for bad in ([1, 2], {}, {"expert": "expert.safetensors"}, {"expert": {"file": 3}}):
        _rewrite(bundle, components=bad)
        with pytest.raises(BundleError, match="components|an entry must be|not a plain file name"):
            Detector.load(bundle)


def test_a_score_that_is_not_finite_fails_closed(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    det = Detector.load(bundle)
    real = det.family.score

    def broken(feats: dict[str, torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
        s = real(feats, pred).clone()
        s[:2] = float("nan")
        return s

    monkeypatch.setattr(det.family, "score", broken)
    out = det.detect(_inputs())
    assert out.flagged[:2].all()  # flagged, never served as clean
    records = out.records()
    assert records[0]["note"].startswith("flagged: the score is not a finite number")
    assert "note" not in records[5]


def test_unknown_family_refused(bundle: Path) -> None:
    from bdx_study._io import sha256_json
    from bdx_study.detector import DECISION_FIELDS

    mpath = bundle / "manifest.json"
    man = json.loads(mpath.read_text())
    man["detector"] = "no_such_family"
    man["decision_sha256"] = sha256_json({k: man[k] for k in DECISION_FIELDS})  # a consistent manifest
    mpath.write_text(json.dumps(man))
    with pytest.raises(BundleError, match="no_such_family.*not known.*badexpert"):
        Detector.load(bundle)


def test_old_format_refused_with_advice(bundle: Path) -> None:
    mpath = bundle / "manifest.json"
    man = json.loads(mpath.read_text())
    man.update(format="bdx-study/badexpert-detector", format_version=1)
    mpath.write_text(json.dumps(man))
    with pytest.raises(BundleError, match="export the detector again"):
        Detector.load(bundle)


# ------------------------------------------------------------------------------------- tampering


def test_tampered_weight_byte_refused(bundle: Path) -> None:
    f = bundle / "expert.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"expert\.safetensors.*sha256"):
        Detector.load(bundle)


def test_edited_manifest_hash_refused(bundle: Path) -> None:
    mpath = bundle / "manifest.json"
    man = json.loads(mpath.read_text())
    h = man["sha256"]["auxiliary.safetensors"]
    man["sha256"]["auxiliary.safetensors"] = ("0" if h[0] != "0" else "1") + h[1:]
    mpath.write_text(json.dumps(man))
    with pytest.raises(BundleError, match=r"auxiliary\.safetensors"):
        Detector.load(bundle)


def test_removed_hash_refused(bundle: Path) -> None:
    mpath = bundle / "manifest.json"
    man = json.loads(mpath.read_text())
    del man["sha256"]["model.safetensors"]
    mpath.write_text(json.dumps(man))
    with pytest.raises(BundleError, match=r"model\.safetensors"):
        Detector.load(bundle)


def test_missing_files_refused(bundle: Path, tmp_path: Path) -> None:
    (bundle / "auxiliary.safetensors").unlink()
    with pytest.raises(BundleError, match="missing auxiliary.safetensors"):
        Detector.load(bundle)
    with pytest.raises(BundleError, match="elsewhere: no such folder"):
        Detector.load(tmp_path / "elsewhere")


def test_wrong_format_refused(bundle: Path) -> None:
    mpath = bundle / "manifest.json"
    man = json.loads(mpath.read_text())
    man["format"] = "something-else"
    mpath.write_text(json.dumps(man))
    with pytest.raises(BundleError, match="something-else"):
        Detector.load(bundle)


# ------------------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 1, 28, 28), (4, 16), (2, 2, 1, 16, 16), (16, 16, 1)])
def test_wrong_shape_refused(bundle: Path, shape: tuple[int, ...]) -> None:
    d = Detector.load(bundle)
    with pytest.raises(BundleError) as ei:
        d.detect(torch.rand(shape))
    assert "(N, 1, 16, 16)" in str(ei.value)
    assert str(shape) in str(ei.value)


@pytest.mark.parametrize(("lo", "hi"), [(0.0, 1.5), (-0.2, 0.9), (0.0, 255.0)])
def test_out_of_range_refused(bundle: Path, lo: float, hi: float) -> None:
    d = Detector.load(bundle)
    x = torch.rand(3, 1, 16, 16) * (hi - lo) + lo
    x[0, 0, 0, 0], x[0, 0, 0, 1] = lo, hi
    with pytest.raises(BundleError, match=r"\[0, 1\]"):
        d.detect(x)


def test_nan_refused(bundle: Path) -> None:
    d = Detector.load(bundle)
    x = _inputs(2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(BundleError):
        d.detect(x)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_infinite_refused(bundle: Path, bad: float) -> None:
    d = Detector.load(bundle)
    x = _inputs(2)
    x[0, 0, 0, 0] = bad
    with pytest.raises(BundleError, match=r"\[0, 1\]"):
        d.detect(x)


def test_uint8_accepted(bundle: Path) -> None:
    d = Detector.load(bundle)
    raw = np.random.default_rng(0).integers(0, 256, size=(5, 1, 16, 16), dtype=np.uint8)
    raw[0, 0, 0, 0], raw[0, 0, 0, 1] = 0, 255
    out_u8 = d.detect(raw)
    out_f = d.detect(torch.from_numpy(raw).float() / 255.0)
    np.testing.assert_array_equal(out_u8.score, out_f.score)
    np.testing.assert_array_equal(out_u8.prediction, out_f.prediction)
    np.testing.assert_array_equal(d.detect(torch.from_numpy(raw)).score, out_f.score)
    assert len(out_u8.score) == 5


def test_float64_accepted(bundle: Path) -> None:
    d = Detector.load(bundle)
    x = _inputs(4)
    np.testing.assert_array_equal(d.detect(x.double()).score, d.detect(x).score)


def test_empty_batch(bundle: Path) -> None:
    out = Detector.load(bundle).detect(torch.empty(0, 1, 16, 16))
    assert out.score.shape == (0,) and out.flagged.shape == (0,) and out.records() == []


def test_bundle_readable_by_others(bundle: Path) -> None:
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    assert bundle.stat().st_mode & 0o755 == 0o755


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 1e9), ("architecture", "resnet18"), ("params", {"ensemble_alpha": 100.0}), ("detector", "strip")],
)
def test_edited_decision_fields_refused(bundle: Path, field: str, value: object) -> None:
    mpath = bundle / "manifest.json"
    man = json.loads(mpath.read_text())
    man[field] = {**man[field], **value} if isinstance(value, dict) else value
    mpath.write_text(json.dumps(man))
    with pytest.raises(BundleError, match="decision fields"):
        Detector.load(bundle)


def test_provenance_edit_is_allowed(bundle: Path) -> None:
    from bdx_study.detector import update_provenance

    update_provenance(bundle, note="re-exported")
    assert Detector.load(bundle).manifest["provenance"]["note"] == "re-exported"


def test_save_refuses_to_overwrite_other_folders(tmp_path: Path, family: DetectorFamily) -> None:
    keep = tmp_path / "project"
    keep.mkdir()
    (keep / "mlflow.db").write_text("precious")
    for force in (False, True):
        with pytest.raises(BundleError, match="not a detector bundle"):
            _save(keep, family, 0.0, force=force)
    assert (keep / "mlflow.db").read_text() == "precious"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        _save(tmp_path / "a_file", family, 0.0, force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Detector.load(_save(empty, family, 0.0)).threshold == 0.0


KILLED_REPLACE = """
import os, sys
from pathlib import Path
from bdx_study.detectors import create_detector
from tests.test_detector import _save

bundle, threshold, step = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
family = create_detector("badexpert", {"ensemble_alpha": 2.5, "ensemble_beta": 0.4})
seen = [0]

def dying(real):
    def call(*args, **kwargs):
        seen[0] += 1
        if seen[0] == step:
            os._exit(9)  # killed here: no cleanup runs, as with SIGKILL or a power cut
        return real(*args, **kwargs)
    return call

os.replace, os.unlink = dying(os.replace), dying(os.unlink)
_save(bundle, family, threshold, force=True)
print("steps", seen[0])
"""


def _replace_in_child(bundle: Path, threshold: float, step: int) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", KILLED_REPLACE, str(bundle), str(threshold), str(step)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_export_force_killed_at_any_point_leaves_a_whole_bundle(tmp_path: Path, family: DetectorFamily) -> None:
    """`--force` replaces a bundle so that a process killed at any file operation leaves the old
    bundle or the new one, whole (it loads, its hashes verify); the next replace removes what the
    dead one left, and the user's own files survive every step."""
    bundle = _save(tmp_path / "bundle", family, 1.0)
    (bundle / "notes.txt").write_text("mine")
    done = _replace_in_child(bundle, 2.0, 0)  # step 0: never killed; counts the steps
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout.split()[-1])
    assert steps >= 6
    outcomes = set()
    for step in range(1, steps + 1):
        before = Detector.load(bundle).threshold
        new = before + 1.0
        killed = _replace_in_child(bundle, new, step)
        assert killed.returncode == 9, (step, killed.stderr)
        loaded = Detector.load(bundle)  # whole: loads and verifies
        assert loaded.threshold in (before, new), step
        outcomes.add(loaded.threshold == new)
        assert (bundle / "notes.txt").read_text() == "mine"
    assert outcomes == {False, True}  # killed before the switch and after it
    _save(bundle, family, 100.0, force=True)
    own = set(json.loads((bundle / "manifest.json").read_text())["sha256"])
    assert {p.name for p in bundle.iterdir()} == {*own, "manifest.json", "notes.txt"}  # nothing left over
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert Detector.load(bundle).threshold == 100.0
