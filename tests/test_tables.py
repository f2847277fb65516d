"""Parquet tables: atomic writes, one row set per trial, consolidation."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bdx_study.tables import SCHEMA_VERSION, StudyTables, rows_to_table, write_table_atomic


def _scores(trial: str, n: int) -> pa.Table:
    return pa.table(
        {"trial_id": [trial] * n, "score": [float(i) for i in range(n)], "flagged": [i % 2 == 0 for i in range(n)]}
    )


def _rows(trial: str, auroc: float, victims: int = 2) -> list[dict[str, object]]:
    return [
        {"trial_id": trial, "victim": f"v{i}", "unlearn_lr": 1e-3, "unlearn_epochs": 2, "auroc_correct_only": auroc}
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


def test_rows_to_table_types_and_metadata() -> None:
    t = rows_to_table(
        [{"a": 1, "b": 0.5, "c": "x", "d": True, "e": 2}, {"a": 2, "b": None, "c": "y", "d": False, "f": 1.5}],
        metadata={"study": "s"},
    )
    assert t.num_rows == 2
    assert t.column_names == ["a", "b", "c", "d", "e", "f"]
    assert t.schema.field("b").type == pa.float64()  # a metric with a missing value stays float
    assert t.column("b").to_pylist() == [0.5, None]
    assert t.schema.field("a").type == pa.int64()  # ints stay ints
    assert t.schema.field("d").type == pa.bool_()
    assert t.schema.field("c").type == pa.string()
    assert t.column("f").to_pylist() == [None, 1.5]
    meta = t.schema.metadata
    assert meta[b"bdx.schema_version"] == SCHEMA_VERSION.encode() and meta[b"study"] == b"s"


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
    # a later trial with an extra column: the merge keeps both (missing values are null)
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
    st.write_victims([{"key": "abc", "clean_acc": 0.9, "attack_success": float("nan")}])
    t = pq.read_table(tmp_path / "tables" / "victims.parquet")
    assert t.num_rows == 1 and t.column("key").to_pylist() == ["abc"]
