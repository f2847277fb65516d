"""Property-based tests (hypothesis) of the two loaders that take a user's files: the study-file
loader and detect's input loader. Arbitrary bytes, arbitrary YAML and arbitrary arrays give a
valid result or one clear error, within bounded time and memory: never another exception."""

from __future__ import annotations

import copy
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bdx_study.detector import BundleError, Detector, InputError, load_input_array
from bdx_study.space import SpaceError, StudySpec, load_space

from .test_space import PINNED

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TIME_LIMIT_S = 5.0

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=12), inner, max_size=5)),
    max_leaves=30,
)


def _load(text: bytes) -> StudySpec | None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "study.yaml"
        p.write_bytes(text)
        t = time.perf_counter()
        try:
            return load_space(p)
        except SpaceError as e:
            assert str(p) in str(e)  # the message names the file
            assert len(str(e)) < 20_000
            return None
        finally:
            assert time.perf_counter() - t < TIME_LIMIT_S


@SETTINGS
@given(st.binary(max_size=2000))
def test_study_loader_on_arbitrary_bytes(data: bytes) -> None:
    _load(data)


@SETTINGS
@given(json_like)
def test_study_loader_on_arbitrary_yaml(doc: Any) -> None:
    _load(yaml.safe_dump(doc).encode())


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


BASE = yaml.safe_load(PINNED)
PATHS = [p for p in _paths(BASE) if p]


@SETTINGS
@given(st.sampled_from(PATHS), json_like)
def test_study_loader_on_a_valid_file_with_one_value_replaced(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(BASE)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _load(yaml.safe_dump(doc).encode())


# ------------------------------------------------------------------------------ detect's input loader


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    from bdx_study.detectors import create_detector

    from .test_detector import _save

    return Detector.load(_save(tmp_path_factory.mktemp("bundle") / "b", create_detector("badexpert"), 0.0))


def _detect(detector: Detector, raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.npy"
        p.write_bytes(raw)
        t = time.perf_counter()
        try:
            x = load_input_array(p)
            d_ = detector.detect(np.array(x))
            assert len(d_.score) == len(d_.flagged) and np.isfinite(d_.score).all()
        except (InputError, BundleError) as e:
            assert str(e)
        finally:
            assert time.perf_counter() - t < TIME_LIMIT_S


dtypes = st.one_of(
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.boolean_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.unicode_string_dtypes(max_len=4),
    hnp.byte_string_dtypes(max_len=4),
    hnp.datetime64_dtypes(),
)
shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=5, max_side=4),
    st.tuples(st.integers(0, 3), st.just(1), st.just(16), st.just(16)),
    st.tuples(st.integers(0, 3), st.just(16), st.just(16)),
)


