"""The console's key pages and key histories, over real projections and an in-memory log."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from events.types import Event, Forget, Get, Maintain, Store
from handlers.effects import Effect
from replay.projections import EventWithEffects
from replay.projections.db import (
    connect,
    connect_readonly,
    create_core_tables,
    write_checkpoint,
    write_transaction,
)
from replay.projections.registry import builtin_projections
from tiermem.console import queries
from tiermem.console.sources import InvalidRequestError, StackDownError


class ListLog:
    """An event log kept in a list, with the read methods the console uses."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events

    def last_seq(self) -> int:
        return len(self.events)

    def read(self, after_seq: int, limit: int) -> list[Event]:
        return self.events[after_seq : after_seq + limit]

    def iter_from(
        self, after_seq: int, until_seq: int | None = None
    ) -> Iterator[list[Event]]:
        end = len(self.events) if until_seq is None else until_seq
        if after_seq < end:
            yield self.events[after_seq:end]


class FakeSources:
    """The parts of `StackSources` the queries use, over a list log and a database file."""

    def __init__(self, events: list[Event], db: Path) -> None:
        self.log = ListLog(events)
        self.projections_db = db

    def event_log(self) -> ListLog:
        return self.log

    def log_down(self, error: redis.RedisError) -> StackDownError:
        return StackDownError(f"log down: {error}")


def logged(events: list[Event]) -> list[Event]:
    """Give each event the seq and ts the router would: seq 1, 2, ... and ts 1000 * seq."""
    return [
        msgspec.structs.replace(
            event, seq=index, ts=1000 * index, id=event.id or f"e{index}"
        )
        for index, event in enumerate(events, start=1)
    ]


def project(db: Path, items: list[EventWithEffects], until: int | None = None) -> None:
    """Apply the built-in projections to `items` (up to seq `until`) in one transaction."""
    chosen = [item for item in items if until is None or item.seq <= until]
    conn = connect(db)
    try:
        with write_transaction(conn):
            create_core_tables(conn)
            for projection in builtin_projections():
                projection.setup(conn)
                projection.apply(conn, chosen)
                write_checkpoint(conn, projection.name, chosen[-1].seq, chosen[-1].ts)
    finally:
        conn.close()


@pytest.fixture
def stack(tmp_path):
    """A namespace `agent` with keys, reads, a move, a Forget and a re-store, projected."""
    events = logged(
        [
            Store(
                namespace="agent",
                key="a",
                value={"text": "first a"},
                importance=0.9,
                tags=["x"],
            ),
            Store(namespace="agent", key="b", value="bee"),
            Store(namespace="agent", key="c", value="sea"),
            Get(namespace="agent", key="b"),
            Get(namespace="agent", key="b"),
            Get(namespace="agent", key="c"),
            Store(namespace="agent", key="secret", value="code 0451"),
            Forget(namespace="agent", key="secret"),
            Store(
                namespace="agent", key="a", value={"text": "second a"}, importance=0.3
            ),
            Maintain(namespace="agent"),
            Store(namespace="agent", key="secret", value="new code 1234"),
            Store(namespace="other", key="z", value=1),
        ]
    )
    effects = {
        4: (Effect(4, "read", "agent", "b", tier="cache"),),
        5: (Effect(5, "read", "agent", "b", tier="cache"),),
        6: (Effect(6, "read", "agent", "c", tier="stm"),),
        10: (Effect(10, "move", "agent", "c", tier="stm", target="im", reason="idle"),),
    }
    items = [EventWithEffects(event, effects.get(event.seq, ())) for event in events]
    db = tmp_path / "projections.sqlite3"
    project(db, items)
    return FakeSources(events, db), db


