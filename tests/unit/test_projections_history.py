"""The history projection: entries per key and the namespace audit."""

from __future__ import annotations

import pytest

from events.types import Forget, Get, Maintain, Search, Store
from handlers.effects import Effect
from replay.projections import DatabaseNotFoundError, EventWithEffects, HistoryEntry, audit, history
from replay.projections.db import connect, create_core_tables, write_checkpoint, write_transaction
from replay.projections.history import history_projection


@pytest.fixture
def db_path(tmp_path):
    path = tmp_path / "projections.db"
    batch = [
        EventWithEffects(Store(id="s1", seq=1, ts=100, namespace="a", key="k", value="v"), ()),
        EventWithEffects(Get(id="g1", seq=2, ts=200, namespace="a", key="k"), (Effect(2, "read", "a", "k", tier="cache", client="g1"),)),
        EventWithEffects(
            Maintain(id="m1", seq=3, ts=300),
            (
                Effect(3, "move", "a", "k", tier="stm", target="im", reason="idle"),
                Effect(3, "move", "a", "k", tier="im", target="ltm", reason="capacity"),
                Effect(3, "delete", "a", "other", tier="stm", reason="expired"),
            ),
        ),
        EventWithEffects(Get(id="g2", seq=4, ts=400, namespace="a", key="k"), (Effect(4, "read", "a", "k", tier="ltm", client="g2"),)),
        EventWithEffects(Search(id="q1", seq=5, ts=500, namespace="a", query="what is v"), ()),
        EventWithEffects(Forget(id="f1", seq=6, ts=600, namespace="a", key="k"), ()),
        EventWithEffects(Get(id="g3", seq=7, ts=700, namespace="a", key="k"), (Effect(7, "read", "a", "k", client="g3"),)),
        EventWithEffects(Forget(id="f2", seq=8, ts=800, namespace="a", key="never"), ()),
        EventWithEffects(Store(id="s2", seq=9, ts=900, namespace="b", key="k", value="v"), ()),
        EventWithEffects(
            Forget(id="f3", seq=10, ts=1000, namespace="b", key="k", expected_version=3),
            (Effect(10, "conflict", "b", "k", reason="3:1", client="f3"),),
        ),
        EventWithEffects(Forget(id="f4", seq=11, ts=1100, namespace="b", key="k"), ()),
    ]
    projection = history_projection()
    conn = connect(path)
    with write_transaction(conn):
        create_core_tables(conn)
        projection.setup(conn)
        projection.apply(conn, batch)
        write_checkpoint(conn, projection.name, 11, 1100)
    conn.close()
    return path


def test_history_of_one_key(db_path):
    entries = history(db_path, "a", "k")
    assert entries == [
        HistoryEntry(seq=1, position=0, ts=100, namespace="a", key="k", kind="store", tier="stm", request_id="s1"),
        HistoryEntry(seq=2, position=0, ts=200, namespace="a", key="k", kind="read", tier="cache", request_id="g1"),
        HistoryEntry(seq=3, position=0, ts=300, namespace="a", key="k", kind="move", tier="stm", target="im", reason="idle", request_id="m1"),
        HistoryEntry(seq=3, position=1, ts=300, namespace="a", key="k", kind="move", tier="im", target="ltm", reason="capacity", request_id="m1"),
        HistoryEntry(seq=4, position=0, ts=400, namespace="a", key="k", kind="read", tier="ltm", request_id="g2"),
        HistoryEntry(seq=6, position=0, ts=600, namespace="a", key="k", kind="forget", tier="ltm", request_id="f1"),
        HistoryEntry(seq=7, position=0, ts=700, namespace="a", key="k", kind="read", tier=None, request_id="g3"),
    ]


def test_history_delete_reason(db_path):
    (entry,) = history(db_path, "a", "other")
    assert (entry.kind, entry.tier, entry.reason) == ("delete", "stm", "expired")
    assert entry.position == 2


def test_history_forget_of_missing_key(db_path):
    (entry,) = history(db_path, "a", "never")
    assert (entry.kind, entry.tier) == ("forget", None)


def test_history_pages(db_path):
    first = history(db_path, "a", "k", limit=3)
    rest = history(db_path, "a", "k", after=(first[-1].seq, first[-1].position))
    assert [(e.seq, e.position) for e in first] == [(1, 0), (2, 0), (3, 0)]
    assert [(e.seq, e.position) for e in rest] == [(3, 1), (4, 0), (6, 0), (7, 0)]


def test_history_namespaces_are_separate(db_path):
    assert [entry.seq for entry in history(db_path, "b", "k")] == [9, 10, 11]
    assert [entry.seq for entry in history(db_path, "a", "k")][0] == 1


