"""Effects streams: reads and tier moves, exactly once across restarts."""

from __future__ import annotations

import pytest
import redis

from events.types import Get, Maintain, Store
from handlers.effects import RedisEffectLog
from handlers.policy import Policy
from handlers.sharding import shard_of

pytestmark = pytest.mark.integration

TINY = Policy(cache_capacity=4, stm_capacity=2, im_capacity=2, ltm_capacity=3)


def test_effects_record_reads_and_moves(start_router, servers):
    router = start_router(shards=1, policy=TINY)
    events = [Store(namespace="a", key=f"k{i}", value=i, importance=i / 10) for i in range(8)]
    events += [Get(id="read-k7", namespace="a", key="k7"), Get(id="read-none", namespace="a", key="none"), Maintain()]
    with router.client() as client:
        client.pipeline(events)
        client.digest()
    effects = RedisEffectLog(redis.Redis.from_url(servers.log.url)).read(0, 0, 10**9)
    reads = [e for e in effects if e.kind == "read"]
    moves = [e for e in effects if e.kind == "move"]
    deletes = [e for e in effects if e.kind == "delete"]
    assert [(e.client, e.tier) for e in reads] == [("read-k7", "cache"), ("read-none", None)]
    assert {(e.tier, e.target, e.reason) for e in moves} == {("stm", "im", "capacity"), ("im", "ltm", "capacity")}
    assert len(deletes) == 8 - 2 - 2 - 3
    assert {e.reason for e in deletes} == {"evicted"}


def test_effects_not_duplicated_by_replay(start_router, servers):
    router = start_router(shards=2, policy=TINY)
    events = [Store(namespace=f"n{i % 3}", key=f"k{i}", value=i) for i in range(30)] + [Maintain()]
    with router.client() as client:
        client.pipeline(events)
        client.digest()
    reader = RedisEffectLog(redis.Redis.from_url(servers.log.url))
    before = [reader.read(shard, 0, 10**9) for shard in range(2)]
    router.stop()
    # A fresh shard set with wiped tiers rebuilds from the whole log and
    # produces every effect again; the stream must not grow.
    for server in (servers.stm, servers.im):
        with server.client() as client:
            client.flushall()
    again = start_router(shards=2, policy=TINY)
    with again.client() as client:
        client.digest()
    after = [reader.read(shard, 0, 10**9) for shard in range(2)]
    assert sum(len(items) for items in before) > 0
    assert after == before
    assert all(shard_of(e.namespace, 2) == shard for shard in range(2) for e in after[shard])
