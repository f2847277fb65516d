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
