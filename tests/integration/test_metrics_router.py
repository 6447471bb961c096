"""The router's Prometheus endpoint under real traffic, scraped over HTTP.

Each test starts a router with real Redis and ZeroMQ and local shards,
sends requests with known outcomes, scrapes the endpoint with urllib and
checks the counters against what the clients received.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from bus.client import Client
from bus.dispatch import LocalDispatcher, Waker
from bus.router import Router, RouterSettings
from events.types import Ack, Busy, Error, Get, Maintain, Store, Value
from handlers.actor import build_shard
from handlers.policy import Policy
from handlers.shard import Shard

pytestmark = pytest.mark.integration

METRICS = RouterSettings(
    ports={"high": 0, "normal": 0, "low": 0, "pub": 0}, metrics_port=0
)

# Two cache slots: most reads of ten keys fall through to STM.
SMALL_CACHE = Policy(cache_capacity=2)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Return {(sample name, labels): value} of every tiermem sample at `url`."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("tiermem_"):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for(condition, *, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)


def send_raw(endpoint: str, frames: list[bytes]) -> bytes:
    """Send one multipart message from a DEALER and return the reply frame."""
    context = zmq.Context.instance()
    with context.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(10_000), f"no reply to {frames!r}"
        return sock.recv()


class OwnRouter:
    """A router started here rather than by `start_router`, for what the fixture cannot set.

    It takes a `projection_checkpoint`, and can watch the normal lane for
    disconnects: the monitor is attached before the router thread starts,
    because ZeroMQ sockets are not thread-safe.
    """

    def __init__(
        self,
        servers,
        *,
        shards: int = 2,
        projection_checkpoint=None,
        monitor: bool = False,
    ) -> None:
        self.waker = Waker()
        hosts = [build_shard(item) for item in servers.shard_settings(shards)]
        for host in hosts:
            host.recover()
        self.dispatcher = LocalDispatcher(hosts, self.waker)
        self.router = Router(
            METRICS,
            servers.event_log(),
            self.dispatcher,
            self.waker,
            projection_checkpoint=projection_checkpoint,
        )
        self.endpoints = self.router.bind()
        self.monitor = (
            self.router.sockets["normal"].get_monitor_socket(zmq.EVENT_DISCONNECTED)
            if monitor
            else None
        )
        self.thread = threading.Thread(
            target=self.router.serve_forever, name="router", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.router.stop()
        self.thread.join(timeout=30)
        if self.monitor is not None:
            self.monitor.close(linger=0)
        self.router.close()
        self.dispatcher.close()
        self.waker.close()


@pytest.fixture
def own_router(servers):
    started: list[OwnRouter] = []

    def start(**kwargs) -> OwnRouter:
        item = OwnRouter(servers, **kwargs)
        started.append(item)
        return item

    yield start
    for item in reversed(started):
        item.stop()


# ---------------------------------------------------------------- traffic


def test_traffic_counted_exactly(start_router):
    router = start_router(shards=2, policy=SMALL_CACHE, settings=METRICS)
    url = router.router.metrics_url
    assert url is not None and url.startswith("http://127.0.0.1:")
    namespaces = [f"agent-{i}" for i in range(4)]
    stores = [
        Store(id=f"{ns}-{k}", namespace=ns, key=f"k{k}", value=k)
        for ns in namespaces
        for k in range(10)
    ]
    reads = [Get(namespace=ns, key=f"k{k}") for ns in namespaces for k in range(12)]
    with router.client() as client:
        stored = client.pipeline(stores, lane="normal")
        read = client.pipeline(reads, lane="high")
        repeated = client.pipeline([stores[0]], lane="low")
    assert all(isinstance(reply, Ack) for reply in stored)
    assert repeated[0].duplicate

    served = Counter(
        reply.tier if isinstance(reply, Value) else "miss" for reply in read
    )
    assert served["miss"] == 8  # k10 and k11 of each namespace were never stored
    assert served["stm"] > 0  # the small cache cannot hold every key

    samples = scrape(url)
    assert (
        metric(samples, "tiermem_router_events_total", type="Store", lane="normal")
        == 40
    )
    assert metric(samples, "tiermem_router_events_total", type="Get", lane="high") == 48
    assert metric(samples, "tiermem_router_events_total", type="Store", lane="low") == 0
    assert metric(samples, "tiermem_router_duplicates_total") == 1
    assert (
        metric(samples, "tiermem_router_messages_received_total", lane="normal") == 40
    )
    assert metric(samples, "tiermem_router_messages_received_total", lane="high") == 48
    assert metric(samples, "tiermem_router_messages_received_total", lane="low") == 1
    for tier in ("cache", "stm", "im", "ltm", "miss"):
        assert (
            metric(samples, "tiermem_router_reads_total", tier=tier) == served[tier]
        ), tier
    assert metric(samples, "tiermem_router_log_append_events_sum") == 88
    assert metric(samples, "tiermem_router_log_append_seconds_count") >= 1
    assert metric(samples, "tiermem_router_log_append_seconds_sum") > 0
    assert metric(samples, "tiermem_router_log_last_seq") == 88
    assert metric(samples, "tiermem_router_loop_failures_total") == 0


def test_counters_match_router_counters(start_router):
    router = start_router(shards=2, settings=METRICS)
    with router.client() as client:
        client.pipeline([Store(key=f"k{i}", value=i) for i in range(30)], lane="low")
    samples = scrape(router.router.metrics_url)
    counters = router.router.counters
    assert counters["received.low"] == 30
    assert (
        metric(samples, "tiermem_router_messages_received_total", lane="low")
        == counters["received.low"]
    )


def test_apply_lag_zero_after_reads(start_router):
    router = start_router(shards=2, settings=METRICS)
    namespaces = [f"lag-{i}" for i in range(6)]
    with router.client() as client:
        client.pipeline([Store(namespace=ns, key="k", value=1) for ns in namespaces])
        # The router replies to a Get after its shard applied it and every
        # earlier event of that shard. So once every namespace's Get has its
        # reply, both shards have applied all they were sent.
        client.pipeline([Get(namespace=ns, key="k") for ns in namespaces])
    samples = scrape(router.router.metrics_url)
    applied = [
        metric(samples, "tiermem_router_shard_applied_seq", shard=str(shard))
        for shard in range(2)
    ]
    for shard in range(2):
        assert metric(samples, "tiermem_router_shard_apply_lag", shard=str(shard)) == 0
    assert max(applied) == 12
    assert metric(samples, "tiermem_router_inflight_batches") == 0
    assert metric(samples, "tiermem_router_pending_requests", kind="get") == 0


def test_bad_frames_counted_by_code(start_router):
    router = start_router(shards=1, settings=METRICS)
    normal = router.endpoints["normal"]
    cases = [
        ([b"not json or msgpack {"], "malformed"),
        ([b""], "empty_frame"),
        ([b'{"type": "Get", "key": "a"}', b"extra"], "extra_frames"),
        ([b'{"type": "Teleport", "key": "a"}'], "unknown_type"),
        ([b'{"type": "Store", "key": "a"}'], "missing_field"),
        (
            [b'{"type": "Store", "key": "a", "value": 1, "importance": 7}'],
            "invalid_field",
        ),
    ]
    for frames, _ in cases:
        send_raw(normal, frames)
    samples = scrape(router.router.metrics_url)
    for _, code in cases:
        assert metric(samples, "tiermem_router_error_replies_total", code=code) == 1, (
            code
        )
    assert metric(samples, "tiermem_router_error_replies_total", code="conflict") == 0
    assert metric(
        samples, "tiermem_router_messages_received_total", lane="normal"
    ) == len(cases)
    assert (
        metric(samples, "tiermem_router_events_total", type="Store", lane="normal") == 0
    )


def test_conflict_counted(start_router):
    router = start_router(shards=1, settings=METRICS)
    with router.client() as client:
        client.pipeline([Store(id="same", key="a", value=1)])
        replies = client.pipeline([Store(id="same", key="a", value=2)])
    assert isinstance(replies[0], Error)
    samples = scrape(router.router.metrics_url)
    assert metric(samples, "tiermem_router_error_replies_total", code="conflict") == 1


def test_busy_replies_counted(start_router, monkeypatch):
    gate = threading.Event()
    original = Shard.apply

    def held_apply(self, events, **kwargs):
        gate.wait(timeout=60)
        return original(self, events, **kwargs)

    monkeypatch.setattr(Shard, "apply", held_apply)
    settings = RouterSettings(
        ports=dict(METRICS.ports), metrics_port=0, max_inflight_batches=1, max_batch=10
    )
    router = start_router(shards=1, settings=settings)
    url = router.router.metrics_url
    try:
        with router.client(attempts=1) as client:
            # attempts=1: each request is sent once and its first reply
            # (Ack or Busy) is returned, so the client sees every Busy.
            replies = client.pipeline(
                [Store(key=f"k{i}", value=i) for i in range(100)], window=100
            )
        held = scrape(url)
    finally:
        gate.set()
    busy = sum(isinstance(reply, Busy) for reply in replies)
    acked = sum(isinstance(reply, Ack) for reply in replies)
    assert busy > 0
    assert busy + acked == 100
    assert (
        metric(
            held, "tiermem_router_busy_replies_total", lane="normal", reason="inflight"
        )
        == busy
    )
    assert (
        metric(
            held, "tiermem_router_busy_replies_total", lane="high", reason="inflight"
        )
        == 0
    )
    assert metric(held, "tiermem_router_inflight_batches") >= 1
    assert metric(held, "tiermem_router_shard_apply_lag", shard="0") > 0
    assert (
        metric(held, "tiermem_router_events_total", type="Store", lane="normal")
        == acked
    )


def test_status_and_digest_set_tier_gauges(start_router):
    router = start_router(shards=2, settings=METRICS)
    with router.client() as client:
        client.pipeline([Store(namespace=f"ns{i}", key="k", value=i) for i in range(5)])
        status = client.status()
        digest = client.digest()
    samples = scrape(router.router.metrics_url)
    for item in status.shards:
        assert (
            metric(samples, "tiermem_router_shard_keys", shard=str(item.shard))
            == item.keys
        )
    for item in digest.tiers:
        assert (
            metric(
                samples,
                "tiermem_router_digest_records",
                shard=str(item.shard),
                tier=item.tier,
            )
            == item.records
        )
    assert sum(item.keys for item in status.shards) == 5


def test_status_sets_pool_metrics(start_router):
    # STM keeps one record per namespace, so a Maintain moves two of three to IM.
    router = start_router(shards=1, policy=Policy(stm_capacity=1), settings=METRICS)
    with router.client() as client:
        client.pipeline([Store(namespace="pools", key=f"k{i}", value=i) for i in range(3)])
        client.pipeline([Maintain()])

        def im_committed() -> bool:
            client.status()
            samples = scrape(router.router.metrics_url)
            count = metric(
                samples, "tiermem_router_shard_pool_tasks_total", shard="0", tier="im", outcome="completed"
            )
            return bool(count)

        wait_for(im_committed, timeout=30, what="the IM commit of the Maintain in a Status reply")

    samples = scrape(router.router.metrics_url)
    (host,) = router.dispatcher.hosts
    for stats in host.pool_stats():
        labels = {"shard": "0", "tier": stats.name}
        for outcome in ("completed", "failed", "rejected", "cancelled"):
            assert (
                metric(samples, "tiermem_router_shard_pool_tasks_total", outcome=outcome, **labels)
                == getattr(stats, outcome)
            )
        assert metric(samples, "tiermem_router_shard_pool_max_workers", **labels) == stats.max_workers
        assert metric(samples, "tiermem_router_shard_pool_workers", **labels) <= stats.max_workers
        assert 0 <= metric(samples, "tiermem_router_shard_pool_utilization", **labels) <= 1
        assert metric(samples, "tiermem_router_shard_pool_busy_seconds_total", **labels) <= stats.busy_seconds
    by_tier = {stats.name: stats for stats in host.pool_stats()}
    assert by_tier["im"].completed >= 1
    assert by_tier["stm"].submitted == 0


def test_projection_lag_from_checkpoint(own_router):
    checkpoint = {"seq": 0}
    router = own_router(projection_checkpoint=lambda: checkpoint["seq"])
    with Client(router.endpoints) as client:
        client.pipeline([Store(key=f"k{i}", value=i) for i in range(9)])
    checkpoint["seq"] = 4
    samples = scrape(router.router.metrics_url)
    assert metric(samples, "tiermem_router_projection_checkpoint_seq") == 4
    assert metric(samples, "tiermem_router_projection_lag") == 5


def test_unroutable_reply_counted(own_router, monkeypatch):
    gate = threading.Event()
    original = Shard.apply

    def held_apply(self, events, **kwargs):
        gate.wait(timeout=60)
        return original(self, events, **kwargs)

    monkeypatch.setattr(Shard, "apply", held_apply)
    router = own_router(shards=1, monitor=True)
    try:
        context = zmq.Context.instance()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(router.endpoints["normal"])
        # The Get waits for the held shard, so its reply comes after the close.
        sock.send(b'{"type": "Get", "key": "gone"}')
        wait_for(
            lambda: (
                router.router.metrics.registry.get_sample_value(
                    "tiermem_router_pending_requests", {"kind": "get"}
                )
                == 1
            ),
            timeout=30,
            what="the Get to wait for its shard",
        )
        sock.close(linger=0)
        assert router.monitor.poll(30_000), "the router never saw the client disconnect"
    finally:
        gate.set()
    wait_for(
        lambda: (
            metric(
                scrape(router.router.metrics_url),
                "tiermem_router_replies_unroutable_total",
                lane="normal",
            )
            == 1
        ),
        timeout=30,
        what="the unroutable reply to be counted",
    )
    assert router.router.counters["reply.unroutable"] == 1


def test_two_routers_export_separately(start_router):
    first = start_router(shards=1, settings=METRICS)
    second = start_router(shards=1, settings=METRICS)
    assert first.router.metrics_url != second.router.metrics_url
    with first.client() as client:
        client.pipeline([Store(key=f"k{i}", value=i) for i in range(3)])
    assert (
        metric(
            scrape(first.router.metrics_url),
            "tiermem_router_messages_received_total",
            lane="normal",
        )
        == 3
    )
    assert (
        metric(
            scrape(second.router.metrics_url),
            "tiermem_router_messages_received_total",
            lane="normal",
        )
        == 0
    )


def test_endpoint_closed_with_router(start_router):
    router = start_router(shards=1, settings=METRICS)
    url = router.router.metrics_url
    scrape(url)
    router.stop()
    assert router.router.metrics_url is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_no_endpoint_by_default(start_router):
    router = start_router(shards=1)
    assert router.router.metrics_url is None
    with router.client() as client:
        client.store("k", 1)
    # The metrics are kept even without an endpoint.
    assert (
        router.router.metrics.registry.get_sample_value(
            "tiermem_router_events_total", {"type": "Store", "lane": "normal"}
        )
        == 1
    )
