"""The live event feed: every committed event, once and in order, for the page.

A background thread runs a `bus.subscriber.Subscriber`, which receives the
router's PUB stream and fills each gap from the log, so the feed receives
every committed event exactly once. The feed keeps the latest events in a bounded
buffer for pages that connect later, counts each shard's events that its
watermark does not cover yet (the overview's apply lag), and hands each
batch to the server, which forwards it to the open pages.

A `Forget` hides the values of the key's earlier `Store`s in the buffer and
on the pages. The feed cannot tell whether a conditional `Forget` was
rejected, so it hides them for every `Forget`, which errs on the side of
showing less.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

import redis
import structlog
import zmq

from bus.subscriber import Subscriber
from events.errors import TiermemError
from events.types import Event, Forget, Get, Maintain, Search, Store
from handlers.sharding import shard_of
from tiermem.console.queries import render_value
from tiermem.console.sources import StackSources

__all__ = ["EVENT_TYPES", "EventFeed", "describe_event", "matches"]

log = structlog.get_logger("tiermem.console")

EVENT_TYPES = ("Store", "Get", "Forget", "Maintain", "Search")

# Events kept for pages that connect later.
BUFFER_EVENTS = 2_000

# Seqs remembered per shard while its watermark has not reached them. A
# shard that stops applying while events keep coming reaches this bound,
# and its lag is then shown as "at least" this many.
MAX_PENDING_PER_SHARD = 1_000_000

# A batch goes to the pages after this many events, or this long after the
# previous batch, whichever comes first.
_BATCH_EVENTS = 500
_BATCH_SECONDS = 0.05

# While the PUB socket is silent, the subscriber reads the log this often
# (one ReadLog request), in case the stream's last events were dropped.
_IDLE_CHECK_S = 1.0

# Seconds of silence after which the subscriber's loop returns, so the
# thread can notice a stop request; the subscriber keeps its position.
_IDLE_RETURN_S = 2.0

# Wait before reconnecting after the bus failed, doubling up to the maximum.
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 5.0

_VALUE_PREVIEW = 200


def describe_event(event: Event) -> dict[str, Any]:
    """Return the fields of `event` that the live view shows, with a short value preview."""
    kind = event.__struct_config__.tag
    item: dict[str, Any] = {
        "seq": event.seq,
        "ts": event.ts,
        "type": kind,
        "namespace": event.namespace,
        "id": event.id,
    }
    if isinstance(event, Store):
        item["key"] = event.key
        item["value"], item["value_cut"] = render_value(event.value, _VALUE_PREVIEW)
        item["importance"] = event.importance
        item["tags"] = list(event.tags)
        item["ttl_s"] = event.ttl_s
        item["conditional"] = event.expected_version is not None
        item["redacted"] = False
    elif isinstance(event, (Get, Forget)):
        item["key"] = event.key
        if isinstance(event, Forget):
            item["conditional"] = event.expected_version is not None
    elif isinstance(event, Search):
        item["query"] = event.query
        item["limit"] = event.limit
    return item


class _ShardLag:
    """The seqs of one shard's events above its watermark, and how many it has applied."""

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.applied = 0
        self.overflowed = False

    def add(self, seq: int) -> None:
        if len(self.pending) >= MAX_PENDING_PER_SHARD:
            self.pending.popleft()
            self.overflowed = True
        self.pending.append(seq)

    def settle(self, watermark: int) -> None:
        while self.pending and self.pending[0] <= watermark:
            self.pending.popleft()
            self.applied += 1
        if not self.pending:
            self.overflowed = False