def test_key_page_keyset_order(stack):
    sources, db = stack
    conn = connect_readonly(db)
    first = queries.key_page(sources, conn, "agent", limit=2)
    second = queries.key_page(
        sources, conn, "agent", after=first["next_after"], limit=2
    )
    conn.close()

    assert [item["key"] for item in first["keys"]] == ["a", "b"]
    assert first["next_after"] == "b"
    assert first["total"] == 4
    assert [item["key"] for item in second["keys"]] == ["c", "secret"]
    assert second["next_after"] is None


def test_key_page_fields_and_importance(stack):
    sources, db = stack
    conn = connect_readonly(db)
    page = queries.key_page(sources, conn, "agent")
    conn.close()
    by_key = {item["key"]: item for item in page["keys"]}

    assert by_key["a"]["importance"] == 0.3
    assert by_key["a"]["tags"] == []
    assert by_key["b"]["access_count"] == 2
    assert by_key["b"]["last_access_ts"] == 5000
    assert by_key["c"]["tier"] == "im"
    assert page["importance_complete"] is True
    assert page["stats_seq"] == 12


def test_key_page_by_reads(stack):
    sources, db = stack
    conn = connect_readonly(db)
    first = queries.key_page(sources, conn, "agent", order="reads", limit=2)
    rest = queries.key_page(
        sources, conn, "agent", order="reads", offset=first["next_offset"], limit=2
    )
    conn.close()

    assert [item["key"] for item in first["keys"]] == ["b", "c"]
    assert first["next_offset"] == 2
    assert sorted(item["key"] for item in rest["keys"]) == ["a", "secret"]
    assert rest["next_offset"] is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"limit": 0}, "limit 0 is invalid"),
        ({"limit": queries.MAX_PAGE + 1}, f"limit {queries.MAX_PAGE + 1} is invalid"),
        ({"order": "size"}, "order 'size' is invalid"),
        ({"offset": -1}, "offset -1 is invalid"),
    ],
)
def test_key_page_rejects_bad_options(stack, options, message):
    sources, db = stack
    conn = connect_readonly(db)
    with pytest.raises(InvalidRequestError, match=message):
        queries.key_page(sources, conn, "agent", **options)
    conn.close()


def test_history_shows_values_of_stores(stack):
    sources, db = stack
    conn = connect_readonly(db)
    reply = queries.key_history(sources, conn, "agent", "a")
    conn.close()
    stores = [entry for entry in reply["entries"] if entry["kind"] == "store"]

    assert [entry["value"] for entry in stores] == [
        '{"text":"first a"}',
        '{"text":"second a"}',
    ]
    assert [entry["value_state"] for entry in stores] == ["shown", "shown"]
    assert reply["current"]["value"] == '{"text":"second a"}'
    assert reply["current"]["importance"] == 0.3
    assert reply["forgotten_seq"] is None


def test_history_hides_values_before_forget(stack):
    sources, db = stack
    conn = connect_readonly(db)
    reply = queries.key_history(sources, conn, "agent", "secret")
    conn.close()
    kinds = [
        (entry["seq"], entry["kind"], entry["value_state"])
        for entry in reply["entries"]
    ]
    text = repr(reply)

    assert kinds == [
        (7, "store", "forgotten"),
        (8, "forget", "none"),
        (11, "store", "shown"),
    ]
    assert "0451" not in text
    assert reply["entries"][2]["value"] == '"new code 1234"'
    assert reply["forgotten_seq"] == 8
    assert reply["current"]["value"] == '"new code 1234"'


def test_history_sees_forget_not_yet_projected(tmp_path):
    events = logged(
        [
            Store(namespace="agent", key="k", value="private"),
            Get(namespace="agent", key="k"),
            Forget(namespace="agent", key="k"),
        ]
    )
    items = [EventWithEffects(event, ()) for event in events]
    db = tmp_path / "projections.sqlite3"
    project(db, items, until=2)
    sources = FakeSources(events, db)
    conn = connect_readonly(db)
    reply = queries.key_history(sources, conn, "agent", "k")
    conn.close()

    assert reply["history_seq"] == 2
    assert reply["forgotten_seq"] == 3
    assert reply["entries"][0]["value_state"] == "forgotten"
    assert reply["current"] is None
    assert "private" not in repr(reply)


