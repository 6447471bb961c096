"""Crypto-shredding in the log: Stores are sealed, and a Forget makes them unreadable."""

from __future__ import annotations

import itertools

import pytest
import redis

from events.log import RedisEventLog
from events.seal import ForgetRecord
from events.types import Forget, Get, Store

pytestmark = pytest.mark.integration

MARKER = "zq-marker-6f1c0d"


class Appender:
    """Appends events to a real log with consecutive seqs, as the router does."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.log = RedisEventLog(self.client)
        self.seq = itertools.count(1)

    def append(self, *events):
        stamped = []
        for event in events:
            seq = next(self.seq)
            stamped.append(type(event)(**{**_fields(event), "id": f"e{seq}", "seq": seq, "ts": 1000 + seq}))
        self.log.append(stamped, [0] * len(stamped))
        return stamped

    def raw_log(self) -> bytes:
        return b"".join(fields[b"e"] for _, fields in self.client.xrange(self.log.stream))


def _fields(event):
    return {name: getattr(event, name) for name in event.__struct_fields__}


@pytest.fixture
def appender(redis_factory):
    return Appender(redis_factory("log").url)


def test_store_value_sealed_in_log(appender):
    appender.append(Store(namespace="a", key="k", value={"note": MARKER}, tags=["secret-tag"]))

    assert MARKER.encode() not in appender.raw_log()
    assert b"secret-tag" not in appender.raw_log()
    (event,) = appender.log.read(0, 10)
    assert event.value == {"note": MARKER}
    assert event.tags == ["secret-tag"]


def test_forget_turns_stores_into_placeholders(appender):
    appender.append(Store(namespace="a", key="k", value=MARKER), Store(namespace="a", key="other", value="kept"))
    appender.append(Forget(namespace="a", key="k"))

    store, other, forget = appender.log.read(0, 10)
    assert store.value is None
    assert store.tags == []
    assert store.key == "k"
    assert store.seq == 1
    assert other.value == "kept"
    assert isinstance(forget, Forget)


def test_store_after_forget_new_key(appender):
    appender.append(Store(namespace="a", key="k", value="old"), Forget(namespace="a", key="k"), Store(namespace="a", key="k", value="new"))

    old, _, new = appender.log.read(0, 10)
    assert old.value is None
    assert new.value == "new"


def test_cold_cache_reads_key_state(appender):
    appender.append(Store(namespace="a", key="k", value="v1"))
    appender.append(Forget(namespace="a", key="k"))
    # A restarted router: a new log object with an empty cache.
    appender.log = RedisEventLog(appender.client)
    appender.append(Store(namespace="a", key="k", value="v2"))

    values = [event.value for event in appender.log.read(0, 10) if isinstance(event, Store)]
    assert values == [None, "v2"]


def test_namespace_forget_destroys_all_keys(appender):
    appender.append(
        Store(namespace="agent", key="a", value="one"),
        Store(namespace="agent", key="b", value="two"),
        Store(namespace="else", key="a", value="three"),
    )
    appender.append(Forget(namespace="agent"), Store(namespace="agent", key="a", value="after"))

    values = [(e.namespace, e.key, e.value) for e in appender.log.read(0, 10) if isinstance(e, Store)]
    assert values == [("agent", "a", None), ("agent", "b", None), ("else", "a", "three"), ("agent", "a", "after")]
    assert appender.log.forgets_after(0) == [ForgetRecord(4, "agent", None)]


def test_conditional_forget_waits_for_shred(appender):
    appender.append(Store(namespace="a", key="k", value="v1"))
    appender.append(Forget(namespace="a", key="k", expected_version=1), Store(namespace="a", key="k", value="v2"))

    assert [e.value for e in appender.log.read(0, 10) if isinstance(e, Store)] == ["v1", "v2"]
    assert appender.log.forgets_after(0) == []

    appender.log.data_keys.shred("a", "k", 2)
    appender.log.data_keys.shred("a", "k", 2)  # a shard applying it again

    assert [e.value for e in appender.log.read(0, 10) if isinstance(e, Store)] == [None, "v2"]
    assert appender.log.forgets_after(0) == [ForgetRecord(2, "a", "k")]


def test_failed_append_keeps_key_state(appender):
    appender.append(Store(namespace="a", key="k", value="v1"))
    # A batch that does not continue the log is refused by the script.
    bad = Store(id="x", namespace="a", key="k", value="lost", seq=99, ts=1)
    with pytest.raises(Exception, match="log ends at seq 1"):
        appender.log.append([bad], [0])
    appender.append(Forget(namespace="a", key="k"), Store(namespace="a", key="k", value="v2"))

    assert [e.value for e in appender.log.read(0, 10) if isinstance(e, Store)] == [None, "v2"]


def test_gets_and_forgets_unsealed(appender):
    appender.append(Get(namespace="a", key="k"), Forget(namespace="a", key="k"))

    get, forget = appender.log.read(0, 10)
    assert isinstance(get, Get) and isinstance(forget, Forget)
    assert forget.key == "k"


def test_namespace_forget_after_cached_store(appender):
    appender.append(Store(namespace="agent", key="a", value="one"))
    # The router's cache contains "a"; the batch forgets the namespace and
    # stores "a" again, which must get a fresh data key.
    appender.append(Forget(namespace="agent"), Store(namespace="agent", key="a", value="two"))

    values = [e.value for e in appender.log.read(0, 10) if isinstance(e, Store)]
    assert values == [None, "two"]
    fields = appender.client.hgetall(appender.log.data_keys.namespace_hash("agent"))
    assert sorted(fields) == [b"m\x00a\x002", b"s\x00a"]


def test_key_forget_leaves_only_live_fields(appender):
    appender.append(Store(namespace="n", key="k", value=1), Store(namespace="n", key="other", value=2))
    appender.append(Forget(namespace="n", key="k"))

    fields = appender.client.hgetall(appender.log.data_keys.namespace_hash("n"))
    assert fields[b"s\x00k"] == b"3"
    assert b"m\x00k\x000" not in fields
    assert b"m\x00other\x000" in fields
