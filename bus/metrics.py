"""Prometheus metrics of the router, and the HTTP endpoint that serves them.

Each `RouterMetrics` has a registry of its own, not prometheus-client's
global one, so one process can run several routers (the tests do). The
router thread updates counters and histograms once per lane per loop, or
once per batch. A collector reads the values the router keeps anyway (the
log's last seq, the requests waiting for a reply, the seq each shard was
sent and has applied) when a scrape arrives. It runs in the endpoint's
thread, so these values cost the router's loop nothing. docs/metrics.md
lists every metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from events.errors import ErrorCode, TiermemError
from events.types import (
    EVENT_TYPES,
    Event,
    Message,
    NotFound,
    ShardStatus,
    TierDigest,
    Value,
)
from tiers.pools import PoolStats

__all__ = [
    "POOL_OUTCOMES",
    "READ_TIERS",
    "RESYNC_LANE",
    "MetricsEndpoint",
    "MetricsEndpointError",
    "RouterMetrics",
    "RouterState",
]

log = structlog.get_logger("tiermem.metrics")

READ_TIERS = ("cache", "stm", "im", "ltm", "miss")
"""The `tier` label of reads: the tier in a `Value` reply, or `miss` for `NotFound`."""

RESYNC_LANE = "resync"
"""The `lane` label of events found in the log after an append that seemed to fail."""

BUSY_REASONS = ("inflight", "search")

POOL_OUTCOMES = ("completed", "failed", "rejected", "cancelled")
"""The `outcome` label of `tiermem_router_shard_pool_tasks`: the `PoolStats` count of each."""

# Seconds, from a small batch on a fast disk up to a Redis under load,
# because every append waits for its fsync.
_APPEND_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

# Messages or events per batch: powers of two up to twice the default
# max_batch of 2,000.
_BATCH_BUCKETS = tuple(float(2**power) for power in range(13))


class MetricsEndpointError(TiermemError):
    """The metrics endpoint could not listen on its address."""


class MetricsEndpoint:
    """An HTTP server, in a daemon thread, that serves one registry at any path.

    With `port` 0 the server takes a free port, and the `port` attribute
    contains the one chosen. `stop()` closes the listening socket.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(
                f"metrics port {port} is invalid: use 1 to 65535, or 0 for a free port"
            )
        try:
            self._server, self._thread = start_http_server(
                port, addr=host, registry=registry
            )
        except OSError as error:
            raise MetricsEndpointError(
                f"the metrics endpoint cannot listen on {host}:{port} ({error.strerror or error}); "
                "choose a free port, or 0 for a random one"
            ) from error
        self.host = host
        self.port: int = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class RouterState(NamedTuple):
    """The router values that its collector reads at scrape time, in the scraping thread."""

    last_seq: int
    inflight_batches: int
    pending_gets: int
    pending_searches: int
    pending_admin: int
    resend_queue: int