def test_history_rejected_conditional_write(db_path):
    entries = history(db_path, "b", "k")
    assert [(e.kind, e.tier, e.reason, e.request_id) for e in entries] == [
        ("store", "stm", None, "s2"),
        ("conflict", None, "3:1", "f3"),
        ("forget", "stm", None, "f4"),
    ]


def test_audit_since_ts(db_path):
    entries = audit(db_path, "a", 500)
    assert [(e.seq, e.kind, e.key) for e in entries] == [(5, "search", None), (6, "forget", "k"), (7, "read", "k"), (8, "forget", "never")]
    assert entries[0].query is None  # the Forget at seq 6 cleared it


def test_audit_every_namespace(db_path):
    assert [e.seq for e in audit(db_path, None, 800)] == [8, 9, 10, 11]
    assert [e.seq for e in audit(db_path, None, 0, limit=2)] == [1, 2]


def test_history_missing_database(tmp_path):
    with pytest.raises(DatabaseNotFoundError):
        history(tmp_path / "absent.db", "a", "k")


def apply_batch(path, batch, end_seq, end_ts):
    projection = history_projection()
    conn = connect(path)
    with write_transaction(conn):
        projection.apply(conn, batch)
        write_checkpoint(conn, projection.name, end_seq, end_ts)
    conn.close()


def test_history_forget_namespace(db_path):
    apply_batch(
        db_path,
        [
            EventWithEffects(Store(id="s3", seq=12, ts=1200, namespace="a", key="k", value="v"), ()),
            EventWithEffects(Forget(id="f5", seq=13, ts=1300, namespace="a"), ()),
            EventWithEffects(Store(id="s4", seq=14, ts=1400, namespace="a", key="k", value="v"), ()),
            EventWithEffects(Forget(id="f6", seq=15, ts=1500, namespace="a", key="k"), ()),
        ],
        15,
        1500,
    )

    assert audit(db_path, "a", 0) == [
        HistoryEntry(seq=13, position=0, ts=1300, namespace="a", key=None, kind="forget", request_id="f5"),
        HistoryEntry(seq=14, position=0, ts=1400, namespace="a", key="k", kind="store", tier="stm", request_id="s4"),
        HistoryEntry(seq=15, position=0, ts=1500, namespace="a", key="k", kind="forget", tier="stm", request_id="f6"),
    ]
    assert [entry.seq for entry in history(db_path, "b", "k")] == [9, 10, 11]


def test_history_keeps_no_values(tmp_path):
    path = tmp_path / "projections.db"
    projection = history_projection()
    conn = connect(path)
    with write_transaction(conn):
        create_core_tables(conn)
        projection.setup(conn)
    conn.close()
    value = {"text": "qzvmarker7731", "list": ["qzvmarker7731"]}

    apply_batch(
        path,
        [
            EventWithEffects(Store(id="s1", seq=1, ts=100, namespace="a", key="k", value=value, tags=["t"]), ()),
            EventWithEffects(Get(id="g1", seq=2, ts=200, namespace="a", key="k"), (Effect(2, "read", "a", "k", tier="cache", client="g1"),)),
        ],
        2,
        200,
    )

    conn = connect(path)
    try:
        rows = conn.execute("SELECT * FROM history").fetchall() + conn.execute("SELECT * FROM history_tiers").fetchall()
    finally:
        conn.close()
    assert len(rows) == 3
    assert [row for row in rows if any("qzvmarker7731" in str(column) for column in row)] == []


def test_history_query_cleared_by_forget(tmp_path):
    path = tmp_path / "projections.db"
    projection = history_projection()
    conn = connect(path)
    with write_transaction(conn):
        create_core_tables(conn)
        projection.setup(conn)
    conn.close()
    first = [
        EventWithEffects(Search(id="q1", seq=1, ts=100, namespace="a", query="find qzvmarker7731"), ()),
        EventWithEffects(Search(id="q2", seq=2, ts=200, namespace="b", query="other namespace"), ()),
    ]
    apply_batch(path, first, 2, 200)
    kept = audit(path, None, 0)

    rejected = Forget(id="f1", seq=3, ts=300, namespace="a", key="k", expected_version=2)
    apply_batch(path, [EventWithEffects(rejected, (Effect(3, "conflict", "a", "k", reason="2:0", client="f1"),))], 3, 300)
    after_rejected = audit(path, None, 0)
    apply_batch(path, [EventWithEffects(Forget(id="f2", seq=4, ts=400, namespace="a", key="k"), ())], 4, 400)
    after_forget = audit(path, None, 0)

    assert [entry.query for entry in kept] == ["find qzvmarker7731", "other namespace"]
    assert [entry.query for entry in after_rejected][:2] == ["find qzvmarker7731", "other namespace"]
    assert [(entry.seq, entry.kind, entry.query) for entry in after_forget] == [
        (1, "search", None),
        (2, "search", "other namespace"),
        (3, "conflict", None),
        (4, "forget", None),
    ]
