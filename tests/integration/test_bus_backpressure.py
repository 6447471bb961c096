"""Backpressure and priority: Busy instead of loss, high before a low flood."""

from __future__ import annotations

import threading
import time

import pytest

from bus.client import Client
from bus.router import RouterSettings
from events.types import Ack, Busy, Get, Store
from handlers.shard import Shard

pytestmark = pytest.mark.integration

RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}


def test_busy_when_shards_fall_behind_then_nothing_lost(start_router, monkeypatch):
    gate = threading.Event()
    original = Shard.apply

    def slow_apply(self, events, **kwargs):
        gate.wait(timeout=30)
        return original(self, events, **kwargs)

    monkeypatch.setattr(Shard, "apply", slow_apply)
    settings = RouterSettings(ports=dict(RANDOM_PORTS), max_inflight_batches=2, max_batch=10)
    router = start_router(shards=1, settings=settings)
    raw_replies: list = []
    with router.client(attempts=1) as client:
        # With attempts=1 the client returns the first Busy instead of
        # resending, so the test can see it.
        raw_replies = client.pipeline([Store(key=f"k{i}", value=i) for i in range(200)], window=200)
    gate.set()
    with router.client(attempts=50) as client:
        retried = client.pipeline([Store(id=f"again-{i}", key=f"k{i}", value=i) for i in range(200)], window=200)
        values = client.pipeline([Get(key=f"k{i}") for i in range(200)])
    busy = [reply for reply in raw_replies if isinstance(reply, Busy)]
    assert busy
    assert all(reply.retry_after_ms > 0 for reply in busy)
    assert all(isinstance(reply, (Ack, Busy)) for reply in raw_replies)
    assert all(isinstance(reply, Ack) for reply in retried)
    assert [reply.value for reply in values] == list(range(200))
    assert router.router.counters["busy.normal"] >= len(busy)


def test_high_lane_served_before_low_flood(start_router):
    router = start_router(shards=2)
    flood = [Store(namespace=f"f{i % 20}", key=f"k{i}", value="x" * 100) for i in range(30_000)]
    flood_replies: list = []
    started = threading.Event()

    def run_flood() -> None:
        with Client(router.endpoints) as flooder:
            for index, reply in enumerate(flooder.stream(flood, lane="low", window=4000)):
                if index == 0:
                    started.set()
                flood_replies.append(reply)

    thread = threading.Thread(target=run_flood)
    thread.start()
    assert started.wait(30)
    latencies = []
    high_seqs = []
    with router.client() as client:
        for i in range(50):
            began = time.perf_counter()
            reply = client.store(f"h{i}", i, namespace="urgent", lane="high")
            latencies.append(time.perf_counter() - began)
            high_seqs.append(reply.seq)
    thread.join(timeout=120)
    low_seqs = [reply.seq for reply in flood_replies]
    assert len(low_seqs) == len(flood)
    # The flood was still being sequenced after the high-lane requests,
    # so the high lane did not wait for the low backlog to drain.
    assert max(high_seqs) < max(low_seqs)
    assert sum(seq > max(high_seqs) for seq in low_seqs) > 1000
    print(f"high-lane store under low flood: median {sorted(latencies)[25] * 1000:.2f} ms")


def test_low_lane_progresses_under_high_flood(start_router):
    settings = RouterSettings(ports=dict(RANDOM_PORTS), max_batch=200, low_lane_share=20)
    router = start_router(shards=2, settings=settings)
    flood = [Store(namespace=f"f{i % 20}", key=f"k{i}", value=i) for i in range(20_000)]
    flood_seqs: list[int] = []
    started = threading.Event()

    def run_flood() -> None:
        with Client(router.endpoints) as flooder:
            for reply in flooder.stream(flood, lane="high", window=4000):
                started.set()
                flood_seqs.append(reply.seq)

    thread = threading.Thread(target=run_flood)
    thread.start()
    assert started.wait(30)
    with router.client() as client:
        low = client.store("patient", 1, lane="low")
    thread.join(timeout=120)
    assert low.seq < max(flood_seqs)
