"""Plugins named by a study file (``study.plugins``) or by an installed entry point: the user's
registrations are seen by ``validate`` and by a launch's Ray workers; a module that fails to
import, or registers a name that exists, is one clear error naming the file, the key, the
module and the cause."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from bdx_study.space import SpaceError, parse_space

from .conftest import tiny_study, write_study

# A user's attack and detector family: BadNet and STRIP under new names, registered on import.
PLUGIN = """
from bdx_study.attacks import ATTACKS, register_attack
from bdx_study.detectors import DETECTORS, register_detector


@register_attack("plugin_badnet")
class PluginBadNet(ATTACKS.get("badnet")):
    '''BadNet under a user's name.'''


@register_detector("plugin_strip")
class PluginStrip(DETECTORS.get("strip")):
    '''STRIP under a user's name.'''
"""


def _plugin_study(tmp: Path, plugins: Any, **overrides: Any) -> dict[str, Any]:
    doc = tiny_study(tmp, **overrides)
    doc["study"]["plugins"] = plugins
    return doc


def _uses_the_plugin(doc: dict[str, Any]) -> dict[str, Any]:
    doc["victims"]["attacks"] = [{"name": "plugin_badnet", "poison_rate": 0.1}]
    doc["detectors"] = {"plugin_strip": {"num_images": 8}}
    doc["search"]["num_trials"] = 1
    return doc


def _run_cli(*args: str, cwd: Path, pythonpath: Path, timeout: float = 600) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "bdx_study.cli", *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def test_validate_sees_a_study_files_plugins(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_zoo.py").write_text(PLUGIN)
    path = write_study(tmp_path, _uses_the_plugin(_plugin_study(tmp_path, ["my_zoo"])))
    code, out = _run_cli("validate", "--space", str(path), cwd=tmp_path, pythonpath=tmp_path / "plugins")
    assert code == 0 and "OK" in out and "plugin_strip (1 trial(s)" in out, out
    # without the plugins key, the same names are unknown: the module is what registered them
    path = write_study(tmp_path, _uses_the_plugin(tiny_study(tmp_path)), "no_plugins.yaml")
    code, out = _run_cli("validate", "--space", str(path), cwd=tmp_path, pythonpath=tmp_path / "plugins")
    assert code == 2 and "unknown attack 'plugin_badnet'" in out and "Traceback" not in out, out


def test_an_installed_entry_point_registers_without_the_key(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "zoo_dist-1.0.dist-info").mkdir(parents=True)
    (site / "zoo_dist-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: zoo-dist\nVersion: 1.0\n")
    (site / "zoo_dist-1.0.dist-info" / "entry_points.txt").write_text("[bdx_study.plugins]\nzoo = ep_zoo\n")
    (site / "ep_zoo.py").write_text(PLUGIN)
    path = write_study(tmp_path, _uses_the_plugin(tiny_study(tmp_path)))
    code, out = _run_cli("validate", "--file-only", "--space", str(path), cwd=tmp_path, pythonpath=site)
    assert code == 0 and "OK" in out, out
    code, out = _run_cli("list", cwd=tmp_path, pythonpath=site)
    assert code == 0 and "plugin_badnet" in out and "detector plugin_strip" in out, out


def test_a_broken_entry_point_is_one_clear_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "bad_dist-1.0.dist-info").mkdir(parents=True)
    (site / "bad_dist-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-dist\nVersion: 1.0\n")
    (site / "bad_dist-1.0.dist-info" / "entry_points.txt").write_text("[bdx_study.plugins]\nbad = bad_zoo\n")
    (site / "bad_zoo.py").write_text("raise ImportError('needs a GPU build')\n")
    path = write_study(tmp_path, tiny_study(tmp_path))
    code, out = _run_cli("validate", "--file-only", "--space", str(path), cwd=tmp_path, pythonpath=site)
    expected = "entry point 'bad' (bad_zoo, group bdx_study.plugins) could not be loaded (ImportError: needs a GPU"
    assert code == 2 and f"{path}: {expected}" in out and "Traceback" not in out, out


def _parse_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins: Any, modules: dict[str, str]) -> str:
    """The SpaceError of a study file naming ``plugins`` (``modules``: name -> source, importable)."""
    for name, source in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpaceError) as e:
        parse_space(_plugin_study(tmp_path, plugins), "study.yaml")
    return str(e.value)


def test_a_module_that_fails_to_import_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    msg = _parse_with(tmp_path, monkeypatch, ["broken_zoo_1"], {"broken_zoo_1": "raise RuntimeError('no GPU here')"})
    assert msg == "study.yaml: study.plugins: module 'broken_zoo_1' could not be imported (RuntimeError: no GPU here)"
    msg = _parse_with(tmp_path, monkeypatch, ["no_such_zoo"], {})
    assert msg.startswith("study.yaml: study.plugins: module 'no_such_zoo' could not be imported (ModuleNotFoundError")
    assert "installed, or on PYTHONPATH" in msg


def test_a_module_that_registers_an_existing_name_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dup_attack = """
        from bdx_study.attacks import ATTACKS, register_attack


        @register_attack("badnet")
        class Mine(ATTACKS.get("blend")):
            "A user's attack under a built-in's name."
    """
    msg = _parse_with(tmp_path, monkeypatch, ["dup_zoo_attack"], {"dup_zoo_attack": dup_attack})
    assert msg.startswith("study.yaml: study.plugins: module 'dup_zoo_attack' could not be imported (ValueError: ")
    assert "attack 'badnet' is registered twice" in msg
    dup_dataset = """
        from bdx_study.data import DatasetInfo, register_dataset
        register_dataset(DatasetInfo("digits", (1, 8, 8), 10, (0.5,), (0.5,), 0, False))(lambda root, download: None)
    """
    msg = _parse_with(tmp_path, monkeypatch, ["dup_zoo_data"], {"dup_zoo_data": dup_dataset})
    assert "module 'dup_zoo_data'" in msg and "'digits' is registered twice" in msg


@pytest.mark.parametrize("plugins", ["my_zoo", ["my zoo"], [3], None])
def test_plugins_must_be_a_list_of_module_names(plugins: Any, tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match=r"study.yaml: study.plugins: a list of module names"):
        parse_space(_plugin_study(tmp_path, plugins), "study.yaml")


@pytest.mark.slow
def test_a_launch_trains_and_scores_with_a_study_files_plugins(tmp_path: Path) -> None:
    """`bdx-study launch` with the plugin on PYTHONPATH: the victim-training task and the trial
    (Ray workers) import it before they build the user's attack and family."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "launch_zoo.py").write_text(PLUGIN)
    doc = _uses_the_plugin(_plugin_study(tmp_path, ["launch_zoo"], resources={"cpu": 1, "gpu": 0}))
    doc["tracking"]["required"] = False
    path = write_study(tmp_path, doc)
    code, out = _run_cli("launch", "--space", str(path), cwd=tmp_path, pythonpath=tmp_path / "plugins")
    assert code == 0 and "1 trial(s) finished, 0 failed" in out, out[-4000:]
    tables = tmp_path / "runs" / "studies" / "tiny" / "tables"
    trials = pq.read_table(tables / "trials.parquet").to_pandas()
    assert list(trials["detector"]) == ["plugin_strip"] and list(trials["attack"]) == ["plugin_badnet"]
    assert trials["auroc_correct_only"].between(0, 1).all()


