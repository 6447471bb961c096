"""The Redis Streams event log: config checks, dense sequence, ranges, durability."""

from __future__ import annotations

import pytest
import redis

from events.errors import LogConfigError, LogError
from events.log import RedisEventLog, check_log_config
from events.types import Get, Store

pytestmark = pytest.mark.integration


@pytest.fixture
def log_server(redis_factory):
    return redis_factory("log")


@pytest.fixture
def event_log(log_server):
    client = redis.Redis.from_url(log_server.url)
    yield RedisEventLog(client)
    client.close()


def stamped(seq: int, **fields) -> Store:
    return Store(id=f"id-{seq}", key=f"k{seq}", value=seq, seq=seq, ts=1000 + seq, **fields)


def test_check_accepts_log_role(log_server):
    with log_server.client() as client:
        check_log_config(client)


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("appendfsync", "no", "appendfsync"),
        ("appendfsync", "everysec", "appendfsync"),
        ("appendonly", "no", "appendonly"),
        ("maxmemory-policy", "allkeys-lru", "maxmemory-policy"),
    ],
)
def test_check_rejects_unsafe_setting(log_server, setting, value, named):
    with log_server.client() as client:
        client.config_set(setting, value)
        with pytest.raises(LogConfigError) as raised:
            check_log_config(client)
    assert raised.value.setting == named
    assert value in str(raised.value)
    assert "Fix:" in str(raised.value)


def test_check_everysec_when_opted_in(log_server):
    with log_server.client() as client:
        client.config_set("appendfsync", "everysec")
        check_log_config(client, allow_everysec=True)


def test_empty_log_last_seq_zero(event_log):
    assert event_log.last_seq() == 0
    assert event_log.read(0, 10) == []


def test_append_read_range(event_log):
    event_log.append([stamped(1), stamped(2), stamped(3)], [11, 12, 13])
    event_log.append([stamped(4)], [14])
    assert event_log.last_seq() == 4
    assert [e.seq for e in event_log.read(1, 2)] == [2, 3]
    assert event_log.read(0, 1)[0] == stamped(1)
    assert [len(b) for b in RedisEventLog(event_log.client, read_batch=3).iter_from(0)] == [3, 1]
    assert [e.seq for b in event_log.iter_from(1, 3) for e in b] == [2, 3]


def test_append_rejects_old_seq(event_log):
    event_log.append([stamped(1), stamped(2)], [1, 2])
    with pytest.raises(LogError):
        event_log.append([stamped(2)], [2])
    assert event_log.last_seq() == 2


def test_failed_append_writes_no_id(event_log):
    event_log.append([stamped(1)], [1])
    with pytest.raises(LogError):
        event_log.append([stamped(3), stamped(4)], [3, 4])
    assert event_log.lookup(["id-3", "id-4"]) == [None, None]
    assert event_log.last_seq() == 1


def test_append_rejects_gap(event_log):
    event_log.append([stamped(1)], [1])
    with pytest.raises(LogError) as raised:
        event_log.append([stamped(3)], [3])
    assert "ends at seq 1, batch starts at 3" in str(raised.value)


def test_append_rejects_nonconsecutive_batch(event_log):
    with pytest.raises(ValueError):
        event_log.append([stamped(1), stamped(3)], [1, 3])


def test_read_spans_batches(event_log):
    event_log.append([stamped(1), stamped(2), stamped(3)], [1, 2, 3])
    event_log.append([stamped(4), stamped(5)], [4, 5])
    event_log.append([stamped(6)], [6])
    assert [e.seq for e in event_log.read(2, 3)] == [3, 4, 5]
    assert [e.seq for e in event_log.read(5, 10)] == [6]
    assert event_log.read(6, 10) == []


def test_lookup_returns_seq_and_hash(event_log):
    event_log.append([stamped(1), stamped(2)], [101, 202])
    first, second, missing = event_log.lookup(["id-1", "id-2", "nope"])
    assert (first.seq, first.body_hash) == (1, 101)
    assert (second.seq, second.body_hash) == (2, 202)
    assert missing is None


def test_append_survives_kill(log_server, event_log):
    event_log.append([stamped(1), Get(id="g", key="k1", seq=2, ts=5)], [1, 2])
    log_server.kill()
    log_server.start()
    with redis.Redis.from_url(log_server.url) as client:
        reopened = RedisEventLog(client)
        assert reopened.last_seq() == 2
        assert reopened.read(1, 1)[0] == Get(id="g", key="k1", seq=2, ts=5)


def test_old_store_version_upcast_on_read(event_log):
    import msgspec

    old = {"type": "Store", "v": 1, "id": "old", "key": "k", "value": 1, "tags": "a, b", "seq": 1, "ts": 9}
    entry = msgspec.msgpack.encode([msgspec.Raw(msgspec.msgpack.encode(old))])
    event_log.client.xadd(event_log.stream, {b"f": b"1", b"e": entry}, id="1-0")
    (event,) = event_log.read(0, 1)
    assert event.v == 2
    assert event.tags == ["a", "b"]