def test_history_withholds_values_when_far_behind(tmp_path, monkeypatch):
    events = logged(
        [Store(namespace="agent", key="k", value="private")]
        + [Get(namespace="agent", key="k")] * 5
    )
    items = [EventWithEffects(event, ()) for event in events]
    db = tmp_path / "projections.sqlite3"
    project(db, items, until=1)
    monkeypatch.setattr(queries, "MAX_UNPROJECTED_EVENTS", 3)
    conn = connect_readonly(db)
    reply = queries.key_history(FakeSources(events, db), conn, "agent", "k")
    conn.close()

    assert reply["values_withheld"] is True
    assert reply["entries"][0]["value_state"] == "withheld"
    assert reply["current"]["value"] is None
    assert "private" not in repr(reply)


def test_history_pages_with_after(stack):
    sources, db = stack
    conn = connect_readonly(db)
    first = queries.key_history(sources, conn, "agent", "b", limit=2)
    rest = queries.key_history(
        sources, conn, "agent", "b", after=tuple(first["next_after"]), limit=2
    )
    conn.close()

    assert [entry["seq"] for entry in first["entries"]] == [2, 4]
    assert first["next_after"] == [4, 0]
    assert [entry["seq"] for entry in rest["entries"]] == [5]
    assert rest["next_after"] is None


def test_namespaces_lists_tiers(stack):
    _, db = stack
    conn = connect_readonly(db)
    reply = queries.namespaces(conn)
    conn.close()
    by_name = {item["namespace"]: item for item in reply["namespaces"]}

    assert sorted(by_name) == ["agent", "other"]
    assert by_name["agent"]["records"] == 4
    assert by_name["agent"]["tiers"] == {"im": 1, "stm": 3}


def test_read_events_across_far_seqs(stack):
    sources, _ = stack

    found = queries.read_events(sources, [12, 1, 7, 7])

    assert sorted(found) == [1, 7, 12]
    assert found[7].key == "secret"


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [
        ("abc", 10, ('"abc"', False)),
        ("abcdefgh", 5, ('"abc…', True)),
        ({"a": [1, 2]}, 20, ('{"a":[1,2]}', False)),
    ],
)
def test_render_value_cuts(value, limit, expected):
    assert queries.render_value(value, limit) == expected


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "key is missing"),
        (None, "key is missing"),
        ("a\x00b", "is invalid"),
        ("x" * 513, "is invalid"),
    ],
)
def test_require_key_rejects(key, message):
    with pytest.raises(InvalidRequestError, match=message):
        queries.require_key(key)


class DownLog(ListLog):
    """A log whose Redis refuses every read."""

    def last_seq(self) -> int:
        raise redis.ConnectionError("Connection refused")

    def read(self, after_seq: int, limit: int) -> list[Event]:
        raise redis.ConnectionError("Connection refused")


def test_key_page_without_log(stack):
    sources, db = stack
    sources.log = DownLog([])
    conn = connect_readonly(db)
    page = queries.key_page(sources, conn, "agent")
    conn.close()

    assert [item["key"] for item in page["keys"]] == ["a", "b", "c", "secret"]
    assert all(item["importance"] is None for item in page["keys"])
    assert page["importance_complete"] is False
    assert "log down: Connection refused" in page["importance_error"]


def test_history_without_log_hides_values(stack):
    sources, db = stack
    sources.log = DownLog([])
    conn = connect_readonly(db)
    reply = queries.key_history(sources, conn, "agent", "a")
    conn.close()

    assert [
        entry["value_state"] for entry in reply["entries"] if entry["kind"] == "store"
    ] == ["withheld", "withheld"]
    assert (
        reply["values_note"] == "Values are hidden because log down: Connection refused"
    )
    assert reply["current"]["value"] is None
    assert reply["current"]["tier"] == "stm"