class EventFeed:
    """Follow the committed events of the stack in a background thread.

    `on_batch(events, redactions)` is called from that thread with each
    batch of described events and the Forgets among them, as
    `{"namespace", "key", "before_seq"}`: Store values of that key below
    `before_seq` are to be hidden.
    """

    def __init__(
        self,
        sources: StackSources,
        *,
        backlog: int,
        on_batch: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None],
    ) -> None:
        self.sources = sources
        self.backlog = backlog
        self.on_batch = on_batch
        self.problem: str | None = None
        self.next_seq: int | None = None
        self._shards = 0
        self._lag: list[_ShardLag] = []
        self._buffer: deque[dict[str, Any]] = deque()
        self._stores: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="console-feed", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._follow_until_stopped()
        except Exception as error:
            self.problem = (
                f"the live event feed stopped after an internal error ({error!r}); "
                "restart the console, and see its log for the traceback"
            )
            log.exception("console.feed.crashed", error=repr(error))
            raise

    def _follow_until_stopped(self) -> None:
        subscriber: Subscriber | None = None
        retry = _RETRY_FIRST_S
        while not self._stop.is_set():
            try:
                if subscriber is None:
                    subscriber = self._connect()
                self._follow(subscriber)
                retry = _RETRY_FIRST_S
            except (
                TiermemError,
                zmq.ZMQError,
                redis.RedisError,
                RuntimeError,
                TypeError,
            ) as error:
                # RuntimeError and TypeError are what Subscriber raises on a
                # log that returns the wrong seq or a wrong reply type.
                if subscriber is not None:
                    self.next_seq = subscriber.next_seq
                    subscriber.close()
                    subscriber = None
                message = str(error) or type(error).__name__
                if message != self.problem:
                    log.warning(
                        "console.feed.failed",
                        error=message,
                        next_seq=self.next_seq,
                        next=f"reconnecting in {retry:g} s",
                    )
                self.problem = message
                self._stop.wait(retry)
                retry = min(retry * 2, _RETRY_MAX_S)
        if subscriber is not None:
            subscriber.close()

    def _connect(self) -> Subscriber:
        endpoints = self.sources.endpoints()
        self.set_shards(self.sources.target().shards)
        if self.next_seq is None:
            try:
                last_seq = self.sources.event_log().last_seq()
            except redis.RedisError as error:
                raise self.sources.log_down(error) from error
            self.next_seq = max(1, last_seq - self.backlog + 1)
        subscriber = Subscriber(endpoints, from_seq=self.next_seq)
        # The defaults wait up to 50 s for a ReadLog reply; the page should
        # learn sooner that the router is gone.
        subscriber.client.timeout = self.sources.bus_timeout_s * 2
        subscriber.client.attempts = 2
        log.info(
            "console.feed.connected", pub=endpoints.get("pub"), from_seq=self.next_seq
        )
        return subscriber

    def _follow(self, subscriber: Subscriber) -> None:
        batch: list[dict[str, Any]] = []
        redactions: list[dict[str, Any]] = []
        flushed_at = 0.0
        try:
            for event in subscriber.events(
                idle_check_s=_IDLE_CHECK_S, timeout=_IDLE_RETURN_S
            ):
                self.problem = None
                item, redaction = self.record(event)
                batch.append(item)
                if redaction is not None:
                    redactions.append(redaction)
                now = time.monotonic()
                if len(batch) >= _BATCH_EVENTS or now - flushed_at >= _BATCH_SECONDS:
                    self.on_batch(batch, redactions)
                    batch, redactions = [], []
                    flushed_at = now
                if self._stop.is_set():
                    break
            self.problem = None
            self.next_seq = subscriber.next_seq
        finally:
            # Events already recorded reach the pages even when the bus failed.
            if batch or redactions:
                self.on_batch(batch, redactions)

    # ----------------------------------------------------------- state

    def set_shards(self, shards: int) -> None:
        """Set the stack's shard count, which places events for the lag counts."""
        with self._lock:
            if shards != self._shards:
                self._shards = shards
                self._lag = [_ShardLag() for _ in range(shards)]

    def record(self, event: Event) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Add one committed event to the buffer and the lag counts.

        Returns its description and, for a Forget, the redaction to send.
        """
        item = describe_event(event)
        seq = event.seq or 0
        redaction = None
        with self._lock:
            if isinstance(event, Maintain):
                for lag in self._lag:
                    lag.add(seq)
            elif not isinstance(event, Search) and self._shards:
                self._lag[shard_of(event.namespace, self._shards)].add(seq)
            if len(self._buffer) >= BUFFER_EVENTS:
                self._forget_buffered(self._buffer.popleft())
            self._buffer.append(item)
            if isinstance(event, Store):
                self._stores.setdefault((event.namespace, event.key), []).append(item)
            elif isinstance(event, Forget):
                for stored in self._stores.pop((event.namespace, event.key), []):
                    stored["value"] = None
                    stored["value_cut"] = False
                    stored["redacted"] = True
                redaction = {
                    "namespace": event.namespace,
                    "key": event.key,
                    "before_seq": seq,
                }
        return item, redaction

    def _forget_buffered(self, item: dict[str, Any]) -> None:
        if item["type"] != "Store":
            return
        identity = (item["namespace"], item["key"])
        stored = self._stores.get(identity)
        if stored and stored[0] is item:
            stored.pop(0)
            if not stored:
                del self._stores[identity]

    def recent(
        self,
        *,
        types: Collection[str] | None = None,
        namespace: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Return up to `limit` of the latest buffered events that pass the filters, oldest first."""
        found: list[dict[str, Any]] = []
        with self._lock:
            for item in reversed(self._buffer):
                if matches(item, types, namespace):
                    found.append(dict(item))
                    if len(found) >= limit:
                        break
        found.reverse()
        return found

    def settle(self, watermarks: dict[int, int]) -> dict[int, dict[str, Any]]:
        """Take the shards' watermarks; return each shard's pending and applied event counts.

        `pending` counts the shard's events seen by the feed above its
        watermark, `applied` those it has covered since the feed started.
        `at_least` is true when the pending count hit its bound.
        """
        result: dict[int, dict[str, Any]] = {}
        with self._lock:
            for shard, watermark in watermarks.items():
                if not 0 <= shard < len(self._lag):
                    continue
                lag = self._lag[shard]
                lag.settle(watermark)
                result[shard] = {
                    "pending": len(lag.pending),
                    "applied": lag.applied,
                    "at_least": lag.overflowed,
                }
        return result


def matches(
    item: dict[str, Any], types: Collection[str] | None, namespace: str | None
) -> bool:
    """Return whether a described event passes a type filter and a namespace filter (None: any)."""
    if types is not None and item["type"] not in types:
        return False
    return namespace is None or item["namespace"] == namespace
