"""Forgotten values in the projection database: gone from its file and WAL."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from events.types import Forget, Get, Maintain, Search, Store
from handlers.effects import Effect
from replay.projections import EventWithEffects, audit, history, search, stats
from replay.projections import runner as runner_module
from replay.projections.db import connect, create_core_tables, write_transaction
from replay.projections.registry import builtin_projections
from replay.projections.runner import _apply_batch, _Progress

# Lowercase letters and digits, so the FTS5 index stores it as one term.
MARKER = "qzvmarker7731"
# FTS5 stores a term after the prefix it shares with the term before it, so
# the index may hold only this tail of the marker.
MARKER_TAIL = MARKER[-8:]


def files_with(directory: Path, needle: str) -> list[str]:
    """Return the names of the files under `directory` whose bytes contain `needle`."""
    encoded = needle.encode()
    return sorted(
        path.name
        for path in directory.rglob("*")
        if path.is_file() and encoded in path.read_bytes()
    )


def marker_files(directory: Path) -> list[str]:
    return sorted(
        set(files_with(directory, MARKER)) | set(files_with(directory, MARKER_TAIL))
    )


class Runner:
    """A driver that applies batches to the built-in projections as `run_projections` does."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.seq = 0
        self.projections = {p.name: p for p in builtin_projections()}
        self.conn = connect(db_path)
        with write_transaction(self.conn):
            create_core_tables(self.conn)
            for projection in self.projections.values():
                projection.setup(self.conn)
            # A large index merges its oldest segments rarely, so a deleted
            # document's words stay for long. Without automatic merges a
            # small test index keeps them the same way.
            self.conn.execute(
                "INSERT INTO search_fts (search_fts, rank) VALUES ('automerge', 0)"
            )

    def event(self, cls, **fields):
        self.seq += 1
        return cls(id=f"e{self.seq}", seq=self.seq, ts=1_000_000 + self.seq, **fields)

    def apply(self, *items: EventWithEffects | object) -> None:
        batch = [
            item if isinstance(item, EventWithEffects) else EventWithEffects(item, ())
            for item in items
        ]
        active = dict(self.projections)
        progress = {name: _Progress(name) for name in active}
        _apply_batch(self.conn, active, progress, batch)
        errors = {name: item.error for name, item in progress.items() if item.error}
        assert errors == {}

    def fill(self, namespace: str, count: int, batches: int) -> None:
        # Several batches, so the FTS5 index has several segments.
        for batch in range(batches):
            self.apply(
                *[
                    self.event(
                        Store,
                        namespace=namespace,
                        key=f"f{batch}-{i}",
                        value=f"filler {batch} {i}",
                    )
                    for i in range(count)
                ]
            )

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def db_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "projections"
    directory.mkdir()
    return directory


@pytest.fixture
def runner(db_dir: Path) -> Iterator[Runner]:
    built = Runner(db_dir / "projections.db")
    yield built
    built.close()


def marked_store(runner: Runner, namespace: str = "a", key: str = "k") -> Store:
    return runner.event(
        Store,
        namespace=namespace,
        key=key,
        value={"text": f"the secret is {MARKER}", "more": [f"{MARKER} again"]},
        tags=[f"tag{MARKER}"],
    )


def scrub_requests(db_path: Path) -> list[tuple]:
    with closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT id, seq FROM projection_scrub").fetchall()


def test_forget_key_leaves_no_marker(runner, db_dir):
    runner.fill("a", 50, 3)
    runner.apply(marked_store(runner))
    runner.fill("a", 50, 3)
    assert marker_files(db_dir) != []

    runner.apply(runner.event(Forget, namespace="a", key="k"))

    assert marker_files(db_dir) == []
    assert (db_dir / "projections.db-wal").stat().st_size == 0
    assert scrub_requests(runner.db_path) == []
    hits, _ = search(runner.db_path, "a", "filler", 100)
    assert len(hits) == 100


def test_forget_key_clears_marker_query(runner, db_dir):
    # The history keeps search queries, and a client may search for the value.
    runner.apply(
        marked_store(runner), runner.event(Search, namespace="a", query=MARKER)
    )
    runner.apply(runner.event(Store, namespace="a", key="other", value="kept words"))
    assert marker_files(db_dir) != []

    runner.apply(runner.event(Forget, namespace="a", key="k"))

    assert marker_files(db_dir) == []
    kinds = [entry.kind for entry in audit(runner.db_path, "a", 0)]
    assert kinds == ["store", "search", "store", "forget"]


def test_forget_after_overwrite_leaves_no_marker(runner, db_dir):
    # An overwrite leaves the old words in older FTS5 segments.
    runner.apply(marked_store(runner))
    runner.fill("a", 20, 2)
    runner.apply(runner.event(Store, namespace="a", key="k", value="harmless words"))
    assert marker_files(db_dir) != []

    runner.apply(runner.event(Forget, namespace="a", key="k"))

    assert marker_files(db_dir) == []


def test_forget_after_eviction_leaves_no_marker(runner, db_dir):
    # Maintenance already deleted the document, but its words stayed in the
    # FTS5 segments, so the Forget of a key the index lacks must merge too.
    runner.apply(marked_store(runner))
    runner.fill("a", 20, 2)
    maintain = runner.event(Maintain)
    runner.apply(
        EventWithEffects(
            maintain,
            (Effect(maintain.seq, "delete", "a", "k", tier="stm", reason="evicted"),),
        )
    )
    assert marker_files(db_dir) != []

    runner.apply(runner.event(Forget, namespace="a", key="k"))

    assert marker_files(db_dir) == []


