"""Parquet tables: declared schemas, atomic writes, one row set per trial, consolidation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bdx_study.detectors import DETECTORS
from bdx_study.schema import SCHEMA_VERSION, rows_to_table, scores_schema, scores_table, trials_schema, victims_schema
from bdx_study.tables import StudyTables, write_table_atomic


def _scores(trial: str, n: int) -> pa.Table:
    samples = {
        "split": np.array(["evaluation"] * n, dtype=object),
        "triggered": np.array([i % 2 == 1 for i in range(n)]),
        "sample_index": np.arange(n),
        "label": np.zeros(n, dtype=np.int64),
        "attack_label": np.full(n, -1),
        "pred": np.zeros(n, dtype=np.int64),
        "score": np.arange(n, dtype=np.float64),
        "flagged": np.array([i % 2 == 0 for i in range(n)]),
        "entropy": np.ones(n),
    }
    return scores_table(trial, "v", "strip", samples)


def _rows(trial: str, auroc: float, victims: int = 2) -> list[dict[str, object]]:
    return [
        {
            "trial_id": trial,
            "detector": "badexpert",
            "victim_id": f"v{i}",
            "unlearn_lr": 1e-3,
            "unlearn_epochs": 2,
            "auroc_correct_only": auroc,
        }
        for i in range(victims)
    ]


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_write_table_atomic_leaves_no_tmp(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "t.parquet"
    t1 = pa.table({"a": [1, 2, 3]})
    write_table_atomic(t1, path)
    assert pq.read_table(path).equals(t1)
    t2 = pa.table({"a": [4], "b": ["x"]})
    write_table_atomic(t2, path)  # replaces
    assert pq.read_table(path).equals(t2)
    assert [p.name for p in _all_files(tmp_path)] == ["t.parquet"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_table_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    old = pa.table({"a": [1]})
    write_table_atomic(old, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises for a non-table
        write_table_atomic("not a table", path)  # type: ignore[arg-type]
    assert pq.read_table(path).equals(old)
    assert [p.name for p in _all_files(tmp_path)] == ["t.parquet"]


def test_schemas_are_declared() -> None:
    """Column types come from the declared schema, not from the first row."""
    schema = trials_schema()
    assert schema.metadata[b"bdx.schema_version"] == SCHEMA_VERSION.encode()
    assert schema.field("unlearn_lr").type == pa.float64()
    assert schema.field("unlearn_epochs").type == pa.int64()
    assert schema.field("unlearn_steps").type == pa.int64()  # int | None
    assert schema.field("aux_milestones").type == pa.string()  # a list, as JSON text
    assert schema.field("augment").type == pa.bool_()
    assert schema.field("score_kind").type == pa.string()
    assert schema.field("clean_set_size").type == pa.int64()
    assert schema.field("auroc_correct_only").type == pa.float64()
    assert schema.field("selection_auroc_correct_only").type == pa.float64()
    assert schema.field("detector").type == pa.string()
    # every registered family's parameters and extra columns have a column
    for name in DETECTORS.names():
        cls = DETECTORS.get(name)
        assert set(cls.Params.model_fields) <= set(schema.names), name
        assert set(cls.extra_columns) <= set(scores_schema().names), name
        assert set(cls.diagnostics) <= set(schema.names), name
    assert "clean_acc" in victims_schema().names


def test_rows_to_table_follows_the_schema() -> None:
    # a first row with an int where the schema says float, and a missing value
    rows = [{"trial_id": "t", "auroc_correct_only": 1, "unlearn_lr": None}, {"trial_id": "u", "unlearn_epochs": 3}]
    t = rows_to_table(rows, trials_schema())
    assert t.schema.field("auroc_correct_only").type == pa.float64()
    assert t.column("auroc_correct_only").to_pylist() == [1.0, None]
    assert t.column("unlearn_epochs").to_pylist() == [None, 3]
    with pytest.raises(KeyError, match="not in the declared schema"):
        rows_to_table([{"trial_id": "t", "no_such_column": 1}], trials_schema())


def test_write_trial_twice_keeps_one_row_set(tmp_path: Path) -> None:
    st = StudyTables(tmp_path / "study")
    st.write_trial("t1", _rows("t1", 0.5), _scores("t1", 5))
    st.write_trial("t1", _rows("t1", 0.9), _scores("t1", 3))  # a retried trial
    trials = st.read("trials")
    assert trials.num_rows == 2
    assert trials.column("auroc_correct_only").to_pylist() == [0.9, 0.9]
    assert st.read("scores").num_rows == 3
    assert st.finished_trials() == {"t1"}
    assert not list((tmp_path / "study").rglob("*.tmp"))
    assert sorted(p.name for p in _all_files(st.root)) == ["t1.parquet", "t1.parquet"]


def test_finished_trials_and_read_errors(tmp_path: Path) -> None:
    st = StudyTables(tmp_path)
    assert st.finished_trials() == set()
    with pytest.raises(FileNotFoundError, match="no trials tables"):
        st.read("trials")
    st.write_trial("a_00001", _rows("a_00001", 0.7), _scores("a_00001", 2))
    st.write_trial("a_00002", _rows("a_00002", 0.8), _scores("a_00002", 2))
    assert st.finished_trials() == {"a_00001", "a_00002"}
    assert st.part("trials", "a_00001") == tmp_path / "tables" / "parts" / "trials" / "a_00001.parquet"


def test_consolidate_merges(tmp_path: Path) -> None:
    st = StudyTables(tmp_path)
    assert st.consolidate() == {}
    st.write_trial("t1", _rows("t1", 0.5, victims=2), _scores("t1", 4))
    st.write_trial("t2", _rows("t2", 0.6, victims=3), _scores("t2", 1))
    # a later trial that sets another column: the merge keeps both (missing values are null)
    extra = [{**r, "aux_lr": 0.05} for r in _rows("t3", 0.7, victims=1)]
    st.write_trial("t3", extra, _scores("t3", 2))
    st.write_trial("t2", _rows("t2", 0.65, victims=3), _scores("t2", 1))  # retried: replaced
    out = st.consolidate()
    assert set(out) == {"trials", "scores"}
    trials = pq.read_table(out["trials"])
    scores = pq.read_table(out["scores"])
    assert out["trials"] == tmp_path / "tables" / "trials.parquet"
    assert trials.num_rows == 2 + 3 + 1
    assert scores.num_rows == 4 + 1 + 2
    ids = trials.column("trial_id").to_pylist()
    assert sorted(ids) == ["t1", "t1", "t2", "t2", "t2", "t3"]
    by_trial = dict(zip(ids, trials.column("auroc_correct_only").to_pylist(), strict=True))
    assert by_trial == {"t1": 0.5, "t2": 0.65, "t3": 0.7}
    assert trials.column("aux_lr").to_pylist().count(None) == 5
    assert trials.equals(st.read("trials"))
    assert not list(tmp_path.rglob("*.tmp"))
    # consolidating again is idempotent
    st.consolidate()
    assert pq.read_table(out["trials"]).num_rows == 6


def test_write_victims(tmp_path: Path) -> None:
    st = StudyTables(tmp_path)
    st.write_victims([{"victim_id": "abc", "clean_acc": 0.9, "attack_success": float("nan")}])
    t = pq.read_table(tmp_path / "tables" / "victims.parquet")
    assert t.num_rows == 1 and t.column("victim_id").to_pylist() == ["abc"]
    assert t.schema.field("victim_seed").type == pa.int64()
