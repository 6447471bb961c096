"""RouterMetrics of the shards' tier pools: the values of a Status reply, and utilization between replies."""

from __future__ import annotations

import pytest

from bus.metrics import POOL_OUTCOMES, RouterMetrics, RouterState
from tiers.pools import PoolStats

LANES = ("high", "normal", "low")


def new_metrics() -> RouterMetrics:
    state = RouterState(
        last_seq=0,
        inflight_batches=0,
        pending_gets=0,
        pending_searches=0,
        pending_admin=0,
        resend_queue=0,
    )
    return RouterMetrics(LANES, 2, 0, lambda: state)


def sample(metrics: RouterMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def stats(
    name: str = "ltm",
    *,
    busy_seconds: float = 1.0,
    uptime_seconds: float = 10.0,
    started_unix_s: float = 1_000.0,
    max_workers: int = 2,
    **counts: int,
) -> PoolStats:
    fields = dict.fromkeys(
        ("workers", "busy", "idle", "queued", "peak_workers", "submitted", *POOL_OUTCOMES), 0
    )
    fields.update(counts)
    return PoolStats(
        name=name,
        min_workers=0,
        max_workers=max_workers,
        queue_size=8,
        busy_seconds=busy_seconds,
        uptime_seconds=uptime_seconds,
        started_unix_s=started_unix_s,
        **fields,
    )


def test_pool_metrics_absent_before_status():
    metrics = new_metrics()

    assert sample(metrics, "tiermem_router_shard_pool_workers", shard="0", tier="ltm") is None


def test_pool_metrics_from_status():
    metrics = new_metrics()

    metrics.shard_pools(
        1, [stats("im", workers=1, completed=7, failed=2, rejected=1, cancelled=3, max_workers=4)]
    )

    labels = {"shard": "1", "tier": "im"}
    assert sample(metrics, "tiermem_router_shard_pool_workers", **labels) == 1
    assert sample(metrics, "tiermem_router_shard_pool_max_workers", **labels) == 4
    assert sample(metrics, "tiermem_router_shard_pool_busy_seconds_total", **labels) == 1.0
    for outcome, count in [("completed", 7), ("failed", 2), ("rejected", 1), ("cancelled", 3)]:
        assert sample(metrics, "tiermem_router_shard_pool_tasks_total", outcome=outcome, **labels) == count


def test_pool_utilization_first_reply_covers_uptime():
    metrics = new_metrics()

    metrics.shard_pools(0, [stats(busy_seconds=5.0, uptime_seconds=10.0, max_workers=2)])

    assert sample(metrics, "tiermem_router_shard_pool_utilization", shard="0", tier="ltm") == 0.25


def test_pool_utilization_between_replies():
    metrics = new_metrics()
    metrics.shard_pools(0, [stats(busy_seconds=1.0, uptime_seconds=10.0, max_workers=1)])

    metrics.shard_pools(0, [stats(busy_seconds=4.0, uptime_seconds=14.0, max_workers=1)])

    assert sample(metrics, "tiermem_router_shard_pool_utilization", shard="0", tier="ltm") == 0.75


def test_pool_utilization_after_restart():
    metrics = new_metrics()
    metrics.shard_pools(0, [stats(busy_seconds=9.0, uptime_seconds=100.0, max_workers=1)])

    restarted = stats(busy_seconds=1.0, uptime_seconds=2.0, max_workers=1, started_unix_s=2_000.0)
    metrics.shard_pools(0, [restarted])

    assert sample(metrics, "tiermem_router_shard_pool_utilization", shard="0", tier="ltm") == 0.5
    assert sample(metrics, "tiermem_router_shard_pool_busy_seconds_total", shard="0", tier="ltm") == 1.0


def test_pool_utilization_same_snapshot_is_zero():
    metrics = new_metrics()
    metrics.shard_pools(0, [stats()])

    metrics.shard_pools(0, [stats()])

    assert sample(metrics, "tiermem_router_shard_pool_utilization", shard="0", tier="ltm") == 0.0


@pytest.mark.parametrize("shard", [0, 1])
def test_pool_metrics_kept_per_shard(shard):
    metrics = new_metrics()
    metrics.shard_pools(0, [stats(workers=1)])
    metrics.shard_pools(1, [stats(workers=0)])

    expected = 1 if shard == 0 else 0
    assert sample(metrics, "tiermem_router_shard_pool_workers", shard=str(shard), tier="ltm") == expected