def test_forget_in_batch_with_stores(runner, db_dir):
    runner.apply(
        marked_store(runner),
        runner.event(Store, namespace="a", key="other", value="kept words"),
        runner.event(Forget, namespace="a", key="k"),
        runner.event(Store, namespace="a", key="later", value="later words"),
    )

    assert marker_files(db_dir) == []
    assert [hit.key for hit in search(runner.db_path, "a", "words")[0]] == [
        "later",
        "other",
    ]


def test_forget_namespace_leaves_no_marker(runner, db_dir):
    runner.fill("a", 20, 2)
    runner.apply(marked_store(runner, key="one"), marked_store(runner, key="two"))
    # The query text is kept in the history, and contains the marker too.
    runner.apply(runner.event(Search, namespace="a", query=f"where is {MARKER}"))
    runner.fill("b", 20, 2)
    assert marker_files(db_dir) != []

    runner.apply(runner.event(Forget, namespace="a"))

    assert marker_files(db_dir) == []
    assert len(search(runner.db_path, "b", "filler", 100)[0]) == 40


def namespace_rows(db_path: Path, namespace: str) -> dict[str, int]:
    """Count the rows of `namespace` in every table that has a namespace column."""
    counts = {}
    with closing(sqlite3.connect(db_path)) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
            )
        ]
        for table in tables:
            columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
            if "namespace" in columns:
                counts[table] = conn.execute(
                    f"SELECT count(*) FROM {table} WHERE namespace = ?", (namespace,)
                ).fetchone()[0]
    return counts


def test_forget_namespace_removes_every_row(runner):
    for namespace in ("a", "b"):
        runner.fill(namespace, 5, 1)
        get = runner.event(Get, namespace=namespace, key="f0-1")
        maintain = runner.event(Maintain)
        runner.apply(
            EventWithEffects(
                get,
                (
                    Effect(
                        get.seq, "read", namespace, "f0-1", tier="stm", client=get.id
                    ),
                ),
            ),
            EventWithEffects(
                maintain,
                (
                    Effect(
                        maintain.seq,
                        "move",
                        namespace,
                        "f0-2",
                        tier="stm",
                        target="im",
                        reason="idle",
                    ),
                ),
            ),
            runner.event(Search, namespace=namespace, query="filler"),
        )
    before_b = namespace_rows(runner.db_path, "b")
    assert all(count > 0 for count in namespace_rows(runner.db_path, "a").values())

    forget = runner.event(Forget, namespace="a")
    runner.apply(forget)

    after_a = namespace_rows(runner.db_path, "a")
    assert after_a.pop("history") == 1
    assert after_a == {table: 0 for table in after_a}
    assert namespace_rows(runner.db_path, "b") == before_b
    (entry,) = audit(runner.db_path, "a", 0)
    assert (entry.seq, entry.kind, entry.key, entry.request_id) == (
        forget.seq,
        "forget",
        None,
        forget.id,
    )
    assert history(runner.db_path, "a", "f0-1") == []
    assert stats(runner.db_path, "a").namespaces[0].reads == {}
    assert search(runner.db_path, "a", "filler")[0] == []


def test_forget_namespace_then_store(runner):
    runner.fill("a", 5, 1)
    runner.apply(runner.event(Forget, namespace="a"))

    runner.apply(runner.event(Store, namespace="a", key="new", value="fresh words"))

    assert [hit.key for hit in search(runner.db_path, "a", "fresh")[0]] == ["new"]
    assert stats(runner.db_path, "a").namespaces[0].tiers["stm"].records == 1


def test_scrub_retried_after_reader(runner, db_dir, monkeypatch):
    monkeypatch.setattr(runner_module, "_SCRUB_TIMEOUT_S", 0.05)
    runner.apply(marked_store(runner))
    with closing(sqlite3.connect(runner.db_path, isolation_level=None)) as reader:
        # An open read transaction pins the WAL frames of its snapshot.
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM search_docs").fetchone()
        runner.apply(runner.event(Forget, namespace="a", key="k"))
        assert marker_files(db_dir) == ["projections.db-wal"]
        assert scrub_requests(runner.db_path) == [(1, runner.seq)]
        reader.execute("COMMIT")

        runner.apply(runner.event(Store, namespace="a", key="next", value="plain"))

    assert marker_files(db_dir) == []
    assert scrub_requests(runner.db_path) == []


def test_batch_without_forget_skips_scrub(runner, db_dir):
    runner.fill("a", 10, 1)

    assert (db_dir / "projections.db-wal").stat().st_size > 0
    assert scrub_requests(runner.db_path) == []


def test_rejected_forget_skips_scrub(runner, db_dir):
    runner.apply(marked_store(runner))
    forget = runner.event(Forget, namespace="a", key="k", expected_version=5)

    runner.apply(
        EventWithEffects(
            forget,
            (Effect(forget.seq, "conflict", "a", "k", reason="5:1", client=forget.id),),
        )
    )

    assert (db_dir / "projections.db-wal").stat().st_size > 0
    assert [hit.key for hit in search(runner.db_path, "a", MARKER)[0]] == ["k"]


def test_connect_turns_on_secure_delete(tmp_path):
    with closing(connect(tmp_path / "projections.db")) as conn:
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
