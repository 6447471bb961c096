"""The invariants, each against real Redis and ZeroMQ (and Ray where it matters)."""

from __future__ import annotations

import pytest

from bus.client import Client, ClientError
from events.errors import ErrorCode
from events.types import Ack, Error, Forget, Get, Maintain, NotFound, Store, Value
from handlers.policy import Policy
from handlers.shard import Shard
from replay.rebuild import compare_digests, rebuild

pytestmark = pytest.mark.integration

SMALL = Policy(cache_capacity=8, stm_capacity=3, im_capacity=4, ltm_capacity=6)


def mixed_events(namespaces: int = 6, keys: int = 12) -> list:
    events = []
    for round_ in range(3):
        for n in range(namespaces):
            for k in range(keys):
                events.append(Store(namespace=f"ns{n}", key=f"k{k}", value={"r": round_, "k": k}, importance=((k * 7) % 10) / 10))
            events.append(Get(namespace=f"ns{n}", key=f"k{round_}"))
            events.append(Forget(namespace=f"ns{n}", key=f"k{keys - 1 - round_}"))
        events.append(Maintain())
    return events


def test_nothing_applied_before_durable(start_router, servers, monkeypatch):
    """Every event a shard applies is already in the log's Redis."""
    event_log = servers.event_log()
    checked: list[int] = []
    original = Shard.apply

    def apply_after_checking(self, events, **kwargs):
        for event in events:
            logged = event_log.read(event.seq - 1, 1)
            assert logged and logged[0].seq == event.seq, f"seq {event.seq} applied before it was logged"
            checked.append(event.seq)
        return original(self, events, **kwargs)

    monkeypatch.setattr(Shard, "apply", apply_after_checking)
    router = start_router(shards=2)
    with router.client() as client:
        replies = client.pipeline(mixed_events(3, 5))
    assert all(not isinstance(reply, Error) for reply in replies)
    assert len(checked) >= len(replies)


def test_log_down_means_no_ack_and_no_apply(start_router, servers):
    router = start_router(shards=1)
    with router.client(timeout=2, attempts=1) as client:
        client.store("before", 1)
        servers.log.kill()
        with pytest.raises(ClientError) as raised:
            client.store("during", 2)
    servers.log.start()
    with router.client(timeout=5, attempts=3) as client:
        found = client.get("during")
        kept = client.get("before")
    assert raised.value.reply.code == ErrorCode.UNAVAILABLE
    assert isinstance(found, NotFound)
    assert isinstance(kept, Value)


def test_unavailable_reply_when_log_down(start_router, servers):
    router = start_router(shards=1)
    servers.log.kill()
    with router.client(timeout=5, attempts=1) as client:
        sock = client._socket("normal")
        sock.send(b'{"type":"Store","id":"x1","key":"k","value":1}')
        assert sock.poll(10_000)
        reply = sock.recv()
    servers.log.start()
    assert b'"code":"unavailable"' in reply
    assert b'"id":"x1"' in reply


def test_repeated_event_is_noop(start_router):
    router = start_router(shards=2)
    with router.client() as client:
        first = client.request(Store(id="same-1", key="k", value="v1"))
        before = client.digest()
        again = client.request(Store(id="same-1", key="k", value="v1"))
        after = client.digest()
    assert isinstance(first, Ack)
    assert isinstance(again, Ack)
    assert again.seq == first.seq
    assert again.duplicate is True
    assert first.duplicate is False
    assert compare_digests(before.tiers, after.tiers) == []


