"""RouterMetrics without a router: tallies, apply lag, scrape-time values, the endpoint."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from bus.metrics import (
    MetricsEndpoint,
    MetricsEndpointError,
    RouterMetrics,
    RouterState,
)
from events.types import Ack, Get, NotFound, ShardStatus, Store, Value

LANES = ("high", "normal", "low")


def idle_state() -> RouterState:
    return RouterState(
        last_seq=0,
        inflight_batches=0,
        pending_gets=0,
        pending_searches=0,
        pending_admin=0,
        resend_queue=0,
    )


def new_metrics(shards: int = 2, start_seq: int = 0, **kwargs) -> RouterMetrics:
    return RouterMetrics(LANES, shards, start_seq, idle_state, **kwargs)


def sample(metrics: RouterMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_registries_independent():
    first = new_metrics()
    second = new_metrics()
    first.lane_taken("normal", 3, 0)
    assert sample(first, "tiermem_router_messages_received_total", lane="normal") == 3
    assert sample(second, "tiermem_router_messages_received_total", lane="normal") == 0


def test_lane_taken_counts_busy_and_take():
    metrics = new_metrics()
    metrics.lane_taken("low", 5, 2)
    metrics.lane_taken("low", 0, 0)
    assert sample(metrics, "tiermem_router_messages_received_total", lane="low") == 5
    assert (
        sample(
            metrics, "tiermem_router_busy_replies_total", lane="low", reason="inflight"
        )
        == 2
    )
    # A loop that took nothing is not observed.
    assert sample(metrics, "tiermem_router_lane_take_messages_count", lane="low") == 1
    assert sample(metrics, "tiermem_router_lane_take_messages_sum", lane="low") == 5


def test_appended_tallies_type_and_lane():
    metrics = new_metrics()
    events = [Store(key="a", value=1), Store(key="b", value=2), Get(key="a")]
    metrics.appended(events, ["normal", "normal", "high"], 0.002)
    assert (
        sample(metrics, "tiermem_router_events_total", type="Store", lane="normal") == 2
    )
    assert sample(metrics, "tiermem_router_events_total", type="Get", lane="high") == 1
    assert (
        sample(metrics, "tiermem_router_events_total", type="Get", lane="normal") == 0
    )
    assert sample(metrics, "tiermem_router_log_append_events_sum") == 3
    assert sample(metrics, "tiermem_router_log_append_seconds_count") == 1


def test_appended_by_resync_not_timed():
    metrics = new_metrics()
    metrics.appended([Store(key="a", value=1)], ["resync"], None)
    assert (
        sample(metrics, "tiermem_router_events_total", type="Store", lane="resync") == 1
    )
    assert sample(metrics, "tiermem_router_log_append_seconds_count") == 0
    assert sample(metrics, "tiermem_router_log_append_events_count") == 0


def test_appended_lanes_must_match_events():
    metrics = new_metrics()
    with pytest.raises(ValueError):
        metrics.appended([Store(key="a", value=1)], [], 0.001)


def test_apply_lag_follows_completions():
    metrics = new_metrics(shards=2, start_seq=10)
    metrics.batch_submitted(0, token=1, last_seq=15)
    metrics.batch_submitted(0, token=2, last_seq=20)
    metrics.batch_submitted(1, token=3, last_seq=18)
    assert sample(metrics, "tiermem_router_shard_apply_lag", shard="0") == 10
    assert sample(metrics, "tiermem_router_shard_apply_lag", shard="1") == 8
    metrics.batch_completed(1, [], failed=False)
    metrics.batch_completed(3, [], failed=False)
    assert sample(metrics, "tiermem_router_shard_applied_seq", shard="0") == 15
    assert sample(metrics, "tiermem_router_shard_apply_lag", shard="0") == 5
    assert sample(metrics, "tiermem_router_shard_apply_lag", shard="1") == 0
    assert sample(metrics, "tiermem_router_shard_dispatched_seq", shard="0") == 20


def test_failed_batch_keeps_applied_seq():
    metrics = new_metrics(shards=1, start_seq=0)
    metrics.batch_submitted(0, token=7, last_seq=4)
    metrics.batch_completed(7, [], failed=True)
    assert sample(metrics, "tiermem_router_shard_applied_seq", shard="0") == 0
    assert sample(metrics, "tiermem_router_shard_apply_lag", shard="0") == 4


def test_status_raises_applied_seq():
    metrics = new_metrics(shards=2, start_seq=0)
    metrics.batch_submitted(1, token=1, last_seq=9)
    metrics.shard_status(
        [
            ShardStatus(shard=0, watermark=0, pid=1, node="n", keys=0),
            ShardStatus(shard=1, watermark=9, pid=1, node="n", keys=4),
        ]
    )
    assert sample(metrics, "tiermem_router_shard_apply_lag", shard="1") == 0
    assert sample(metrics, "tiermem_router_shard_keys", shard="1") == 4


def test_completion_of_unknown_token_ignored():
    metrics = new_metrics(shards=1, start_seq=3)
    metrics.batch_completed(99, [], failed=False)
    assert sample(metrics, "tiermem_router_shard_applied_seq", shard="0") == 3


def test_reads_counted_by_tier():
    metrics = new_metrics()
    replies = [
        Value(id="1", seq=1, key="a", value=1, tier="cache"),
        Value(id="2", seq=2, key="b", value=1, tier="stm"),
        Value(id="3", seq=3, key="c", value=1, tier="cache"),
        NotFound(id="4", seq=4, key="d"),
        Ack(id="5", seq=5),
    ]
    metrics.batch_completed(1, replies, failed=False)
    assert sample(metrics, "tiermem_router_reads_total", tier="cache") == 2
    assert sample(metrics, "tiermem_router_reads_total", tier="stm") == 1
    assert sample(metrics, "tiermem_router_reads_total", tier="miss") == 1
    assert sample(metrics, "tiermem_router_reads_total", tier="ltm") == 0


def test_state_read_at_scrape():
    state = RouterState(
        last_seq=40,
        inflight_batches=3,
        pending_gets=2,
        pending_searches=1,
        pending_admin=0,
        resend_queue=5,
    )
    metrics = RouterMetrics(
        LANES, 1, 0, lambda: state, projection_checkpoint=lambda: 25
    )
    assert sample(metrics, "tiermem_router_log_last_seq") == 40
    assert sample(metrics, "tiermem_router_inflight_batches") == 3
    assert sample(metrics, "tiermem_router_pending_requests", kind="get") == 2
    assert sample(metrics, "tiermem_router_pending_requests", kind="search") == 1
    assert sample(metrics, "tiermem_router_resend_queue_replies") == 5
    assert sample(metrics, "tiermem_router_projection_checkpoint_seq") == 25
    assert sample(metrics, "tiermem_router_projection_lag") == 15


def test_projection_metrics_absent_without_reader():
    metrics = new_metrics()
    assert sample(metrics, "tiermem_router_projection_lag") is None


def test_failing_checkpoint_leaves_projection_out():
    def broken() -> int:
        raise OSError("disk gone")

    metrics = new_metrics(projection_checkpoint=broken)
    assert sample(metrics, "tiermem_router_projection_lag") is None
    assert sample(metrics, "tiermem_router_log_last_seq") == 0


def test_endpoint_serves_registry():
    metrics = new_metrics()
    metrics.lane_taken("high", 2, 0)
    endpoint = MetricsEndpoint(metrics.registry, "127.0.0.1", 0)
    try:
        assert endpoint.port > 0
        with urllib.request.urlopen(endpoint.url, timeout=10) as response:
            body = response.read().decode()
    finally:
        endpoint.stop()
    assert 'tiermem_router_messages_received_total{lane="high"} 2.0' in body


def test_endpoint_stop_closes_port():
    endpoint = MetricsEndpoint(new_metrics().registry, "127.0.0.1", 0)
    url = endpoint.url
    endpoint.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_endpoint_port_in_use_raises():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsEndpointError, match=f"127.0.0.1:{port}"):
            MetricsEndpoint(new_metrics().registry, "127.0.0.1", port)


@pytest.mark.parametrize("port", [-1, 65536])
def test_endpoint_invalid_port_raises(port):
    with pytest.raises(ValueError, match="metrics port"):
        MetricsEndpoint(new_metrics().registry, "127.0.0.1", port)