class RouterMetrics:
    """The metrics of one router and the registry that exports them.

    `state` is called at every scrape from the endpoint's thread, so it must
    only read values that the router thread replaces atomically (ints, and
    the lengths of dicts). `projection_checkpoint` returns the search
    projection's checkpoint; when it is None the projection metrics are
    left out.
    """

    def __init__(
        self,
        lanes: Sequence[str],
        shards: int,
        start_seq: int,
        state: Callable[[], RouterState],
        *,
        projection_checkpoint: Callable[[], int] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        ProcessCollector(registry=registry)

        self.received = Counter(
            "tiermem_router_messages_received",
            "Messages taken from each lane's socket, valid or not.",
            ["lane"],
            registry=registry,
        )
        self.lane_take = Histogram(
            "tiermem_router_lane_take_messages",
            "Messages taken from a lane in one loop, observed for each loop that took any.",
            ["lane"],
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "tiermem_router_events",
            "Events appended to the log, by event type and the lane they came on.",
            ["type", "lane"],
            registry=registry,
        )
        self.duplicates = Counter(
            "tiermem_router_duplicates",
            "Requests whose id was already logged with the same body, so the reply came from the log.",
            registry=registry,
        )
        self.busy = Counter(
            "tiermem_router_busy_replies",
            "Busy replies, by lane and reason (inflight: too many shard calls out; search: too many searches).",
            ["lane", "reason"],
            registry=registry,
        )
        self.errors = Counter(
            "tiermem_router_error_replies",
            "Error replies, by error code.",
            ["code"],
            registry=registry,
        )
        self.unroutable = Counter(
            "tiermem_router_replies_unroutable",
            "Replies not sent because the client had disconnected.",
            ["lane"],
            registry=registry,
        )
        self.deferred = Counter(
            "tiermem_router_replies_deferred",
            "Replies that found the client's pipe full and went to the resend queue.",
            ["lane"],
            registry=registry,
        )
        self.dropped = Counter(
            "tiermem_router_replies_dropped",
            "Replies lost because the resend queue was full.",
            ["lane"],
            registry=registry,
        )
        self.append_seconds = Histogram(
            "tiermem_router_log_append_seconds",
            "Seconds one batch append to the log took, fsync included.",
            buckets=_APPEND_SECONDS_BUCKETS,
            registry=registry,
        )
        self.append_events = Histogram(
            "tiermem_router_log_append_events",
            "Events in one batch appended to the log.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.append_failures = Counter(
            "tiermem_router_log_append_failures",
            "Batch appends that raised. Their clients got an unavailable Error.",
            registry=registry,
        )
        self.reads = Counter(
            "tiermem_router_reads",
            "Get replies by the tier that served them; miss is NotFound.",
            ["tier"],
            registry=registry,
        )
        self.loop_failures = Counter(
            "tiermem_router_loop_failures",
            "Router loops that raised; the router logged the error and went on.",
            registry=registry,
        )
        self.shard_keys = Gauge(
            "tiermem_router_shard_keys",
            "Keys of each shard, all tiers together, in the last Status reply.",
            ["shard"],
            registry=registry,
        )
        self.digest_records = Gauge(
            "tiermem_router_digest_records",
            "Records of each tier of each shard in the last Digest reply.",
            ["shard", "tier"],
            registry=registry,
        )
        self._precreate(lanes)

        self._dispatched = [start_seq] * shards
        self._applied = [start_seq] * shards
        self._batches: dict[int, tuple[int, int]] = {}
        # Children looked up once: `labels()` takes a lock and hashes the labels.
        self._received_children = {
            lane: self.received.labels(lane=lane) for lane in lanes
        }
        self._take_children = {lane: self.lane_take.labels(lane=lane) for lane in lanes}
        self._event_children: dict[tuple[str, type], Counter] = {}
        self._read_children = {
            tier: self.reads.labels(tier=tier) for tier in READ_TIERS
        }
        registry.register(_RouterStateCollector(self, state, projection_checkpoint))
        # (shard, tier) -> the pool's stats in the last Status reply and its
        # utilization since the reply before. Replaced whole by the router
        # thread and read by the scrape thread, so no lock is needed.
        self._pools: dict[tuple[int, str], tuple[PoolStats, float]] = {}
        registry.register(_PoolCollector(self))

    def _precreate(self, lanes: Sequence[str]) -> None:
        """Create the series of every known label value, so each is exported from 0."""
        for lane in lanes:
            self.received.labels(lane=lane)
            self.lane_take.labels(lane=lane)
            for reason in BUSY_REASONS:
                self.busy.labels(lane=lane, reason=reason)
            for counter in (self.unroutable, self.deferred, self.dropped):
                counter.labels(lane=lane)
            for kind in EVENT_TYPES:
                self.events.labels(type=kind.__struct_config__.tag, lane=lane)
        for kind in EVENT_TYPES:
            self.events.labels(type=kind.__struct_config__.tag, lane=RESYNC_LANE)
        for code in ErrorCode.ALL:
            self.errors.labels(code=code)

    # ------------------------------------------------------------ receiving

    def lane_taken(self, lane: str, taken: int, busy: int) -> None:
        """Count one loop's take from `lane`: `taken` messages, `busy` of them replied to with Busy."""
        if not taken:
            return
        self._received_children[lane].inc(taken)
        self._take_children[lane].observe(taken)
        if busy:
            self.busy.labels(lane=lane, reason="inflight").inc(busy)

    # ------------------------------------------------------------ the log

    def appended(
        self, events: Sequence[Event], lanes: Iterable[str], seconds: float | None
    ) -> None:
        """Count one appended batch. `seconds` is None for events found by a resync."""
        tally: dict[tuple[str, type], int] = {}
        for event, lane in zip(events, lanes, strict=True):
            key = (lane, type(event))
            tally[key] = tally.get(key, 0) + 1
        for key, count in tally.items():
            child = self._event_children.get(key)
            if child is None:
                lane, kind = key
                child = self.events.labels(type=kind.__struct_config__.tag, lane=lane)
                self._event_children[key] = child
            child.inc(count)
        if seconds is not None:
            self.append_seconds.observe(seconds)
            self.append_events.observe(len(events))

    # ------------------------------------------------------------ shards

    def batch_submitted(self, shard: int, token: int, last_seq: int) -> None:
        """Record that `shard` was sent a batch ending at `last_seq`."""
        self._batches[token] = (shard, last_seq)
        self._dispatched[shard] = max(self._dispatched[shard], last_seq)

    def batch_completed(
        self, token: int, replies: Sequence[Message], failed: bool
    ) -> None:
        """Record a finished batch and count the tiers that served its reads.

        A shard applies its batches in the order it was sent them, so when
        one completes, its watermark has reached that batch's last seq.
        """
        submitted = self._batches.pop(token, None)
        if submitted is not None and not failed:
            shard, last_seq = submitted
            self._applied[shard] = max(self._applied[shard], last_seq)
        if not replies:
            return
        tally: dict[str, int] = {}
        for reply in replies:
            kind = type(reply)
            if kind is Value:
                tier = reply.tier
            elif kind is NotFound:
                tier = "miss"
            else:
                continue
            tally[tier] = tally.get(tier, 0) + 1
        for tier, count in tally.items():
            child = self._read_children.get(tier)
            if child is None:
                child = self._read_children[tier] = self.reads.labels(tier=tier)
            child.inc(count)

    def shard_status(self, shards: Iterable[ShardStatus]) -> None:
        """Take each shard's key count and watermark from a Status reply."""
        for item in shards:
            self.shard_keys.labels(shard=str(item.shard)).set(item.keys)
            if (
                0 <= item.shard < len(self._applied)
                and item.watermark > self._applied[item.shard]
            ):
                self._applied[item.shard] = item.watermark

    def shard_pools(self, shard: int, pools: Iterable[PoolStats]) -> None:
        """Take the stats of a shard's tier pools from its Status reply.

        Utilization is the share of the pool's `max_workers` that ran tasks
        between this reply and the shard's previous one. For the first reply
        of a pool, or of a restarted one, it covers the time since the pool
        started.
        """
        updated = dict(self._pools)
        for stats in pools:
            key = (shard, stats.name)
            previous = updated.get(key)
            busy, window = stats.busy_seconds, stats.uptime_seconds
            if previous is not None and previous[0].started_unix_s == stats.started_unix_s:
                busy -= previous[0].busy_seconds
                window -= previous[0].uptime_seconds
            capacity = window * stats.max_workers
            utilization = min(1.0, max(0.0, busy / capacity)) if capacity > 0 else 0.0
            updated[key] = (stats, utilization)
        self._pools = updated

    def pool_samples(self) -> list[tuple[int, PoolStats, float]]:
        """Return (shard, stats, utilization) of every pool reported, by shard and tier."""
        return [(shard, stats, utilization) for (shard, _), (stats, utilization) in sorted(self._pools.items())]

    def digests(self, tiers: Iterable[TierDigest]) -> None:
        """Take each tier's record count from a Digest reply."""
        for item in tiers:
            self.digest_records.labels(shard=str(item.shard), tier=item.tier).set(
                item.records
            )

    # ------------------------------------------------------------ read at scrape

    def shard_seqs(self) -> list[tuple[int, int]]:
        """Return (dispatched seq, applied seq) of every shard."""
        return list(zip(list(self._dispatched), list(self._applied), strict=True))


class _RouterStateCollector(Collector):
    """The collector that reads the router's state when a scrape arrives (see `RouterMetrics`)."""

    def __init__(
        self,
        metrics: RouterMetrics,
        state: Callable[[], RouterState],
        projection_checkpoint: Callable[[], int] | None,
    ) -> None:
        self.metrics = metrics
        self.state = state
        self.projection_checkpoint = projection_checkpoint
        self._checkpoint_failures = 0
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        # Describing by collecting would read the projection database when
        # the collector is registered; an empty list skips that check.
        return []

    def collect(self) -> Iterator[Metric]:
        state = self.state()
        yield _gauge(
            "tiermem_router_log_last_seq",
            "Seq of the last event the router appended to the log.",
            state.last_seq,
        )
        yield _gauge(
            "tiermem_router_inflight_batches",
            "Shard calls sent and not yet completed.",
            state.inflight_batches,
        )
        pending = GaugeMetricFamily(
            "tiermem_router_pending_requests",
            "Requests received that have no reply yet, by what they wait for.",
            labels=["kind"],
        )
        pending.add_metric(["get"], state.pending_gets)
        pending.add_metric(["search"], state.pending_searches)
        pending.add_metric(["admin"], state.pending_admin)
        yield pending
        yield _gauge(
            "tiermem_router_resend_queue_replies",
            "Replies waiting in the resend queue for a full client pipe.",
            state.resend_queue,
        )

        dispatched = GaugeMetricFamily(
            "tiermem_router_shard_dispatched_seq",
            "Last seq sent to each shard.",
            labels=["shard"],
        )
        applied = GaugeMetricFamily(
            "tiermem_router_shard_applied_seq",
            "Last seq each shard has applied, from its completed batches and Status replies.",
            labels=["shard"],
        )
        lag = GaugeMetricFamily(
            "tiermem_router_shard_apply_lag",
            "Seqs between the last event sent to each shard and the last one it applied.",
            labels=["shard"],
        )
        for shard, (sent, done) in enumerate(self.metrics.shard_seqs()):
            label = [str(shard)]
            dispatched.add_metric(label, sent)
            applied.add_metric(label, done)
            lag.add_metric(label, max(0, sent - done))
        yield dispatched
        yield applied
        yield lag

        checkpoint = self._read_checkpoint()
        if checkpoint is not None:
            yield _gauge(
                "tiermem_router_projection_checkpoint_seq",
                "Checkpoint of the search projection.",
                checkpoint,
            )
            yield _gauge(
                "tiermem_router_projection_lag",
                "Seqs the search projection is behind the log.",
                max(0, state.last_seq - checkpoint),
            )

    def _read_checkpoint(self) -> int | None:
        if self.projection_checkpoint is None:
            return None
        try:
            checkpoint = self.projection_checkpoint()
        except Exception as error:  # noqa: BLE001 - a failed read must not fail the scrape
            with self._lock:
                self._checkpoint_failures += 1
                failures = self._checkpoint_failures
            # Logs the 1st, 2nd, 4th, 8th, ... failure, so a database that
            # stays unreadable does not log at every scrape.
            if failures & (failures - 1) == 0:
                log.warning(
                    "router.metrics.checkpoint_failed",
                    error=repr(error),
                    failures=failures,
                    next="projection metrics left out of this scrape",
                )
            return None
        return checkpoint


class _PoolCollector(Collector):
    """The collector of the shards' tier pools, from the last Status reply of each shard.

    The task and busy-time counts restart from 0 when a shard's process
    restarts, as counters do after a reset, so `rate()` handles them.
    """

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        labels = ["shard", "tier"]
        workers = GaugeMetricFamily(
            "tiermem_router_shard_pool_workers",
            "Worker threads of each shard's tier pool, in the last Status reply.",
            labels=labels,
        )
        max_workers = GaugeMetricFamily(
            "tiermem_router_shard_pool_max_workers",
            "Maximum worker threads of each shard's tier pool.",
            labels=labels,
        )
        utilization = GaugeMetricFamily(
            "tiermem_router_shard_pool_utilization",
            "Share of a tier pool's max_workers that ran tasks between the shard's last two Status replies.",
            labels=labels,
        )
        busy = CounterMetricFamily(
            "tiermem_router_shard_pool_busy_seconds",
            "Seconds the workers of each shard's tier pool spent running tasks, in the last Status reply.",
            labels=labels,
        )
        tasks = CounterMetricFamily(
            "tiermem_router_shard_pool_tasks",
            "Tasks of each shard's tier pool by outcome, in the last Status reply.",
            labels=[*labels, "outcome"],
        )

        for shard, stats, share in self.metrics.pool_samples():
            label = [str(shard), stats.name]
            workers.add_metric(label, stats.workers)
            max_workers.add_metric(label, stats.max_workers)
            utilization.add_metric(label, share)
            busy.add_metric(label, stats.busy_seconds)
            for outcome in POOL_OUTCOMES:
                tasks.add_metric([*label, outcome], getattr(stats, outcome))

        yield workers
        yield max_workers
        yield utilization
        yield busy
        yield tasks


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)