@SETTINGS
@given(hnp.arrays(dtype=dtypes, shape=shapes))
def test_detect_on_arbitrary_arrays(detector: Detector, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    _detect(detector, buf.getvalue())


@SETTINGS
@given(st.binary(max_size=3000))
def test_detect_on_arbitrary_bytes(detector: Detector, data: bytes) -> None:
    _detect(detector, data)


@SETTINGS
@given(st.binary(max_size=1200))
def test_detect_on_npy_magic_then_arbitrary_bytes(detector: Detector, data: bytes) -> None:
    _detect(detector, b"\x93NUMPY" + data)


# ------------------------------------------------------------------------------ recipes (fit, export)

RECIPE = yaml.safe_load(
    yaml.safe_dump(
        {
            "study": "tiny",
            "default_detector": "badexpert",
            "domain": {
                "datasets": ["digits"],
                "architectures": ["small_cnn"],
                "attacks": ["badnet"],
                "input_shapes": [[1, 16, 16]],
                "num_classes": [10],
            },
            "made_from": {"trials": 2, "refits": 1, "heldout": 0},
            "detectors": {
                "badexpert": {
                    "defaults": {"unlearn_lr": 5e-4, "unlearn_epochs": 2, "aux_lr": 0.1, "aux_epochs": 4},
                    "protocol": {"clean_set_size": 200, "calibration_fraction": 0.5, "target_fpr": 0.1},
                    "selection": {"chosen_trial": "t0001"},
                    "seed_policy": {"seed": 1, "clean_set_seed": 3},
                    "evidence": {
                        "held_out": {
                            "folds": [
                                {
                                    "held_out": "attack=blend",
                                    "held_out_worst_auroc_correct_only": 0.9,
                                    "strictly_held_out": True,
                                }
                            ]
                        }
                    },
                }
            },
        }
    )
)
RECIPE_PATHS = [p for p in _paths(RECIPE) if p]


def _recipe(text: bytes) -> None:
    """Everything fit reads from a recipe before any work: the family, its parameters and protocol,
    the domain check and the unchecked-trigger line. A valid result or one clear error."""
    from bdx_study.analysis.domain import check_domain, unseen_triggers
    from bdx_study.analysis.recipe import Recipe
    from bdx_study.detectors import create_detector

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "recipe.yaml"
        p.write_bytes(text)
        t = time.perf_counter()
        try:
            recipe = Recipe.load(p)
            family, entry = recipe.family(None)
            params, _ = entry.config()
            create_detector(family, params)
            check_domain(recipe, architecture="small_cnn", input_shape=(1, 16, 16), num_classes=10, detector=family)
            assert unseen_triggers(recipe, family).startswith("unchecked:")
        except (SpaceError, ValueError) as e:
            assert str(p) in str(e) and len(str(e).splitlines()) == 1, str(e)
        finally:
            assert time.perf_counter() - t < TIME_LIMIT_S


@SETTINGS
@given(st.binary(max_size=2000))
def test_recipe_loader_on_arbitrary_bytes(data: bytes) -> None:
    _recipe(data)


@SETTINGS
@given(json_like)
def test_recipe_loader_on_arbitrary_yaml(doc: Any) -> None:
    _recipe(yaml.safe_dump(doc).encode())


@SETTINGS
@given(st.sampled_from(RECIPE_PATHS), json_like)
def test_recipe_loader_on_a_valid_recipe_with_one_value_replaced(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(RECIPE)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _recipe(yaml.safe_dump(doc).encode())


# ------------------------------------------------------------------------------ fit's --clean: .npz and folders


def _clean(path: Path) -> None:
    from bdx_study.userfiles import UserFileError, check_classes, load_clean

    t = time.perf_counter()
    try:
        data = load_clean(path, (1, 16, 16), 10)
        assert data.x.shape[1:] == (1, 16, 16) and len(data.x) == len(data.y)
        assert float(data.x.min()) >= 0 and float(data.x.max()) <= 1
        check_classes(data, 10, path)
    except UserFileError as e:
        assert str(path) in str(e) or path.name in str(e), str(e)
        assert len(str(e).splitlines()) == 1, str(e)
    finally:
        assert time.perf_counter() - t < TIME_LIMIT_S


@SETTINGS
@given(st.binary(max_size=3000))
def test_clean_npz_on_arbitrary_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "clean.npz"
        p.write_bytes(b"PK" + data if data[:1] == b"\x00" else data)
        _clean(p)


@SETTINGS
@given(hnp.arrays(dtype=dtypes, shape=shapes), hnp.arrays(dtype=dtypes, shape=hnp.array_shapes(max_dims=2, max_side=5)))
def test_clean_npz_on_arbitrary_arrays(x: np.ndarray, y: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "clean.npz"
        np.savez(p, x=x, y=y)
        _clean(p)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["0", "1", "cat", ".hidden"]),
            st.sampled_from([".png", ".jpg", ".txt"]),
            st.binary(max_size=600),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_clean_folder_of_arbitrary_files(files: list[tuple[str, str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "clean"
        for i, (label, suffix, data) in enumerate(files):
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / f"{i}{suffix}").write_bytes(data)
        _clean(root)


# ------------------------------------------------------------------------------ bundles (detect, Detector.load)


def _resign(bundle: Path, manifest: Any) -> None:
    """Write ``manifest`` with its hashes recomputed, as anyone can: what hashes cannot vouch for."""
    import json

    from bdx_study._io import sha256_file, sha256_json
    from bdx_study.detector import DECISION_FIELDS, OPTIONAL_DECISION_FIELDS

    if isinstance(manifest, dict):
        sha = manifest.get("sha256")
        if isinstance(sha, dict):
            for name in list(sha):
                f = bundle / str(name)
                if isinstance(name, str) and "/" not in name and f.is_file():
                    sha[name] = sha256_file(f)
        if all(k in manifest for k in DECISION_FIELDS):
            fields = (*DECISION_FIELDS, *(k for k in OPTIONAL_DECISION_FIELDS if k in manifest))
            manifest["decision_sha256"] = sha256_json({k: manifest[k] for k in fields})
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def bundle_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    from bdx_study.detectors import create_detector

    from .test_detector import _save

    path = _save(tmp_path_factory.mktemp("bundle") / "b", create_detector("badexpert"), 0.0)
    return {p.name: p.read_bytes() for p in path.iterdir()}


def _load_bundle(files: dict[str, bytes], manifest: Any = None, replace: dict[str, bytes] | None = None) -> None:
    import json

    with tempfile.TemporaryDirectory() as d:
        bundle = Path(d) / "b"
        bundle.mkdir()
        for name, data in {**files, **(replace or {})}.items():
            (bundle / name).write_bytes(data)
        _resign(bundle, json.loads(files["manifest.json"]) if manifest is None else manifest)
        t = time.perf_counter()
        try:
            det = Detector.load(bundle)
            out = det.detect(np.zeros((2, 1, 16, 16), dtype=np.float32))
            assert len(out.flagged) == 2
        except BundleError as e:
            assert str(e) and len(str(e).splitlines()) == 1, str(e)
        finally:
            assert time.perf_counter() - t < TIME_LIMIT_S


MANIFEST_KEYS = [
    "detector",
    "params",
    "threshold",
    "components",
    "architecture",
    "input_shape",
    "num_classes",
    "normalization",
    "format_version",
    "reference",
    "model_file",
    "sha256",
]


@SETTINGS
@given(st.sampled_from(MANIFEST_KEYS), json_like)
def test_bundle_with_one_manifest_value_replaced_and_resigned(
    bundle_files: dict[str, bytes], key: str, value: Any
) -> None:
    import json

    manifest = json.loads(bundle_files["manifest.json"])
    manifest[key] = value
    _load_bundle(bundle_files, manifest)


@SETTINGS
@given(json_like)
def test_bundle_with_an_arbitrary_manifest(bundle_files: dict[str, bytes], manifest: Any) -> None:
    _load_bundle(bundle_files, manifest)


@SETTINGS
@given(st.sampled_from(["model.safetensors", "expert.safetensors", "auxiliary.safetensors"]), st.binary(max_size=2000))
def test_bundle_with_arbitrary_weight_bytes_resigned(bundle_files: dict[str, bytes], name: str, data: bytes) -> None:
    _load_bundle(bundle_files, None, {name: data})