SAVE_PLUGIN_BUNDLE = """
import sys
import numpy as np
import torch
import my_zoo  # noqa: F401  (registers plugin_strip)
from bdx_study.archs import create_model
from bdx_study.data import dataset_info
from bdx_study.detector import save_bundle
from bdx_study.detectors import Fitted, create_detector

info = dataset_info("digits")
torch.manual_seed(0)
model = create_model("small_cnn", info.input_shape, info.num_classes, info.mean, info.std)
pool = torch.rand(8, *info.input_shape)
save_bundle(
    sys.argv[1], create_detector("plugin_strip", {"num_images": 8}), {"main": Fitted({"pool": pool}, {"pool_size": 8})},
    model, threshold=0.0, target_fpr=0.05, protocol={"clean_set_size": 100, "calibration_fraction": 0.5,
    "target_fpr": 0.05}, architecture="small_cnn", info=info, metrics={}, provenance={},
)
np.save(sys.argv[2], np.random.default_rng(0).random((5, *info.input_shape), dtype=np.float32))
"""


def test_detect_serves_a_plugin_familys_bundle_with_plugins(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_zoo.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(
        [sys.executable, "-c", SAVE_PLUGIN_BUNDLE, "bundle", "x.npy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    detect = ("detect", "--detector", "bundle", "--input", "x.npy")
    code, out = _run_cli(*detect, cwd=tmp_path, pythonpath=tmp_path / "plugins")
    assert code == 2 and "family 'plugin_strip' is not known" in out and "--plugins MODULE" in out, out
    code, out = _run_cli(*detect, "--plugins", "my_zoo", cwd=tmp_path, pythonpath=tmp_path / "plugins")
    assert code == 0 and len(out.strip().splitlines()) == 6, out  # a header and one line per input
    code, out = _run_cli(*detect, "--plugins", "no_such_zoo", cwd=tmp_path, pythonpath=tmp_path / "plugins")
    assert code == 2 and "module 'no_such_zoo' could not be imported" in out and "Traceback" not in out, out
