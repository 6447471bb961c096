"""A tier that goes down: degraded reads, paused applies, resume in order from the log."""

from __future__ import annotations

import pytest

from bus.client import ClientError
from events.types import Ack, Digest, DigestReply, Get, Maintain, NotFound, Store, Value
from handlers.policy import Policy
from replay.rebuild import compare_digests, rebuild
from tiermem.servers import wait_until

pytestmark = pytest.mark.integration

TINY = Policy(cache_capacity=2, stm_capacity=2, im_capacity=50, ltm_capacity=100)


def test_im_down_then_back_loses_nothing(start_router, servers):
    router = start_router(shards=1, policy=TINY)
    with router.client(timeout=10) as client:
        client.pipeline([Store(namespace="a", key=f"k{i}", value=i) for i in range(8)])
        client.request(Maintain(), lane="low")
        before = {i: client.get(f"k{i}", namespace="a") for i in range(8)}
        in_im = [i for i, reply in before.items() if isinstance(reply, Value) and reply.tier == "im"]
        cached = [i for i, reply in before.items() if isinstance(reply, Value) and reply.tier == "cache"]

        servers.im.kill()
        # Reads of records whose tier is down fall through to NotFound, and
        # every read says it is degraded while the breaker is open.
        degraded = client.pipeline([Get(namespace="a", key=f"k{i}") for i in range(8)])
        writes = client.pipeline([Store(namespace="a", key=f"new{i}", value=i) for i in range(5)])

        servers.im.start()
        wait_until(lambda: not router.dispatcher.hosts[0].paused, timeout=30, what="the shard to resume")
        after = client.pipeline([Get(namespace="a", key=f"new{i}") for i in range(5)] + [Get(namespace="a", key=f"k{i}") for i in in_im])
        live = client.digest()

    assert in_im
    assert all(reply.degraded for reply in degraded)
    assert all(isinstance(degraded[i], NotFound) for i in in_im if i not in cached)
    assert all(isinstance(reply, Ack) for reply in writes)
    assert [reply.value for reply in after[:5]] == list(range(5))
    assert [reply.value for reply in after[5:]] == in_im
    assert not any(reply.degraded for reply in after)
    rebuilt = rebuild(servers.event_log(), shards=1, policy=TINY, until_seq=live.seq)
    assert compare_digests(live.tiers, rebuilt.digests) == []


def test_breaker_logs_open_and_close(start_router, servers):
    from structlog.testing import capture_logs

    router = start_router(shards=1, policy=TINY)
    with capture_logs() as logs, router.client(timeout=10) as client:
        client.pipeline([Store(namespace="b", key=f"k{i}", value=i) for i in range(6)])
        servers.im.kill()
        client.request(Maintain(), lane="low")
        client.pipeline([Get(namespace="b", key="k0")])
        servers.im.start()
        wait_until(lambda: not router.dispatcher.hosts[0].paused, timeout=30, what="the shard to resume")
    names = [entry["event"] for entry in logs]
    assert "shard.breaker.opened" in names
    assert "shard.breaker.closed" in names


def test_digest_unavailable_while_shard_paused(start_router, servers):
    router = start_router(shards=1, policy=TINY)
    host = router.dispatcher.hosts[0]
    # No background resume within the test: the shard stays paused until
    # the next event it is sent.
    host.resume_initial_s = 3600.0
    with router.client(timeout=10) as client:
        client.pipeline([Store(namespace="c", key=f"k{i}", value=i) for i in range(6)])
        servers.im.kill()
        # The pass moves records to IM, which is down: the shard pauses.
        client.request(Maintain(), lane="low")
        wait_until(lambda: host.paused, timeout=30, what="the shard to pause")
        client.pipeline([Store(namespace="c", key=f"late{i}", value=i) for i in range(3)])
        servers.im.start()

        with pytest.raises(ClientError, match="unavailable: shard 0 has applied events up to seq") as paused:
            client.request(Digest())
        client.request(Store(namespace="c", key="wakes", value=1))
        resumed = client.request(Digest())

    assert paused.value.reply.code == "unavailable"
    assert isinstance(resumed, DigestReply)
    rebuilt = rebuild(servers.event_log(), shards=1, policy=TINY, until_seq=resumed.seq)
    assert compare_digests(resumed.tiers, rebuilt.digests) == []
