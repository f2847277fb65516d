"""The command line as a user meets it: bad input fails fast with a message naming the file,
key and value, before Ray starts; list and validate work without a cluster."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import tiny_study


def run_cli(*args: str, cwd: Path, timeout: float = 120) -> tuple[int, str, float]:
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "bdx_study.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return p.returncode, p.stdout + p.stderr, time.perf_counter() - t


BAD_CASES = {
    "unknown_key": ({"search__colour": "red"}, ["search.colour", "Extra inputs are not permitted"]),
    "wrong_type": ({"search__num_trials": "many"}, ["search.num_trials", "'many'"]),
    "unknown_attack": (
        {"victims__attacks": [{"name": "badnett"}]},
        ["unknown attack 'badnett'", "badnet, badnet_all2all, blend"],
    ),
    "lr_not_positive": (
        {"detectors": {"badexpert": {"unlearn_lr": -0.001}}},
        ["detectors.badexpert.unlearn_lr", "greater than 0", "-0.001"],
    ),
    "lr_bound": (
        {"detectors": {"badexpert": {"aux_lr": {"dist": "loguniform", "low": 0, "high": 0.1}}}},
        ["detectors.badexpert.aux_lr.low"],
    ),
    "unknown_hparam": (
        {"detectors": {"badexpert": {"unlearn_rate": 0.1}}},
        ["detectors.badexpert.unlearn_rate", "unknown parameter", "unlearn_lr"],
    ),
    "unknown_family": (
        {"detectors": {"neural_cleanse": {}}},
        ["detectors.neural_cleanse", "known: badexpert", "strip"],
    ),
    "dist_on_missing_param": (
        {"detectors": {"scale_up": {"num_images": {"dist": "int", "low": 1, "high": 4}}}},
        ["detectors.scale_up.num_images", "unknown parameter", "scales"],
    ),
    "fpr_range": ({"protocol": {"target_fpr": 1.5}}, ["protocol.target_fpr", "1.5"]),
    "clean_set_too_big": ({"protocol": {"clean_set_size": 5000}}, ["clean_set_size", "5000", "reserve_size"]),
    # the victim zoo's bad input: each named before any work starts
    "unknown_attack_param": (
        {"victims__attacks": [{"name": "badnet", "patch": 4}]},
        ["victims.attacks", "patch"],
    ),
    "trigger_larger_than_image": (
        {"victims__attacks": [{"name": "badnet", "patch_size": 20}]},
        ["victims.attacks", "patch_size 20", "16x16"],
    ),
    "target_not_a_class": (
        {"victims__attacks": [{"name": "badnet", "target": 10}]},
        ["victims.attacks", "target 10", "num_classes 10"],
    ),
    "clean_label_target_too_small": (
        {"victims__attacks": [{"name": "sig", "poison_rate": 0.5}]},
        ["victims.attacks", "sig", "poison_rate 0.5", "target class 0"],
    ),
    "architecture_shape": (
        {"victims__architectures": ["vgg16_bn"]},
        ["victims.architectures", "vgg16_bn", "1x16x16", "3x32x32"],
    ),
    "gtsrb_root_missing": (
        {"victims__datasets": ["gtsrb"], "data__root": "nowhere"},
        ["dataset 'gtsrb'", "nowhere", "GTSRB/Training"],
    ),
    "image_folder_root_missing": (
        {"victims__datasets": ["imagenette"], "data__root": "nowhere"},
        ["dataset 'imagenette'", "nowhere", "train/"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_study_files_fail_fast_before_ray(tmp_path: Path, case: str) -> None:
    overrides, expected = BAD_CASES[case]
    doc = tiny_study(tmp_path, **overrides)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, seconds = run_cli("launch", "--space", str(path), cwd=tmp_path)
    assert code == 2, out
    assert str(path) in out
    for text in expected:
        assert text in out, (text, out)
    assert "Traceback" not in out
    assert "Ray" not in out and not (tmp_path / "runs").exists()  # nothing started, nothing written
    assert seconds < 30  # validation takes well under a second; the bound only catches a hang


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("study: {name: x\nvictims: [")
    code, out, _ = run_cli("validate", "--space", str(path), cwd=tmp_path)
    assert code == 2 and "not valid YAML" in out and str(path) in out
    code, out, _ = run_cli("validate", "--space", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert code == 2 and "no such study file" in out


def test_missing_data_root_fails_before_ray(tmp_path: Path) -> None:
    doc = tiny_study(tmp_path)
    doc["victims"]["datasets"] = ["mnist"]
    doc["data"]["root"] = str(tmp_path / "no-data-here")
    path = tmp_path / "mnist.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out, _ = run_cli("launch", "--space", str(path), cwd=tmp_path)
    assert code == 2, out
    assert "mnist" in out and "no-data-here" in out and "Traceback" not in out
    assert not (tmp_path / "runs" / "victims").exists()


def test_validate_and_list_shipped_studies(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "search_spaces"
    for name in ("quickstart.yaml", "compare.yaml"):
        code, out, _ = run_cli("validate", "--space", str(root / name), cwd=tmp_path)
        assert code == 0 and "OK" in out, out
    # a GPU-cluster study: its data and GPUs are not on this machine, which validate says ...
    code, out, _ = run_cli("validate", "--space", str(root / "ablation.yaml"), cwd=tmp_path)
    assert code == 2 and "cifar10" in out and "Traceback" not in out, out
    # ... while the file itself is valid
    code, out, _ = run_cli("validate", "--file-only", "--space", str(root / "ablation.yaml"), cwd=tmp_path)
    assert code == 0 and "OK" in out, out
    code, out, _ = run_cli("validate", cwd=tmp_path)  # the embedded default
    assert code == 0 and "quickstart" in out
    code, out, _ = run_cli("list", cwd=tmp_path)
    assert code == 0
    assert "badnet" in out and "small_cnn" in out and "digits" in out and "unlearn_lr" in out
    from bdx_study.detectors import DETECTORS

    assert f"detectors:     {', '.join(DETECTORS.names())}" in out and "num_images" in out and "[scoring]" in out


NO_TORCH_PROBE = """
import sys
from bdx_study.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "torchvision", "ray", "mlflow", "optuna", "sklearn") if m in sys.modules)
print("heavy modules:", ", ".join(heavy) or "none")
raise SystemExit(code)
"""


def _validate_in_probe(path: Path, cwd: Path) -> tuple[int, str]:
    p = subprocess.run(
        [sys.executable, "-c", NO_TORCH_PROBE, "validate", "--space", str(path)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p.returncode, p.stdout + p.stderr


def test_validate_imports_no_torch_yet_checks_data_as_training_would(tmp_path: Path) -> None:
    """validate reads the data as arrays and checks attacks without building them, so it never
    imports torch (1.7 s of a 2 s budget here); its verdict on the training split must still be
    the one training reaches through torch."""
    root = Path(__file__).resolve().parents[1] / "search_spaces"
    for name in ("quickstart.yaml", "compare-all.yaml"):
        code, out = _validate_in_probe(root / name, tmp_path)
        assert code == 0 and "OK" in out and "heavy modules: none" in out, out
    # a subsampled training split (a torch-identical permutation) and an attack that needs
    # images of one class: TaCT's source class 1 among digits' 400 drawn training images
    from bdx_study.configs import DataConfig

    doc = tiny_study(tmp_path)
    train = DataConfig.model_validate(doc["data"]).splits("digits").train  # what training cuts (torch)
    have = int((train.y == 1).sum())
    path = tmp_path / "tact.yaml"
    for rate, ok in (((have - 0.5) / 400, True), ((have + 1.5) / 400, False)):  # needs have, have + 1
        doc["victims"]["attacks"] = [{"name": "tact", "poison_rate": rate, "cover_rate": 0.01}]
        path.write_text(yaml.safe_dump(doc))
        code, out = _validate_in_probe(path, tmp_path)
        assert "heavy modules: none" in out and "Traceback" not in out, out
        if ok:
            assert code == 0 and "OK" in out, out
        else:
            assert code == 2 and f"needs {have + 1} images of source class 1, the training set has {have}" in out, out