def test_repeated_get_records_one_access(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        client.store("k", "v")
        first = client.request(Get(id="read-1", key="k"))
        before = client.digest()
        again = client.request(Get(id="read-1", key="k"))
        after = client.digest()
    assert isinstance(again, Value)
    assert again.value == "v"
    assert again.seq == first.seq
    assert compare_digests(before.tiers, after.tiers) == []


def test_id_reuse_with_other_body_is_conflict(start_router):
    router = start_router(shards=1)
    with router.client() as client:
        client.request(Store(id="dup", key="k", value="one"))
        (reply,) = client.pipeline([Store(id="dup", key="k", value="two")])
        value = client.get("k")
    assert isinstance(reply, Error)
    assert reply.code == ErrorCode.CONFLICT
    assert reply.field == "$.id"
    assert value.value == "one"


def test_read_your_writes_in_pipeline(start_router):
    router = start_router(shards=2)
    requests = []
    for n in range(20):
        requests += [Store(namespace=f"n{n % 3}", key="k", value=n), Get(namespace=f"n{n % 3}", key="k")]
    with router.client() as client:
        replies = client.pipeline(requests, window=40)
    reads = [reply for reply in replies if isinstance(reply, Value)]
    assert [reply.value for reply in reads] == list(range(20))


def test_seq_dense_and_increasing(start_router, servers):
    router = start_router(shards=2)
    with router.client() as client:
        replies = client.pipeline([Store(key=f"k{i}", value=i) for i in range(500)], window=200)
    seqs = [reply.seq for reply in replies]
    assert seqs == list(range(1, 501))
    assert servers.event_log().last_seq() == 500


def test_rebuild_equals_live_local(start_router, servers):
    router = start_router(shards=3, policy=SMALL)
    with router.client() as client:
        replies = client.pipeline(mixed_events())
        live = client.digest()
    assert not [reply for reply in replies if isinstance(reply, Error)]
    rebuilt = rebuild(servers.event_log(), shards=3, policy=SMALL, until_seq=live.seq)
    assert compare_digests(live.tiers, rebuilt.digests) == []
    assert {item.tier for item in live.tiers} == {"cache", "stm", "im", "ltm"}
    assert sum(item.records for item in live.tiers if item.tier == "ltm") > 0


def test_rebuild_detects_divergence(start_router, servers):
    """The comparison can fail: a rebuild under another policy differs."""
    router = start_router(shards=2, policy=SMALL)
    with router.client() as client:
        client.pipeline(mixed_events(2, 8))
        live = client.digest()
    other = Policy(cache_capacity=8, stm_capacity=2, im_capacity=4, ltm_capacity=6)
    rebuilt = rebuild(servers.event_log(), shards=2, policy=other, until_seq=live.seq)
    assert compare_digests(live.tiers, rebuilt.digests) != []


def test_restarted_shards_recover_from_tiers(start_router, servers):
    router = start_router(shards=2, policy=SMALL)
    with router.client() as client:
        client.pipeline(mixed_events(4, 8))
        before = client.digest()
    router.stop()
    again = start_router(shards=2, policy=SMALL)
    with again.client() as client:
        after = client.digest()
    assert after.seq == before.seq
    assert compare_digests(before.tiers, after.tiers) == []


@pytest.mark.slow
def test_ray_shards_rebuild_equals_live(ray_cluster, start_router, servers):
    router = start_router(shards=2, policy=SMALL, ray=True)
    with router.client() as client:
        replies = client.pipeline(mixed_events())
        live = client.digest()
    assert not [reply for reply in replies if isinstance(reply, Error)]
    rebuilt = rebuild(servers.event_log(), shards=2, policy=SMALL, until_seq=live.seq)
    assert compare_digests(live.tiers, rebuilt.digests) == []


@pytest.mark.slow
def test_ray_actor_kill_loses_nothing(ray_cluster, start_router, servers):
    """SIGKILL a shard actor mid-stream: every event is acked and applied once."""
    import os
    import signal
    import threading

    router = start_router(shards=2, policy=SMALL, ray=True)
    victim = router.dispatcher.actor_pids()[0]
    events = [Store(namespace=f"ns{i % 50}", key=f"k{i % 40}", value=i) for i in range(20_000)]
    killed = threading.Event()

    def kill_soon(replies_seen: int) -> None:
        if replies_seen == 5_000 and not killed.is_set():
            os.kill(victim, signal.SIGKILL)
            killed.set()

    acked = 0
    with router.client(timeout=30) as client:
        for count, reply in enumerate(client.stream(events, window=500), start=1):
            kill_soon(count)
            acked += isinstance(reply, Ack)
        live = client.digest()
    assert killed.is_set()
    assert acked == len(events)
    assert victim not in router.dispatcher.actor_pids()
    rebuilt = rebuild(servers.event_log(), shards=2, policy=SMALL, until_seq=live.seq)
    assert compare_digests(live.tiers, rebuilt.digests) == []


def test_client_resend_after_lost_reply(start_router):
    """A resend with the same id after a timeout gets the original Ack."""
    router = start_router(shards=1)
    with router.client() as client:
        sock = client._socket("normal")
        sock.send(b'{"type":"Store","id":"lost-1","key":"k","value":1}')
        assert sock.poll(10_000)
        first = sock.recv()
    with Client(router.endpoints) as other:
        resent = other.request(Store(id="lost-1", key="k", value=1))
    assert b'"seq":1' in first
    assert resent.seq == 1
    assert resent.duplicate is True


def test_search_logged_and_served(start_router, servers):
    """A Search is sequenced into the log and answered by the search service."""
    from events.types import Results, Search, SearchHit

    seen: list[Search] = []

    def search(event: Search) -> Results:
        seen.append(event)
        return Results(id=event.id, seq=event.seq or 0, index_seq=0, hits=[SearchHit(key="k", tier="stm", score=1.0, snippet=event.query)])

    router = start_router(shards=1)
    router.router.search = search
    with router.client() as client:
        client.store("k", "hello")
        reply = client.request(Search(query="hello world"))
    logged = servers.event_log().read(0, 10)
    assert isinstance(reply, Results)
    assert reply.hits[0].snippet == "hello world"
    assert [type(event).__name__ for event in logged] == ["Store", "Search"]
    assert seen[0].seq == logged[1].seq


def test_search_without_index_is_unavailable(start_router):
    from events.types import Search

    router = start_router(shards=1)
    with router.client(attempts=1) as client:
        (reply,) = client.pipeline([Search(query="x")])
    assert isinstance(reply, Error)
    assert reply.code == ErrorCode.UNAVAILABLE


def test_shard_fills_gap_from_prev_seq(servers):
    """A batch whose predecessor never arrived makes the shard apply the log first."""
    from handlers.actor import build_shard

    event_log = servers.event_log()
    first = [Store(id=f"a{i}", key=f"k{i}", value=i, seq=i + 1, ts=1000) for i in range(3)]
    second = [Store(id=f"b{i}", key=f"k{i}", value=10 + i, seq=4 + i, ts=2000) for i in range(3)]
    event_log.append(first, [0, 0, 0])
    event_log.append(second, [0, 0, 0])
    (settings,) = servers.shard_settings(1)
    shard = build_shard(settings)
    try:
        shard.apply(second, prev_seq=3)
        digests = shard.digests()
    finally:
        shard.close()
    rebuilt = rebuild(event_log, shards=1, policy=Policy(), until_seq=6)
    assert compare_digests(digests, rebuilt.digests) == []
