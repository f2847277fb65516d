"""Refusals as a careless user meets them: each is one line (exit code 2 from the command line)
that names the file, flag or key and the value, says what is allowed, and blames the right input
(a FIFO is not a missing file, a folder is not a missing file, NaN weights are not a label
problem, a recipe handed in as a study file is named as a recipe)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.torch import save_file

from bdx_study.cli import main
from bdx_study.plugins import PluginError, load_plugins

from .conftest import tiny_study, write_study
from .test_detector import _net, _save
from .test_fit import DOMAIN, write_recipe


def _refusal(capsys: Any, *args: str) -> str:
    """Run the command line in-process; it must refuse with exit code 2 and one line on stderr."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, (args, err)
    assert err.startswith("bdx-study: error: ") and err.count("\n") == 1, err
    return err.removeprefix("bdx-study: error: ").strip()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bundle, a recipe, a study file, model weights (finite and NaN), clean images, inputs, a
    FIFO and an empty folder: what a user has lying around."""
    from bdx_study.detectors import create_detector

    tmp = tmp_path_factory.mktemp("messages")
    out = {
        "tmp": tmp,
        "bundle": _save(tmp / "bundle", create_detector("badexpert"), 0.5),
        "recipe": write_recipe(tmp / "recipe.yaml", DOMAIN),
        "study": write_study(tmp, tiny_study(tmp)),
        "weights": tmp / "model.safetensors",
        "nan_weights": tmp / "nan.safetensors",
        "clean": tmp / "clean.npz",
        "inputs": tmp / "inputs.npy",
        "fifo": tmp / "pipe",
        "folder": tmp / "empty_folder",
        "empty": tmp / "empty.yaml",
    }
    state = {k: v.contiguous() for k, v in _net(0).state_dict().items()}
    save_file(state, out["weights"])
    broken = dict(state)
    broken["body.0.weight"] = broken["body.0.weight"].clone()
    broken["body.0.weight"].view(-1)[3] = float("nan")
    save_file(broken, out["nan_weights"])
    x = np.random.default_rng(0).random((300, 1, 16, 16), dtype=np.float32)
    np.savez(out["clean"], x=x, y=np.arange(300) % 10)
    np.save(out["inputs"], x[:4])
    os.mkfifo(out["fifo"])
    out["folder"].mkdir()
    out["empty"].write_text("")
    return out


def _fit(f: dict[str, Path], **overrides: str) -> list[str]:
    args = {
        "--recipe": str(f["recipe"]),
        "--architecture": "small_cnn",
        "--num-classes": "10",
        "--input-shape": "1,16,16",
        "--weights": str(f["weights"]),
        "--clean": str(f["clean"]),
        "--out": str(f["tmp"] / "never-written"),
        **overrides,
    }
    return ["fit", *(s for kv in args.items() for s in kv)]


# ------------------------------------------------------------------------------ study files (--space)


def test_study_file_that_is_a_fifo_or_a_folder_is_not_called_missing(files: dict[str, Path], capsys: Any) -> None:
    msg = _refusal(capsys, "validate", "--space", str(files["fifo"]))
    assert msg.startswith(f"{files['fifo']}: a FIFO (named pipe), not a regular file") and "no such" not in msg, msg
    msg = _refusal(capsys, "validate", "--space", str(files["folder"]))
    assert msg.startswith(f"{files['folder']}: a folder, not a regular file") and "no such" not in msg, msg
    msg = _refusal(capsys, "validate", "--space", str(files["tmp"] / "nope.yaml"))
    assert msg == f"{files['tmp'] / 'nope.yaml'}: no such study file", msg


def test_several_problems_of_a_study_file_on_one_line(tmp_path: Path, capsys: Any) -> None:
    doc = tiny_study(tmp_path)
    doc["search"]["num_trials"] = "many"
    doc["search"]["colour"] = "red"
    del doc["victims"]
    msg = _refusal(capsys, "validate", "--file-only", "--space", str(write_study(tmp_path, doc)))
    assert msg.startswith(f"{tmp_path / 'study.yaml'}: "), msg
    for text in ("victims: Field required", "search.colour: Extra inputs are not permitted (got 'red')"):
        assert text in msg, msg
    assert "search.num_trials: Input should be a valid integer (got 'many')" in msg, msg
    assert "dict[" not in msg and msg.count(str(tmp_path / "study.yaml")) == 1, msg  # no union noise, file once
    # problems found after typing (families, parameters, values) are one line too
    doc = tiny_study(tmp_path)
    doc["detectors"]["badexpert"]["unlearn_lr"] = -1.0
    doc["detectors"]["badexpert"]["colour"] = "red"
    msg = _refusal(capsys, "validate", "--file-only", "--space", str(write_study(tmp_path, doc, "two.yaml")))
    assert "detectors.badexpert.unlearn_lr: " in msg and "(got -1.0)" in msg, msg
    assert "detectors.badexpert.colour: unknown parameter; allowed: " in msg, msg


def test_empty_study_file_says_empty(files: dict[str, Path], capsys: Any) -> None:
    msg = _refusal(capsys, "validate", "--space", str(files["empty"]))
    assert msg.startswith(f"{files['empty']}: a study file must be a mapping of sections") and "an empty file" in msg
    assert "NoneType" not in msg, msg


def test_a_recipe_or_a_manifest_handed_in_as_a_study_file_is_named(files: dict[str, Path], capsys: Any) -> None:
    msg = _refusal(capsys, "validate", "--space", str(files["recipe"]))
    assert msg.startswith(f"{files['recipe']}: a recipe (written by `bdx-study analyze`") and "not a study file" in msg
    manifest = files["bundle"] / "manifest.json"
    msg = _refusal(capsys, "analyze", "--space", str(manifest))
    assert msg.startswith(f"{manifest}: a detector bundle's manifest") and "not a study file" in msg, msg


def test_data_root_that_is_a_file_or_missing(tmp_path: Path, capsys: Any) -> None:
    doc = tiny_study(tmp_path)
    doc["victims"]["datasets"] = ["mnist"]
    (tmp_path / "data.txt").write_text("not a folder")
    doc["data"]["root"] = str(tmp_path / "data.txt")
    msg = _refusal(capsys, "validate", "--space", str(write_study(tmp_path, doc)))
    assert f"study.yaml: data.root: '{tmp_path / 'data.txt'}'" in msg and "is a file, not a folder" in msg, msg
    doc["data"]["root"] = str(tmp_path / "no-data-here")
    msg = _refusal(capsys, "validate", "--space", str(write_study(tmp_path, doc)))
    assert f"data.root {tmp_path / 'no-data-here'} does not exist" in msg, msg
    assert "dataset 'mnist': dataset 'mnist'" not in msg, msg


def test_data_sizes_beyond_the_data_on_one_line(tmp_path: Path, capsys: Any) -> None:
    doc = tiny_study(tmp_path)
    doc["data"].update(reserve_size=100_000, train_size=100_000)
    doc["protocol"]["clean_set_size"] = 100
    msg = _refusal(capsys, "validate", "--space", str(write_study(tmp_path, doc)))
    assert "data.reserve_size: 100000 leaves fewer than 2" in msg and "data.train_size: 100000 exceeds" in msg, msg


# ------------------------------------------------------------------------------ fit


def test_nan_weights_are_blamed_not_the_clean_data(files: dict[str, Path], capsys: Any) -> None:
    msg = _refusal(capsys, *_fit(files, **{"--weights": str(files["nan_weights"])}))
    assert msg.startswith(f"--weights {files['nan_weights']}: 1 tensor(s) hold NaN or infinite values"), msg
    assert "body.0.weight" in msg and "--clean" not in msg and "labels" not in msg, msg


def test_weights_that_are_a_fifo_or_a_folder_are_not_called_missing(files: dict[str, Path], capsys: Any) -> None:
    msg = _refusal(capsys, *_fit(files, **{"--weights": str(files["fifo"])}))
    assert msg.startswith(f"--weights {files['fifo']}: a FIFO (named pipe), not a regular file"), msg
    msg = _refusal(capsys, *_fit(files, **{"--weights": str(files["folder"])}))
    assert msg.startswith(f"--weights {files['folder']}: a folder, not a regular file"), msg
    assert "no such file" not in msg


def test_per_channel_counts_say_what_is_allowed(files: dict[str, Path], capsys: Any) -> None:
    msg = _refusal(capsys, *_fit(files), "--mean", "0.5", "0.5", "--std", "1")
    assert msg == "--mean 0.5 0.5: 2 values, but --input-shape has 1 channel(s): give 1 value", msg
    msg = _refusal(capsys, *_fit(files), "--mean", "nan", "--std", "1")
    assert msg == "--mean nan: every value must be a finite number", msg
    # the saved normalization is shown as numbers a user typed, not float32 noise
    msg = _refusal(capsys, *_fit(files), "--mean", "0", "--std", "1")
    assert "was saved with normalization mean [0.31], but --mean says [0]" in msg, msg


def test_a_study_file_or_an_empty_file_as_recipe(files: dict[str, Path], capsys: Any) -> None:
    msg = _refusal(capsys, *_fit(files, **{"--recipe": str(files["study"])}))
    assert msg.startswith(f"{files['study']}: a study file, not a recipe; run `bdx-study analyze --space"), msg
    msg = _refusal(capsys, *_fit(files, **{"--recipe": str(files["empty"])}))
    assert msg.startswith(f"{files['empty']}: an empty file, not a recipe"), msg


def test_a_default_detector_the_recipe_lacks(files: dict[str, Path], capsys: Any) -> None:
    doc = yaml.safe_load(files["recipe"].read_text())
    doc["default_detector"] = "strip"
    path = files["tmp"] / "other_default.yaml"
    path.write_text(yaml.safe_dump(doc))
    msg = _refusal(capsys, *_fit(files, **{"--recipe": str(path)}))
    assert msg.startswith(f"{path}: default_detector: 'strip' has no robust defaults") and "--detector" in msg, msg
    assert "badexpert" in msg, msg


# ------------------------------------------------------------------------------ detect and export


def test_detector_bundle_that_is_missing_a_file_or_a_fifo(files: dict[str, Path], capsys: Any) -> None:
    inputs = str(files["inputs"])
    msg = _refusal(capsys, "detect", "--detector", str(files["tmp"] / "nowhere"), "--input", inputs)
    assert msg.startswith(f"{files['tmp'] / 'nowhere'}: no such folder; a detector bundle is a folder"), msg
    msg = _refusal(capsys, "detect", "--detector", inputs, "--input", inputs)
    assert msg.startswith(f"{inputs}: a file, not a folder"), msg
    folder = files["tmp"] / "fifo_bundle"
    folder.mkdir()
    os.mkfifo(folder / "manifest.json")  # reading it would block forever
    msg = _refusal(capsys, "detect", "--detector", str(folder), "--input", inputs)
    assert msg.startswith(f"{folder / 'manifest.json'}: a FIFO (named pipe), not a regular file"), msg
    # fit's --out onto that folder: refused at once, not blocked reading the FIFO
    msg = _refusal(capsys, *_fit(files, **{"--out": str(folder)}))
    assert msg == f"--out {folder} exists and is not a detector bundle; choose a new or empty folder", msg
    # an --out that cannot be created is refused before any work, not after the fit
    out = files["inputs"] / "bundle"
    msg = _refusal(capsys, *_fit(files, **{"--out": str(out)}))
    assert msg == f"--out {out} cannot be created: {files['inputs']} is a file, not a folder; choose another place", msg


def test_a_single_value_as_input_is_refused_without_a_traceback(files: dict[str, Path]) -> None:
    scalar = files["tmp"] / "scalar.npy"
    np.save(scalar, np.float32(0.5))
    p = subprocess.run(
        [sys.executable, "-m", "bdx_study.cli", "detect", "--detector", str(files["bundle"]), "--input", str(scalar)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert (
        p.stderr == f"bdx-study: error: {scalar}: a single value (shape ()), not an array of inputs; --input takes "
        "(N, C, H, W) images\n"
    ), p.stderr


def test_export_refuses_its_out_before_any_work(files: dict[str, Path], capsys: Any) -> None:
    """A file as --out is refused before the victim is even looked for (the study never ran)."""
    out = files["tmp"] / "a_file.txt"
    out.write_text("mine")
    msg = _refusal(
        capsys, "export", "--space", str(files["study"]), "--recipe", str(files["recipe"]), "--out", str(out)
    )
    assert msg == f"--out {out} exists and is not a folder; choose a new or empty folder for the bundle", msg
    assert out.read_text() == "mine"


def test_plugins_refusal_can_name_its_flag() -> None:
    with pytest.raises(PluginError) as e:
        load_plugins(["no_such_plugin_module"], flag="--plugins")
    assert str(e.value).startswith("--plugins no_such_plugin_module: module 'no_such_plugin_module' could not be")
    with pytest.raises(PluginError, match=r"^module 'no_such_plugin_module' could not be imported"):
        load_plugins(["no_such_plugin_module"])  # a study file's study.plugins: the loader names the key


def test_inputs_that_do_not_fit_the_detector_name_the_input_file(files: dict[str, Path], capsys: Any) -> None:
    """Shape, NaN and range problems of `detect --input` name the file (the detector never sees it)."""
    tmp = files["tmp"]
    cases = {
        "rgb.npy": (np.zeros((3, 3, 32, 32), np.float32), "inputs of shape (3, 3, 32, 32) do not fit this detector"),
        "nan.npy": (np.full((2, 1, 16, 16), np.nan, np.float32), "NaN"),
    }
    for name, (x, says) in cases.items():
        np.save(tmp / name, x)
        err = _refusal(capsys, "detect", "--detector", str(files["bundle"]), "--input", str(tmp / name))
        assert err.startswith(f"--input {tmp / name}: ") and says in err, err


def test_an_unexpected_error_is_one_line_with_its_traceback_kept(
    files: dict[str, Path], capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (an error that is not a refusal) is said on one line, exit 1, with its traceback kept
    in a file; BDX_STUDY_TRACEBACK=1 raises it instead."""
    import bdx_study.cli as cli

    def broken(args: Any) -> int:
        raise RuntimeError("something\nwent wrong")

    monkeypatch.setattr(cli, "cmd_validate", broken)
    assert main(["validate", "--space", str(files["study"])]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validate: unexpected RuntimeError: something went wrong (a bug" in err, err
    kept = Path(err.split("kept in ")[1].split(")")[0])
    assert "RuntimeError: something" in kept.read_text() and "broken" in kept.read_text()
    kept.unlink()
    monkeypatch.setenv("BDX_STUDY_TRACEBACK", "1")
    with pytest.raises(RuntimeError):
        main(["validate", "--space", str(files["study"])])
