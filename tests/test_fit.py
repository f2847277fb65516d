"""``bdx-study fit`` as a user meets it: a small CNN trained here (digits, BadNet), saved as
safetensors, clean images as an .npz or a folder of PNGs, a recipe with the keys ``analyze``
writes. The bundle flags triggered inputs, keeps the clean FPR near its target on clean inputs
it never saw, and ``detect`` serves it; every bad input fails before any work, in one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from bdx_study import userfiles
from bdx_study.cli import main
from bdx_study.detector import Detector
from bdx_study.victims import AttackSpec, DataConfig, TrainingConfig, VictimConfig, train_victim

TARGET_FPR = 0.1
BADEXPERT = {  # settings that work on tiny digits models
    "unlearn_lr": 5e-4,
    "unlearn_epochs": 2,
    "unlearn_batch_size": 32,
    "aux_lr": 0.1,
    "aux_epochs": 4,
    "aux_milestones": [2],
}
DOMAIN = {
    "datasets": ["digits"],
    "architectures": ["small_cnn"],
    "attacks": ["badnet"],
    "input_shapes": [[1, 16, 16]],
    "num_classes": [10],
}


def write_recipe(path: Path, domain: dict[str, Any], clean_set_size: int = 200) -> Path:
    """A recipe with the keys `bdx-study analyze` writes."""
    recipe = {
        "study": "tiny",
        "study_dir": str(path.parent / "runs" / "studies" / "tiny"),
        "default_detector": "badexpert",
        "domain": {**domain, "note": "the settings were chosen and checked on these victims only"},
        "detectors": {
            "badexpert": {
                "defaults": BADEXPERT,
                "protocol": {"clean_set_size": clean_set_size, "calibration_fraction": 0.5, "target_fpr": TARGET_FPR},
                "selection": {"rule": "best worst-case auroc_correct_only", "chosen_trial": "t0001"},
                "evidence": {"evaluation_worst_auroc_correct_only": 0.99},
                "seed_policy": {"seed": 1, "clean_set_seed": 3},
            }
        },
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a user brings: a BadNet-backdoored small CNN (safetensors), clean digits as an .npz
    (300 images) and as a PNG folder (200 images), and a recipe; plus 400 clean digits they
    never hand to fit, to check the bundle on."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("fit")
    data = DataConfig(reserve_size=300, eval_size=400, train_size=400)
    cfg = VictimConfig(
        dataset="digits",
        architecture="small_cnn",
        attack=AttackSpec(name="badnet", params={"poison_rate": 0.1}),
        training=TrainingConfig(epochs=6, lr=2e-3),
        data=data,
    )
    model = train_victim(cfg, device=torch.device("cpu"))[0]  # (model, metrics, attack)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    splits = data.splits("digits")
    np.savez(tmp / "clean.npz", x=splits.reserve.x.numpy(), y=splits.reserve.y.numpy())
    folder = tmp / "clean_png"
    for i in range(200):  # class folders named by index, 8-bit grayscale PNGs
        (folder / str(int(splits.reserve.y[i]))).mkdir(parents=True, exist_ok=True)
        pixels = (splits.reserve.x[i, 0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / str(int(splits.reserve.y[i])) / f"{i:04d}.png")
    unseen = torch.cat([splits.selection.x, splits.evaluation.x]), torch.cat([splits.selection.y, splits.evaluation.y])
    return {
        "tmp": tmp,
        "model": model,
        "attack": cfg.build_attack(),
        "recipe": write_recipe(tmp / "recipe.yaml", DOMAIN),
        "unseen": unseen,
    }


def fit_args(user: dict[str, Any], out: Path, **overrides: str) -> list[str]:
    tmp = user["tmp"]
    args = {
        "--recipe": str(user["recipe"]),
        "--architecture": "small_cnn",
        "--num-classes": "10",
        "--input-shape": "1,16,16",
        "--weights": str(tmp / "model.safetensors"),
        "--clean": str(tmp / "clean.npz"),
        "--out": str(out),
        **overrides,
    }
    return ["fit", *(s for kv in args.items() for s in kv)]


def test_fit_npz_then_detect(user: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "bundle"
    assert main(fit_args(user, out)) == 0
    printed = capsys.readouterr()
    assert "OUTSIDE" not in printed.err  # the recipe's own domain: no warning
    for expected in ("badexpert", "unlearn_lr 0.0005", "60 held out", "realized FPR", "target 0.1", "clean accuracy"):
        assert expected in printed.out, expected
    assert f"detector bundle: {out}" in printed.out
    # what no check can see: the trigger kind; said in one line, and kept in the bundle
    assert "unchecked: the recipe was tuned on attacks badnet; no check can see which trigger" in printed.out

    det = Detector.load(out)
    m = det.manifest
    assert m["provenance"]["kind"] == "fit" and m["provenance"]["heldout_images"] == 60
    assert m["provenance"]["unchecked"].startswith("unchecked: the recipe was tuned on attacks badnet")
    assert m["params"]["seed"] == 1 and m["protocol"]["clean_set_seed"] == 3  # the recipe's seed policy
    assert m["metrics"]["heldout_images"] == 60 and m["metrics"]["clean_acc_before"] > 0.9
    lo, hi = m["metrics"]["fpr_at_threshold_low_correct_only"], m["metrics"]["fpr_at_threshold_high_correct_only"]
    assert lo <= m["metrics"]["fpr_at_threshold_correct_only"] <= hi

    x, y = user["unseen"]  # 400 clean digits fit never saw
    clean_fpr = float(det.detect(x.numpy()).flagged.mean())
    assert clean_fpr <= TARGET_FPR + 0.08, clean_fpr
    attack = user["attack"]
    triggered = attack.apply_trigger(x[attack.counts_toward_asr(y)])
    d = det.detect(triggered.numpy())
    success = d.prediction == attack.params.target
    assert success.mean() > 0.8  # the backdoor works
    assert d.flagged[success].mean() >= 0.8, d.flagged[success].mean()

    np.save(tmp_path / "triggered.npy", triggered.numpy())
    csv = tmp_path / "flags.csv"
    assert (
        main(["detect", "--detector", str(out), "--input", str(tmp_path / "triggered.npy"), "--output", str(csv)]) == 0
    )
    rows = csv.read_text().splitlines()
    assert rows[0] == "index,prediction,flagged,score" and len(rows) == len(triggered) + 1
    assert sum(r.split(",")[2] == "1" for r in rows[1:]) == int(d.flagged.sum())


def test_fit_png_folder_scales_the_clean_set_and_warns_outside_domain(
    user: dict[str, Any], tmp_path: Path, capsys: Any
) -> None:
    """200 PNGs: 40 held out, 160 left for a recipe that wants 200 (scaled, with a notice); the
    recipe was validated on 28x28 Fashion-MNIST, so fit warns and names the nearest study."""
    recipe = write_recipe(
        tmp_path / "zoo-recipe.yaml", {**DOMAIN, "datasets": ["fashion_mnist"], "input_shapes": [[1, 28, 28]]}
    )
    out = tmp_path / "bundle"
    args = fit_args(user, out, **{"--clean": str(user["tmp"] / "clean_png"), "--recipe": str(recipe)})
    assert main(args) == 0
    printed = capsys.readouterr()
    assert "OUTSIDE the domain" in printed.err
    assert "input shape 1x16x16" in printed.err and "1x28x28" in printed.err
    assert "search_spaces/quickstart.yaml" in printed.err
    assert "notice: the recipe's clean_set_size 200" in printed.out and "using clean_set_size 160" in printed.out
    det = Detector.load(out)
    assert det.manifest["protocol"]["clean_set_size"] == 160
    assert det.manifest["provenance"]["domain_warnings"]
    x, _ = user["unseen"]
    assert float(det.detect(x.numpy()).flagged.mean()) <= TARGET_FPR + 0.1


def test_folder_conversion_and_class_names(tmp_path: Path) -> None:
    """RGBA images of another size, class folders named (sorted names = class order): read as
    1x16x16 grayscale in [0, 1]."""
    for name, value in (("ant", 0), ("bee", 128), ("cat", 255)):
        (tmp_path / name).mkdir()
        Image.new("RGBA", (24, 20), (value, value, value, 255)).save(tmp_path / name / "a.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = userfiles.load_clean(tmp_path, (1, 16, 16), 3)
    assert tuple(data.x.shape) == (3, 1, 16, 16) and data.y.tolist() == [0, 1, 2]
    assert torch.allclose(data.x.mean(dim=(1, 2, 3)), torch.tensor([0.0, 128 / 255, 1.0]), atol=1e-3)
    with pytest.raises(userfiles.UserFileError, match="3 class folders .* --num-classes is 10"):
        userfiles.load_clean(tmp_path, (1, 16, 16), 10)


def test_user_folders_and_image_folder_datasets_read_the_same_files(tmp_path: Path) -> None:
    """One list of image extensions: a user's clean folder and a registered image-folder dataset
    take the same files (any case of the extension; other files are skipped)."""
    from bdx_study.data.image_folder import list_image_folder

    for label, names in (("0", ("a.PNG", "b.gif", "c.pgm", "notes.txt")), ("1", ("d.jpeg", "e.tiff", "f.webp"))):
        (tmp_path / label).mkdir()
        for i, name in enumerate(names):
            if name.endswith(".txt"):
                (tmp_path / label / name).write_text("not an image")
                continue
            fmt = {"jpeg": "JPEG", "tiff": "TIFF", "webp": "WEBP", "gif": "GIF", "pgm": "PPM"}.get(name.split(".")[1])
            Image.new("L", (16, 16), 40 * i).save(tmp_path / label / name, format=fmt or "PNG")
    files, labels, classes = list_image_folder("user", tmp_path)
    assert [f.name for f in files] == ["a.PNG", "b.gif", "c.pgm", "d.jpeg", "e.tiff", "f.webp"]
    data = userfiles.load_clean(tmp_path, (1, 16, 16), 2)
    assert data.y.tolist() == labels == [0, 0, 0, 1, 1, 1] and classes == ["0", "1"]


def test_16_bit_images_keep_their_values(tmp_path: Path) -> None:
    """16-bit grayscale PNGs are converted by their value range (PIL's 8-bit conversion would clip
    them to white): they read as the same images as their 8-bit copies, to within 8-bit rounding."""
    rng = np.random.default_rng(0)
    values = rng.random((4, 20, 20))
    for i, v in enumerate(values):
        for bits, dtype, top in (("16", np.uint16, 65535), ("8", np.uint8, 255)):
            folder = tmp_path / bits / str(i % 2)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((v * top).round().astype(dtype)).save(folder / f"{i}.png")
    assert Image.open(tmp_path / "16" / "0" / "0.png").mode.startswith("I")
    sixteen = userfiles.load_clean(tmp_path / "16", (1, 16, 16), 2)
    eight = userfiles.load_clean(tmp_path / "8", (1, 16, 16), 2)
    assert float(sixteen.x.std()) > 0.1  # not collapsed (as wide as the 8-bit copies, below)
    assert torch.allclose(sixteen.x, eight.x, atol=2 / 255)
    rgb = userfiles.load_clean(tmp_path / "16", (3, 16, 16), 2)  # three channels: the grey value in each
    assert torch.allclose(rgb.x[:, 0], sixteen.x[:, 0]) and torch.allclose(rgb.x[:, 2], sixteen.x[:, 0])


def test_clean_data_of_few_classes_warns(user: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    """Clean images of 3 of 10 classes: fit goes on, but warns (and the bundle records it) that the
    threshold is calibrated on those classes only."""
    data = np.load(user["tmp"] / "clean.npz")
    keep = data["y"] < 3
    np.savez(tmp_path / "three.npz", x=data["x"][keep], y=data["y"][keep])
    out = tmp_path / "bundle"
    code = main(fit_args(user, out, **{"--clean": str(tmp_path / "three.npz")}))
    err = capsys.readouterr().err
    assert "warning: fit: --clean has images of only 3 of the model's 10 classes (0, 1, 2)" in err, err
    if code == 0:  # (too few correct calibration images would be refused instead: also fine)
        assert Detector.load(out).manifest["provenance"]["data_warnings"][0].startswith("--clean has images of only 3")


def test_oversized_npz_member_refused_by_its_real_size(
    user: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """An .npz array larger than the limit once decompressed is refused before it is read."""
    monkeypatch.setattr(userfiles, "MAX_CLEAN_BYTES", 10_000)  # the clean set holds 300x256 float32 pixels
    with pytest.raises(userfiles.UserFileError, match=r"array 'x' holds 307328 bytes once decompressed; at most 10000"):
        userfiles.load_clean(user["tmp"] / "clean.npz", (1, 16, 16), 10)


def test_bare_network_weights_with_normalization(user: dict[str, Any], tmp_path: Path) -> None:
    """Weights of the bare network (no bdx-study wrapper) load with --mean/--std; without them,
    a clear error; saved normalization that disagrees with --mean is refused."""
    model = user["model"]
    save_file({k: v.contiguous() for k, v in model.body.state_dict().items()}, tmp_path / "bare.safetensors")
    loaded = userfiles.load_model(tmp_path / "bare.safetensors", "small_cnn", (1, 16, 16), 10, (0.31,), (0.38,))
    x = user["unseen"][0][:32]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    with pytest.raises(userfiles.UserFileError, match="holds no normalization: give --mean and --std"):
        userfiles.load_model(tmp_path / "bare.safetensors", "small_cnn", (1, 16, 16), 10, None, None)
    with pytest.raises(userfiles.UserFileError, match=r"saved with normalization mean .* but --mean says \[0.5\]"):
        userfiles.load_model(user["tmp"] / "model.safetensors", "small_cnn", (1, 16, 16), 10, (0.5,), (0.38,))


class Payload:
    """Unpickling this would create the marker file: proof that fit never unpickles."""

    marker = ""

    def __reduce__(self) -> Any:
        return (Path.touch, (Path(self.marker),))


def bad_inputs(user: dict[str, Any], tmp: Path) -> dict[str, tuple[dict[str, str], list[str]]]:
    """case -> (argument overrides, what the one-line error must say)."""
    x = np.load(user["tmp"] / "clean.npz")["x"]
    y = np.load(user["tmp"] / "clean.npz")["y"]
    model = user["model"]
    torch.save(model.state_dict(), tmp / "model.pt")
    payload = Payload()
    payload.marker = str(tmp / "UNPICKLED")
    (tmp / "model.pkl").write_bytes(pickle.dumps(payload))
    (tmp / "notes.safetensors").write_text("these are not weights")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    other = {k: v for k, v in state.items() if k != "body.4.weight"}
    save_file({**other, "extra.weight": torch.zeros(3)}, tmp / "other.safetensors")
    save_file({**state, "body.3.weight": torch.zeros(64, 32, 3, 3)}, tmp / "wide.safetensors")
    labels = y.copy()
    labels[:3] = 12
    np.savez(tmp / "labels.npz", x=x, y=labels)
    np.savez(tmp / "objects.npz", x=np.array([payload] * len(y), dtype=object), y=y)
    np.savez(tmp / "few.npz", x=x[:20], y=y[:20])
    np.savez(tmp / "range.npz", x=x * 255.0, y=y)
    np.savez(tmp / "nhwc.npz", x=x.transpose(0, 2, 3, 1)[:, :, :, :1].repeat(3, axis=3), y=y)
    np.save(tmp / "single.npy", x)
    np.savez(tmp / "one_class.npz", x=x, y=np.full_like(y, 7))
    np.savez(tmp / "blank.npz", x=np.full_like(x, 0.5), y=y)
    os.mkfifo(tmp / "clean.fifo")  # reading it would block forever
    fifo_folder = tmp / "fifo_png"
    (fifo_folder / "0").mkdir(parents=True)
    os.mkfifo(fifo_folder / "0" / "a.png")
    return {
        "one_class": ({"--clean": str(tmp / "one_class.npz")}, ["one_class.npz", "all 300 images are labelled class"]),
        "blank_images": ({"--clean": str(tmp / "blank.npz")}, ["blank.npz", "pixel values barely vary"]),
        "fifo_clean": ({"--clean": str(tmp / "clean.fifo")}, ["clean.fifo: a FIFO (named pipe), not a regular file"]),
        "fifo_image": ({"--clean": str(fifo_folder)}, ["a.png: a FIFO (named pipe), not a regular file"]),
        "labels_beyond_classes": (
            {"--clean": str(tmp / "labels.npz")},
            ["labels.npz", "labels span [0, 12]", "3 label"],
        ),
        "head_size": ({"--num-classes": "5"}, ["classifier head", "10 outputs", "--num-classes is 5"]),
        "input_size": ({"--input-shape": "1,28,28"}, ["clean.npz", "x has shape (300, 1, 16, 16)", "1,28,28"]),
        "input_channels": ({"--input-shape": "3,32,32"}, ["first layer", "1 input channel", "--input-shape has 3"]),
        "rgb_data_grey_model": ({"--clean": str(tmp / "nhwc.npz")}, ["nhwc.npz", "(300, 16, 16, 3)", "1,16,16"]),
        "bad_shape_text": ({"--input-shape": "16,16"}, ["--input-shape '16,16'", "C,H,W"]),
        "weights_of_another_net": (
            {"--weights": str(tmp / "other.safetensors")},
            ["does not match --architecture small_cnn", "1 tensor(s) missing (first: body.4.weight)", "extra.weight"],
        ),
        "conv_width": (
            {"--weights": str(tmp / "wide.safetensors")},
            ["does not match", "body.3.weight is (64, 32, 3, 3) where the architecture has (32, 32, 3, 3)"],
        ),
        "unknown_architecture": ({"--architecture": "vgg99"}, ["unknown architecture 'vgg99'", "small_cnn"]),
        "torch_save_pickle": ({"--weights": str(tmp / "model.pt")}, ["model.pt", "torch.save", "never unpickles"]),
        "plain_pickle": ({"--weights": str(tmp / "model.pkl")}, ["model.pkl", "a Python pickle"]),
        "not_safetensors": ({"--weights": str(tmp / "notes.safetensors")}, ["notes.safetensors", "not a safetensors"]),
        "object_arrays": ({"--clean": str(tmp / "objects.npz")}, ["objects.npz", "Python objects", "never unpickles"]),
        "pixel_range": ({"--clean": str(tmp / "range.npz")}, ["range.npz", "float pixels span [0, 255]"]),
        "npy_not_npz": ({"--clean": str(tmp / "single.npy")}, ["single.npy", "np.savez(f, x=x, y=y)"]),
        "too_few_images": ({"--clean": str(tmp / "few.npz")}, ["few.npz", "20 clean images are too few", "at least"]),
        "missing_weights": ({"--weights": str(tmp / "nope.safetensors")}, ["nope.safetensors", "no such file"]),
        "missing_clean": ({"--clean": str(tmp / "nope.npz")}, ["nope.npz", "no such file or folder"]),
        "missing_recipe": ({"--recipe": str(tmp / "nope.yaml")}, ["nope.yaml", "no recipe"]),
        "unknown_detector": ({"--detector": "strip"}, ["no robust defaults for detector 'strip'", "badexpert"]),
        "heldout_fraction": ({"--heldout-fraction": "1.5"}, ["--heldout-fraction 1.5", "(0, 1)"]),
        "std_not_positive": ({"--mean": "0.3", "--std": "0"}, ["--std 0.0", "> 0"]),
    }


def test_bad_inputs_fail_before_any_work(user: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    cases = bad_inputs(user, tmp_path)
    for case, (overrides, expected) in cases.items():
        out = tmp_path / f"bundle-{case}"
        args = fit_args(user, out, **overrides)
        start = time.perf_counter()
        assert main(args) == 2, case
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err
        assert err.startswith("bdx-study: error: ") and err.count("\n") == 1, (case, err)
        for text in expected:
            assert text in err, (case, text, err)
        assert not out.exists(), case  # nothing written
        assert seconds < 5, (case, seconds)  # refused before any fitting
    assert not (tmp_path / "UNPICKLED").exists()


def test_existing_bundle_needs_force(user: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "bdx-study/detector"}))
    assert main(fit_args(user, out)) == 2
    assert "already holds a detector bundle; pass --force" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert main(fit_args(user, tmp_path / "mine")) == 2
    assert "is not a detector bundle" in capsys.readouterr().err


def test_a_pickle_through_the_real_command(user: dict[str, Any], tmp_path: Path) -> None:
    """The installed entry point: one line on stderr, exit code 2, no traceback."""
    torch.save(user["model"].state_dict(), tmp_path / "model.pt")
    args = fit_args(user, tmp_path / "bundle", **{"--weights": str(tmp_path / "model.pt")})
    p = subprocess.run([sys.executable, "-m", "bdx_study.cli", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr and p.stderr.startswith("bdx-study: error: --weights")
    assert not (tmp_path / "bundle").exists()
