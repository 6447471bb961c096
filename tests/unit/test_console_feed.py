"""The console's live feed: event descriptions, Forget redaction, the buffer, apply lag."""

from __future__ import annotations

import pytest

from events.types import Forget, Get, Maintain, Search, Store
from handlers.sharding import shard_of
from tiermem.console import feed as feed_module
from tiermem.console.feed import EventFeed, describe_event, matches


def new_feed(shards: int = 2) -> EventFeed:
    # The sources are used only by the thread, which these tests never start.
    feed = EventFeed(None, backlog=0, on_batch=lambda events, redactions: None)  # type: ignore[arg-type]
    feed.set_shards(shards)
    return feed


def store(seq: int, key: str, value: object = "v", namespace: str = "agent") -> Store:
    return Store(
        id=f"s{seq}", seq=seq, ts=seq * 10, namespace=namespace, key=key, value=value
    )


def test_describe_store():
    item = describe_event(
        Store(
            id="a",
            seq=3,
            ts=30,
            namespace="n",
            key="k",
            value={"t": "x" * 300},
            importance=0.7,
            tags=["t1"],
        )
    )

    assert item["type"] == "Store"
    assert item["key"] == "k"
    assert item["value"].startswith('{"t":"xxx')
    assert len(item["value"]) == 200
    assert item["value_cut"] is True
    assert item["importance"] == 0.7
    assert item["tags"] == ["t1"]
    assert item["redacted"] is False


@pytest.mark.parametrize(
    ("event", "fields"),
    [
        (Get(id="g", seq=1, ts=1, namespace="n", key="k"), {"type": "Get", "key": "k"}),
        (
            Forget(id="f", seq=1, ts=1, namespace="n", key="k", expected_version=2),
            {"type": "Forget", "key": "k", "conditional": True},
        ),
        (
            Search(id="q", seq=1, ts=1, namespace="n", query="ramen", limit=5),
            {"type": "Search", "query": "ramen", "limit": 5},
        ),
        (Maintain(id="m", seq=1, ts=1), {"type": "Maintain", "namespace": None}),
    ],
)
def test_describe_other_types(event, fields):
    item = describe_event(event)

    for name, value in fields.items():
        assert item[name] == value
    assert "value" not in item


def test_forget_redacts_earlier_stores():
    feed = new_feed()
    feed.record(store(1, "secret", "code 0451"))
    feed.record(store(2, "other", "keep me"))
    _, redaction = feed.record(
        Forget(id="f", seq=3, ts=30, namespace="agent", key="secret")
    )
    feed.record(store(4, "secret", "new value"))
    shown = {item["seq"]: item for item in feed.recent()}

    assert redaction == {"namespace": "agent", "key": "secret", "before_seq": 3}
    assert shown[1]["value"] is None
    assert shown[1]["redacted"] is True
    assert shown[2]["value"] == '"keep me"'
    assert shown[4]["value"] == '"new value"'
    assert "0451" not in repr(feed.recent())


def test_store_returns_no_redaction():
    _, redaction = new_feed().record(store(1, "k"))

    assert redaction is None


def test_buffer_keeps_latest(monkeypatch):
    monkeypatch.setattr(feed_module, "BUFFER_EVENTS", 3)
    feed = new_feed()
    for seq in range(1, 6):
        feed.record(store(seq, f"k{seq % 2}"))
    feed.record(Forget(id="f", seq=6, ts=60, namespace="agent", key="k1"))

    assert [item["seq"] for item in feed.recent()] == [4, 5, 6]
    assert feed.recent()[1]["redacted"] is True
    assert feed._stores == {("agent", "k0"): [feed._buffer[0]]}


def test_recent_filters_and_limit():
    feed = new_feed()
    feed.record(store(1, "a", namespace="x"))
    feed.record(Get(id="g", seq=2, ts=20, namespace="x", key="a"))
    feed.record(store(3, "b", namespace="y"))

    assert [item["seq"] for item in feed.recent(types={"Store"})] == [1, 3]
    assert [item["seq"] for item in feed.recent(namespace="x")] == [1, 2]
    assert [item["seq"] for item in feed.recent(limit=1)] == [3]


def test_matches_filters():
    item = {"type": "Store", "namespace": "x"}

    assert matches(item, None, None)
    assert matches(item, {"Store"}, "x")
    assert not matches(item, {"Get"}, None)
    assert not matches(item, None, "y")


def test_settle_counts_pending_per_shard():
    feed = new_feed(shards=2)
    namespaces = {shard_of(name, 2): name for name in ("a", "b", "c", "d", "e")}
    first, second = namespaces[0], namespaces[1]
    feed.record(store(1, "k", namespace=first))
    feed.record(store(2, "k", namespace=second))
    feed.record(Maintain(id="m", seq=3, ts=30))
    feed.record(Search(id="q", seq=4, ts=40, namespace=first, query="x"))
    feed.record(store(5, "k", namespace=first))

    lag = feed.settle({0: 1, 1: 3})
    after = feed.settle({0: 5, 1: 3})

    assert lag[0] == {"pending": 2, "applied": 1, "at_least": False}
    assert lag[1] == {"pending": 0, "applied": 2, "at_least": False}
    assert after[0] == {"pending": 0, "applied": 3, "at_least": False}


def test_settle_marks_overflow(monkeypatch):
    monkeypatch.setattr(feed_module, "MAX_PENDING_PER_SHARD", 2)
    feed = new_feed(shards=1)
    for seq in range(1, 5):
        feed.record(store(seq, "k"))

    lag = feed.settle({0: 0})

    assert lag[0] == {"pending": 2, "applied": 0, "at_least": True}


def test_settle_ignores_unknown_shards():
    assert new_feed(shards=1).settle({5: 10}) == {}
