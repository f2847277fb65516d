"""Detector bundles: save, load, serve the same scores; refuse tampered bundles and wrong inputs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import bdx_study
from bdx_study.archs import create_model
from bdx_study.data import dataset_info
from bdx_study.defense import BaDExpert, DefenseConfig
from bdx_study.detector import FORMAT, WEIGHT_FILES, BundleError, Detector, save_bundle

INFO = dataset_info("digits")


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


@pytest.fixture()
def det() -> BaDExpert:
    cfg = DefenseConfig(ensemble_alpha=2.5, ensemble_beta=0.4, target_fpr=0.05)
    d = BaDExpert(_net(0), _net(1), _net(2), cfg)
    conf = d.confidences(_inputs(40, seed=9))
    d.threshold = float(torch.quantile(d.scores(conf).double(), 0.5))  # flags about half of the inputs
    return d


@pytest.fixture()
def bundle(tmp_path: Path, det: BaDExpert) -> Path:
    return save_bundle(
        tmp_path / "bundle",
        det,
        architecture="small_cnn",
        info=INFO,
        metrics={"auroc_correct_only": 0.9, "attack_success_after": float("nan")},
        provenance={"test": True},
    )


def test_bundle_layout_and_manifest(bundle: Path, det: BaDExpert) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*WEIGHT_FILES.values(), "manifest.json"])
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["format"] == FORMAT
    assert man["architecture"] == "small_cnn"
    assert man["input_shape"] == [1, 16, 16]
    assert man["num_classes"] == 10
    assert man["threshold"] == det.threshold
    assert man["score_kind"] == "ensemble" and man["ensemble_alpha"] == 2.5 and man["ensemble_beta"] == 0.4
    assert man["metrics"] == {"auroc_correct_only": 0.9, "attack_success_after": None}
    assert set(man["sha256"]) == set(WEIGHT_FILES.values())


def test_detect_matches_badexpert(bundle: Path, det: BaDExpert) -> None:
    loaded = bdx_study.Detector.load(bundle)
    assert loaded.threshold == det.threshold
    assert loaded.input_shape == (1, 16, 16)
    x = _inputs()
    out = loaded.detect(x)
    conf = det.confidences(x)
    scores = det.scores(conf)
    np.testing.assert_array_equal(out.prediction, conf.pred.numpy())
    np.testing.assert_array_equal(out.expert_conf, conf.expert_conf.numpy())
    np.testing.assert_array_equal(out.aux_conf, conf.aux_conf.numpy())
    np.testing.assert_array_equal(out.score, scores.numpy())
    np.testing.assert_array_equal(out.flagged, (scores > det.threshold).numpy())
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
    d = BaDExpert(_net(0), _net(1), _net(2), DefenseConfig(score_kind=kind), threshold=0.0)  # type: ignore[arg-type]
    path = save_bundle(tmp_path / "b", d, architecture="small_cnn", info=INFO, metrics={}, provenance={})
    x = _inputs()
    np.testing.assert_array_equal(Detector.load(path).detect(x).score, d.scores(d.confidences(x)).numpy())


def test_save_replaces_existing_bundle(tmp_path: Path, det: BaDExpert, bundle: Path) -> None:
    det.threshold = 123.0
    save_bundle(bundle, det, architecture="small_cnn", info=INFO, metrics={}, provenance={})
    assert Detector.load(bundle).threshold == 123.0
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_nan_threshold_round_trips(tmp_path: Path) -> None:
    d = BaDExpert(_net(0), _net(1), _net(2), DefenseConfig())
    path = save_bundle(tmp_path / "b", d, architecture="small_cnn", info=INFO, metrics={}, provenance={})
    assert math.isnan(Detector.load(path).threshold)


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
    with pytest.raises(BundleError, match="no manifest.json"):
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
    [("threshold", 1e9), ("architecture", "resnet18"), ("defense_config", {"ensemble_alpha": 100.0})],
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


def test_save_refuses_to_overwrite_other_folders(tmp_path: Path, det: BaDExpert) -> None:
    keep = tmp_path / "project"
    keep.mkdir()
    (keep / "mlflow.db").write_text("precious")
    with pytest.raises(BundleError, match="not a detector bundle"):
        save_bundle(keep, det, architecture="small_cnn", info=dataset_info("digits"), metrics={}, provenance={})
    assert (keep / "mlflow.db").read_text() == "precious"
