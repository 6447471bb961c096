"""The priority router: the only way events enter tiermem.

One ROUTER socket per lane (high, normal, low). Each loop drains the lanes
high first, decodes and checks every message, deduplicates by event id,
gives the new events consecutive sequence numbers, appends them to the log
in one transaction (one fsync), and only then acknowledges them and hands
each shard its part in one call. `Get` is answered when its shard has
applied it, which is after every earlier event of that shard.
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgspec
import structlog
import xxhash
import zmq

from bus.auth import LANE_DOMAIN, PUB_DOMAIN, AuthSettings, Gatekeeper
from bus.dispatch import Completion, Dispatcher, Waker
from bus.metrics import RESYNC_LANE, MetricsEndpoint, RouterMetrics, RouterState
from events.codec import JSON, MSGPACK, decode_request, detect_codec, encode_event, encode_reply
from events.errors import ErrorCode, ProtocolError
from events.limits import Limits
from events.log import EventLog
from events.types import (
    Ack,
    Busy,
    Digest,
    DigestReply,
    Error,
    Event,
    Get,
    Maintain,
    LogEvents,
    Message,
    ReadLog,
    Rebuild,
    Rebuilt,
    Search,
    ShardRebuild,
    ShardStatus,
    Status,
    StatusReply,
    TierDigest,
)
from handlers.actor import ShardStatusInfo
from handlers.shard import RecoveryReport, answered_by_shard
from handlers.sharding import shard_of

__all__ = ["LANES", "Router", "RouterSettings", "publish_topic"]

LANES = ("high", "normal", "low")

_body_encoder = msgspec.msgpack.Encoder()
_digests_type = msgspec.msgpack.Decoder(tuple[int, list[TierDigest]])
_status_type = msgspec.msgpack.Decoder(ShardStatusInfo)
_rebuild_type = msgspec.msgpack.Decoder(RecoveryReport)


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Endpoints and bounds of the router. Every queue here is bounded.

    `client_window` is the number of requests one client may have in
    flight; the send high-water mark is sized above it, so a reply is never
    dropped by ZeroMQ for lack of room (a ROUTER drops silently past its
    send mark unless ROUTER_MANDATORY is set, and then the send fails).

    `metrics_port` is the TCP port of the Prometheus endpoint on
    `metrics_host`: None serves no endpoint, 0 takes a free port.
    """

    host: str = "127.0.0.1"
    ports: dict[str, int] = msgspec.field(
        default_factory=lambda: {"high": 7451, "normal": 7452, "low": 7453, "pub": 7454}
    )
    limits: Limits = Limits()
    max_batch: int = 2000
    low_lane_batch: int = 256
    low_lane_share: int = 32
    max_inflight_batches: int = 64
    client_window: int = 4096
    receive_hwm: int = 10_000
    pub_hwm: int = 100_000
    heartbeat_ms: int = 5000
    busy_retry_ms: int = 50
    auth: AuthSettings = AuthSettings()
    search_threads: int = 4
    max_pending_searches: int = 256
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None

    @property
    def send_hwm(self) -> int:
        return self.client_window * 4

    def endpoint(self, lane: str) -> str:
        return f"tcp://{self.host}:{self.ports[lane]}"


class _Pending(msgspec.Struct):
    """The return address of one request: lane, peer identity, envelope and codec."""

    lane: str
    identity: bytes
    delimited: bool
    codec: str
    request_id: str


class _AdminCall(msgspec.Struct):
    pending: _Pending
    kind: str
    remaining: int
    seq: int
    results: list[Any] = []
    # For digests: the last seq sent to each shard when the call started,
    # which each shard's watermark must have reached.
    expected: dict[int, int] = {}


class Router:
    """Serve the lanes until `stop()`; see the module docstring for the loop."""

    def __init__(
        self,
        settings: RouterSettings,
        event_log: EventLog,
        dispatcher: Dispatcher,
        waker: Waker,
        *,
        search: Callable[[Search], Message] | None = None,
        context: zmq.Context | None = None,
        projection_checkpoint: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.search = search
        self._search_pool = ThreadPoolExecutor(max_workers=settings.search_threads, thread_name_prefix="search")
        self._searches: dict[Future, _Pending] = {}
        self.log = event_log
        self.dispatcher = dispatcher
        self.waker = waker
        self.context = context or zmq.Context.instance()
        self.seq = event_log.last_seq()
        self.last_ts = self._last_ts()
        self._stop = threading.Event()
        self._token = 0
        self._last_sent: dict[int, int] = {}
        self._gets: dict[tuple[int, str], list[_Pending]] = {}
        self._batch_gets: dict[int, list[str]] = {}
        self._admin: dict[int, _AdminCall] = {}
        self._resend: deque[tuple[str, list[bytes]]] = deque(maxlen=settings.client_window * 4)
        self.counters: dict[str, int] = {}
        self.sockets: dict[str, zmq.Socket] = {}
        self.pub: zmq.Socket | None = None
        self.endpoints: dict[str, str] = {}
        self.log_tag = structlog.get_logger("tiermem.router")
        self.gatekeeper = Gatekeeper(settings.auth, self.context) if settings.auth.enabled else None
        # `projection_checkpoint` returns the search projection's checkpoint
        # for the projection lag metric. The scrape thread calls it.
        self.metrics = RouterMetrics(
            LANES, dispatcher.shards, self.seq, self._metrics_state, projection_checkpoint=projection_checkpoint
        )
        self.metrics_endpoint: MetricsEndpoint | None = None

    # ----------------------------------------------------------- lifecycle

    def _last_ts(self) -> int:
        if self.seq == 0:
            return 0
        last = self.log.read(self.seq - 1, 1)
        return last[0].ts or 0 if last else 0

    def bind(self) -> dict[str, str]:
        """Bind every lane and the PUB socket; return the endpoints in use."""
        settings = self.settings
        if self.gatekeeper is not None:
            # The ZAP handler must run before any socket accepts a peer.
            self.gatekeeper.start()
        for lane in LANES:
            sock = self.context.socket(zmq.ROUTER)
            if self.gatekeeper is not None:
                self.gatekeeper.secure(sock, LANE_DOMAIN)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.SNDHWM, settings.send_hwm)
            sock.setsockopt(zmq.RCVHWM, settings.receive_hwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, settings.heartbeat_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, settings.heartbeat_ms * 3)
            self.endpoints[lane] = self._bind(sock, settings.ports[lane])
            self.sockets[lane] = sock
        pub = self.context.socket(zmq.PUB)
        if self.gatekeeper is not None:
            self.gatekeeper.secure(pub, PUB_DOMAIN)
        pub.setsockopt(zmq.SNDHWM, settings.pub_hwm)
        pub.setsockopt(zmq.LINGER, 0)
        self.endpoints["pub"] = self._bind(pub, settings.ports["pub"])
        self.pub = pub
        if settings.metrics_port is not None:
            self.metrics_endpoint = MetricsEndpoint(self.metrics.registry, settings.metrics_host, settings.metrics_port)
            self.log_tag.info("router.metrics.started", url=self.metrics_endpoint.url)
        self.log_tag.info("router.bound", last_seq=self.seq, **self.endpoints)
        return dict(self.endpoints)

    @property
    def metrics_url(self) -> str | None:
        """The URL of the Prometheus endpoint, or None when it is off or not started."""
        return self.metrics_endpoint.url if self.metrics_endpoint is not None else None

    def _metrics_state(self) -> RouterState:
        # Called from the scrape thread: only ints and dict lengths, which the
        # router thread replaces atomically.
        return RouterState(
            last_seq=self.seq,
            inflight_batches=self.dispatcher.inflight(),
            pending_gets=len(self._gets),
            pending_searches=len(self._searches),
            pending_admin=len(self._admin),
            resend_queue=len(self._resend),
        )

    def _bind(self, sock: zmq.Socket, port: int) -> str:
        if port == 0:
            chosen = sock.bind_to_random_port(f"tcp://{self.settings.host}")
            return f"tcp://{self.settings.host}:{chosen}"
        endpoint = f"tcp://{self.settings.host}:{port}"
        sock.bind(endpoint)
        return endpoint

    def stop(self) -> None:
        self._stop.set()
        self.waker.wake()

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        if self.pub is not None:
            self.pub.close(linger=0)
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
        self.sockets = {}
        self.pub = None
        self._search_pool.shutdown(wait=False, cancel_futures=True)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
            self.metrics_endpoint = None
            self.log_tag.info("router.metrics.stopped")

    def serve_forever(self) -> None:
        """Run the loop until `stop()`; then wait briefly for shards to finish."""
        poller = zmq.Poller()
        for sock in self.sockets.values():
            poller.register(sock, zmq.POLLIN)
        poller.register(self.waker.read_fd, zmq.POLLIN)
        self.log_tag.info("router.started", last_seq=self.seq, shards=self.dispatcher.shards)
        while not self._stop.is_set():
            ready = dict(poller.poll(100 if not self._resend else 5))
            try:
                if self.waker.read_fd in ready:
                    self.waker.drain()
                self._handle_completions()
                self._retry_sends()
                if any(sock in ready for sock in self.sockets.values()):
                    self._drain_lanes()
            except Exception:  # noqa: BLE001 - one bad batch must not stop the router
                self._count("loop.failed")
                self.metrics.loop_failures.inc()
                self.log_tag.exception("router.loop.failed", last_seq=self.seq, next="serving the next batch")
        deadline = time.monotonic() + 10
        while self.dispatcher.inflight() and time.monotonic() < deadline:
            time.sleep(0.01)
            self._handle_completions()
        self.log_tag.info("router.stopped", last_seq=self.seq)

    # ----------------------------------------------------------- receiving

    def _count(self, name: str, amount: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + amount

    def _drain_lanes(self) -> None:
        settings = self.settings
        overloaded = self.dispatcher.inflight() >= settings.max_inflight_batches
        budget = settings.max_batch
        messages: list[tuple[_Pending, Message]] = []
        for lane in LANES:
            if lane == "low":
                # At most low_lane_batch per loop, so a high-lane request waits
                # behind one small batch of a low flood, not a large one; at
                # least low_lane_share, so floods above never starve the low lane.
                share = max(settings.low_lane_share, min(budget, settings.low_lane_batch))
            else:
                share = budget
            taken = self._receive(lane, share, messages, busy=overloaded and lane != "high")
            budget = max(0, budget - taken)
        if messages:
            self._process(messages)

    def _receive(self, lane: str, limit: int, out: list, *, busy: bool) -> int:
        sock = self.sockets[lane]
        taken = 0
        answered_busy = 0
        secured = self.gatekeeper is not None
        while taken < limit:
            user_id = None
            try:
                if secured:
                    raw = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    user_id = raw[-1].get("User-Id")
                    frames = [frame.bytes for frame in raw]
                else:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            taken += 1
            parsed = self._parse(lane, frames)
            if parsed is None:
                continue
            pending, payload = parsed
            if busy:
                answered_busy += 1
                self._reply(pending, Busy(id=_peek_id(payload), lane=lane, retry_after_ms=self.settings.busy_retry_ms))
                continue
            try:
                message, codec = decode_request(payload, self.settings.limits)
            except ProtocolError as error:
                self._reject(pending, error)
                continue
            except Exception as error:  # noqa: BLE001 - a decoder bug must not drop the other messages of the batch
                self.log_tag.error("router.decode.failed", lane=lane, error=repr(error), next="replying internal")
                self._reject(pending, ProtocolError(ErrorCode.INTERNAL, "the router failed to decode this frame", event_id=_peek_id(payload)))
                continue
            pending.codec = codec
            if secured:
                denial = self.gatekeeper.denial(user_id, message)
                if denial is not None:
                    self._forbid(pending, message, user_id, denial)
                    continue
            if message.id is None:
                message = msgspec.structs.replace(message, id=uuid.uuid4().hex)
            pending.request_id = message.id or ""
            out.append((pending, message))
        # Counted once per lane per loop, not per message. A loop that raises
        # before this line loses its counts, and counts as a loop failure.
        if taken:
            self._count(f"received.{lane}", taken)
        if answered_busy:
            self._count(f"busy.{lane}", answered_busy)
        self.metrics.lane_taken(lane, taken, answered_busy)
        return taken

    def _parse(self, lane: str, frames: list[bytes]) -> tuple[_Pending, bytes] | None:
        identity, rest = frames[0], frames[1:]
        delimited = len(rest) >= 2 and rest[0] == b""
        body = rest[1:] if delimited else rest
        codec = detect_codec(body[0]) if body and body[0] else JSON
        pending = _Pending(lane=lane, identity=identity, delimited=delimited, codec=codec, request_id="")
        if not body or (len(body) == 1 and not body[0]):
            self._reject(pending, ProtocolError(ErrorCode.EMPTY_FRAME, "the message has no payload frame, or it is empty"))
            return None
        if len(body) > 1:
            self._reject(
                pending,
                ProtocolError(
                    ErrorCode.EXTRA_FRAMES,
                    f"expected one payload frame, got {len(body)}; send each request as a single frame",
                ),
            )
            return None
        return pending, body[0]

    def _forbid(self, pending: _Pending, message: Message, user_id: str | None, reason: str) -> None:
        self._count("error.forbidden")
        # The audit line names the client and what it tried, never values.
        self.log_tag.warning(
            "router.forbidden",
            lane=pending.lane,
            client_key=(user_id or "")[:8] + "...",
            request_type=message.__struct_config__.tag,
            namespace=getattr(message, "namespace", None),
            event_id=message.id,
            reason=reason,
        )
        self._reply(pending, Error(id=message.id, code=ErrorCode.FORBIDDEN, message=reason))

    def _reject(self, pending: _Pending, error: ProtocolError) -> None:
        self._count(f"error.{error.code}")
        self.log_tag.info("router.rejected", lane=pending.lane, code=error.code, field=error.field, event_id=error.event_id)
        self._reply(pending, Error(id=error.event_id, code=error.code, message=error.message, field=error.field))

    # ----------------------------------------------------------- sequencing

    def _process(self, messages: list[tuple[_Pending, Message]]) -> None:
        events: list[tuple[_Pending, Event]] = []
        for pending, message in messages:
            if isinstance(message, Event):
                events.append((pending, message))
            elif isinstance(message, Status):
                self._start_admin(pending, "status")
            elif isinstance(message, ReadLog):
                self._read_log(pending, message)
            elif isinstance(message, Rebuild):
                self._sequence(events)
                events = []
                self._start_admin(pending, "rebuild", message.shard)
            elif isinstance(message, Digest):
                # Admin calls are queued behind everything sequenced so far,
                # so first commit the events that arrived before this one.
                self._sequence(events)
                events = []
                self._start_admin(pending, "digests")
        self._sequence(events)

    def _sequence(self, events: list[tuple[_Pending, Event]]) -> None:
        if not events:
            return
        try:
            found = self.log.lookup([event.id or "" for _, event in events])
        except Exception as error:  # noqa: BLE001 - every client gets an answer
            self.log_tag.error("router.lookup.failed", events=len(events), error=str(error), next="replying unavailable")
            for pending, event in events:
                self._reply(pending, Error(id=event.id, code=ErrorCode.UNAVAILABLE, message=f"the event log is unavailable ({error}); retry with the same id"))
            return
        new: list[Event] = []
        new_pending: list[_Pending] = []
        hashes: list[int] = []
        seen: dict[str, tuple[int, int]] = {}
        duplicates: list[tuple[_Pending, Event, int]] = []
        now = max(int(time.time() * 1000), self.last_ts)
        seq = self.seq
        for (pending, event), logged in zip(events, found, strict=True):
            body_hash = _body_hash(event)
            earlier = (logged.seq, logged.body_hash) if logged else seen.get(event.id or "")
            if earlier is not None:
                if earlier[1] != body_hash:
                    self._reject(
                        pending,
                        ProtocolError(
                            ErrorCode.CONFLICT,
                            f"event id {event.id!r} was already used for a different event (seq {earlier[0]}); use a new id for a new event",
                            field="$.id",
                            event_id=event.id,
                        ),
                    )
                    continue
                duplicates.append((pending, event, earlier[0]))
                continue
            seq += 1
            stamped = msgspec.structs.replace(event, seq=seq, ts=now)
            seen[event.id or ""] = (seq, body_hash)
            new.append(stamped)
            new_pending.append(pending)
            hashes.append(body_hash)

        encoded: list[bytes] = []
        if new:
            started = time.perf_counter()
            try:
                # An EventLog that does not return the encodings gets them encoded here.
                encoded = self.log.append(new, hashes) or [encode_event(event) for event in new]
            except Exception as error:  # noqa: BLE001 - every client gets an answer
                self.metrics.append_failures.inc()
                self._append_failed(new, new_pending, error)
                new, new_pending = [], []
            else:
                self.seq = seq
                self.last_ts = now
                self._count("appended", len(new))
                self.metrics.appended(new, [item.lane for item in new_pending], time.perf_counter() - started)
        self._publish(new, encoded)
        self._ack_and_dispatch(new, new_pending, duplicates, now, encoded)

    def _append_failed(self, events: list[Event], pendings: list[_Pending], error: BaseException) -> None:
        self.log_tag.error(
            "router.append.failed",
            first_seq=events[0].seq,
            last_seq=events[-1].seq,
            error=str(error),
            next="replying unavailable; clients retry with the same ids",
        )
        self._resync()
        for pending, event in zip(pendings, events, strict=True):
            self._reply(
                pending,
                Error(
                    id=event.id,
                    code=ErrorCode.UNAVAILABLE,
                    message=f"the event log is unavailable ({error}); retry with the same id",
                ),
            )

    def _resync(self) -> None:
        """After a failed append, learn whether the log took the batch anyway."""
        try:
            last = self.log.last_seq()
        except Exception as error:  # noqa: BLE001 - the next append resyncs again
            self.log_tag.warning("router.resync.failed", error=str(error), next="resync on the next append")
            return
        if last > self.seq:
            # The transaction reached the log but its reply did not: the
            # events are durable, so dispatch them. Their clients will resend
            # and get the original Ack from the id index.
            logged = self.log.read(self.seq, last - self.seq)
            self.log_tag.warning("router.resync.recovered", from_seq=self.seq + 1, to_seq=last)
            # The append may have failed between the log and its id index:
            # index the events again, so their clients' resends are duplicates.
            indexer = getattr(self.log, "index", None)
            if indexer is not None:
                indexer(logged, [_body_hash(event) for event in logged])
            self.seq = last
            self.last_ts = max(self.last_ts, logged[-1].ts or 0) if logged else self.last_ts
            self.metrics.appended(logged, [RESYNC_LANE] * len(logged), None)
            self._publish(logged, [encode_event(event) for event in logged])
            self._ack_and_dispatch(logged, [None] * len(logged), [], self.last_ts, None)

    def _publish(self, events: Sequence[Event], encoded: Sequence[bytes]) -> None:
        if self.pub is None:
            return
        # A PUB socket drops messages for a subscriber past its high-water
        # mark without telling the sender, so a slow subscriber never slows
        # the router; subscribers find the gaps by seq and read them back.
        for event, payload in zip(events, encoded, strict=True):
            topic = publish_topic(event.__struct_config__.tag, event.namespace)
            self.pub.send_multipart([topic, payload], zmq.NOBLOCK)
        self._count("published", len(events))

    def _next_token(self) -> int:
        self._token += 1
        return self._token

    def _ack_and_dispatch(
        self,
        events: Sequence[Event],
        pendings: Sequence[_Pending | None],
        duplicates: list[tuple[_Pending, Event, int]],
        now: int,
        encoded: Sequence[bytes] | None,
    ) -> None:
        per_shard: dict[int, list[Event]] = {}
        payloads: dict[int, list[bytes]] = {}
        gets: dict[int, list[tuple[str, _Pending]]] = {}
        shards = self.dispatcher.shards
        for index, (event, pending) in enumerate(zip(events, pendings, strict=True)):
            if isinstance(event, Search):
                # Searches are logged (for the audit trail) but change no
                # tier, so they go to the search service, not to a shard.
                if pending is not None:
                    self._start_search(pending, event)
                continue
            targets = range(shards) if isinstance(event, Maintain) else (shard_of(event.namespace, shards),)
            for shard in targets:
                per_shard.setdefault(shard, []).append(event)
                if encoded is not None:
                    payloads.setdefault(shard, []).append(encoded[index])
            if pending is None:
                continue
            if answered_by_shard(event):
                gets.setdefault(targets[0], []).append((event.id or "", pending))
            else:
                self._reply(pending, Ack(id=event.id, seq=event.seq or 0))
        if duplicates:
            self.metrics.duplicates.inc(len(duplicates))
        for pending, event, original_seq in duplicates:
            self._count("duplicates")
            if isinstance(event, Search):
                self._start_search(pending, msgspec.structs.replace(event, seq=original_seq, ts=now))
            elif answered_by_shard(event):
                # A repeated read or conditional write: the shard answers
                # from what it applied, without applying it again.
                shard = shard_of(event.namespace, shards)
                per_shard.setdefault(shard, []).append(msgspec.structs.replace(event, seq=original_seq, ts=now))
                gets.setdefault(shard, []).append((event.id or "", pending))
                payloads.pop(shard, None)  # This batch is re-sorted below: encode it afresh.
            else:
                self._reply(pending, Ack(id=event.id, seq=original_seq, duplicate=True))
        for shard in sorted(per_shard):
            batch = per_shard[shard]
            raw = payloads.get(shard)
            if raw is None:
                # Repeated reads carry older seqs; the shard expects them first.
                batch.sort(key=lambda item: item.seq or 0)
            token = self._next_token()
            waiting = gets.get(shard, [])
            if waiting:
                self._batch_gets[token] = [request_id for request_id, _ in waiting]
                for request_id, pending in waiting:
                    self._gets.setdefault((token, request_id), []).append(pending)
            self.metrics.batch_submitted(shard, token, batch[-1].seq or 0)
            # Each batch names the last seq sent to its shard before it, so a
            # shard that missed a batch (a call lost while its actor restarted)
            # catches up from the log instead of skipping those events.
            prev_seq = self._last_sent.get(shard)
            self._last_sent[shard] = max(prev_seq or 0, max(event.seq or 0 for event in batch))
            self.dispatcher.submit(shard, token, batch, raw, prev_seq=prev_seq)

    # ----------------------------------------------------------- search

    def _start_search(self, pending: _Pending, event: Search) -> None:
        if self.search is None:
            self._reply(pending, Error(id=event.id, code=ErrorCode.UNAVAILABLE, message="search is not configured on this router: no search projection database"))
            return
        if len(self._searches) >= self.settings.max_pending_searches:
            self._count("busy.search")
            self.metrics.busy.labels(lane=pending.lane, reason="search").inc()
            self._reply(pending, Busy(id=event.id, lane=pending.lane, retry_after_ms=self.settings.busy_retry_ms))
            return
        future = self._search_pool.submit(self.search, event)
        self._searches[future] = pending
        future.add_done_callback(lambda _: self.waker.wake())

    def _finish_searches(self) -> None:
        for future in [f for f in self._searches if f.done()]:
            pending = self._searches.pop(future)
            try:
                reply = future.result()
            except Exception as error:  # noqa: BLE001 - the client gets an Error, the router goes on
                self.log_tag.error("router.search.failed", event_id=pending.request_id, error=repr(error))
                reply = Error(id=pending.request_id, code=ErrorCode.INTERNAL, message=f"search failed: {error}")
            self._reply(pending, reply)

    # ----------------------------------------------------------- completions

    def _handle_completions(self) -> None:
        if self._searches:
            self._finish_searches()
        for completion in self.dispatcher.completions():
            if completion.token in self._admin:
                self._finish_admin(completion)
                continue
            self._finish_batch(completion)

    def _finish_batch(self, completion: Completion) -> None:
        self.metrics.batch_completed(completion.token, completion.replies, failed=completion.error is not None)
        waiting = self._batch_gets.pop(completion.token, [])
        if completion.error is not None:
            for request_id in waiting:
                for pending in self._gets.pop((completion.token, request_id), []):
                    self._reply(
                        pending,
                        Error(id=request_id, code=ErrorCode.UNAVAILABLE, message=f"shard {completion.shard} failed: {completion.error}; retry with the same id"),
                    )
            return
        for reply in completion.replies:
            for pending in self._gets.pop((completion.token, reply.id or ""), []):
                self._reply(pending, reply)

    def _read_log(self, pending: _Pending, request: ReadLog) -> None:
        """Reply to a subscriber filling a gap with the events from `from_seq`, in order."""
        try:
            events = self.log.read(request.from_seq - 1, request.limit)
        except Exception as error:  # noqa: BLE001 - the client gets an Error, the router goes on
            self.log_tag.error("router.read_log.failed", from_seq=request.from_seq, error=str(error))
            self._reply(pending, Error(id=request.id, code=ErrorCode.UNAVAILABLE, message=f"the event log is unavailable ({error}); retry"))
            return
        self._reply(pending, LogEvents(id=request.id, events=events, last_seq=self.seq))

    def _start_admin(self, pending: _Pending, kind: str, only: int | None = None) -> None:
        shards = self.dispatcher.shards
        if only is not None and only >= shards:
            self._reply(pending, Error(id=pending.request_id, code=ErrorCode.INVALID_FIELD, message=f"shard {only} does not exist; this router has shards 0 to {shards - 1}", field="$.shard"))
            return
        targets = range(shards) if only is None else [only]
        token = self._next_token()
        call = _AdminCall(
            pending=pending, kind=kind, remaining=len(targets), seq=self.seq, results=[None] * shards, expected=dict(self._last_sent)
        )
        self._admin[token] = call
        if kind == "rebuild":
            self.log_tag.warning("router.rebuild.started", shards=list(targets), last_seq=self.seq, next="events keep being logged and apply after the rebuild")
        for shard in targets:
            self.dispatcher.call(shard, token, kind)

    def _finish_admin(self, completion: Completion) -> None:
        call = self._admin[completion.token]
        if completion.error is not None:
            del self._admin[completion.token]
            self._reply(call.pending, Error(id=call.pending.request_id, code=ErrorCode.UNAVAILABLE, message=f"shard {completion.shard} failed: {completion.error}"))
            return
        call.results[completion.shard] = completion.result
        call.remaining -= 1
        if call.remaining:
            return
        del self._admin[completion.token]
        request_id = call.pending.request_id
        if call.kind == "rebuild":
            reports = [_rebuild_type.decode(payload) for payload in call.results if payload is not None]
            shards = [
                ShardRebuild(shard=r.shard, snapshot_seq=r.snapshot_seq, replayed=r.replayed, watermark=r.watermark, seconds=r.seconds)
                for r in reports
            ]
            self.log_tag.warning("router.rebuild.completed", shards=[item.shard for item in shards])
            self._reply(call.pending, Rebuilt(id=request_id, seq=call.seq, shards=shards))
        elif call.kind == "digests":
            tiers: list[TierDigest] = []
            for shard, payload in enumerate(call.results):
                if payload is None:
                    continue
                watermark, digests = _digests_type.decode(payload)
                behind = call.expected.get(shard, 0)
                if watermark < behind:
                    # A paused shard (its breaker is open) has not applied
                    # every event before the request, so its tiers describe
                    # an earlier log prefix than `seq`.
                    self.log_tag.warning("router.digest.shard_behind", shard=shard, watermark=watermark, expected=behind, next="replying unavailable")
                    message = (
                        f"shard {shard} has applied events up to seq {watermark} of the {behind} sent to it "
                        "(its circuit breaker is open or it is catching up); ask again once it resumes"
                    )
                    self._reply(call.pending, Error(id=request_id, code=ErrorCode.UNAVAILABLE, message=message))
                    return
                tiers.extend(digests)
            self.metrics.digests(tiers)
            self._reply(call.pending, DigestReply(id=request_id, seq=call.seq, tiers=tiers))
        else:
            infos = [_status_type.decode(payload) for payload in call.results]
            shards = [ShardStatus(shard=i.shard, watermark=i.watermark, pid=i.pid, node=i.node, keys=i.keys) for i in infos]
            self.metrics.shard_status(shards)
            for info in infos:
                self.metrics.shard_pools(info.shard, info.pools)
            lanes = {lane: self.counters.get(f"received.{lane}", 0) for lane in LANES}
            self._reply(call.pending, StatusReply(id=request_id, last_seq=self.seq, shards=shards, lanes=lanes))

    # ----------------------------------------------------------- sending

    def _reply(self, pending: _Pending, reply: Message) -> None:
        if type(reply) is Error:
            self.metrics.errors.labels(code=reply.code).inc()
        frames = [pending.identity]
        if pending.delimited:
            frames.append(b"")
        frames.append(encode_reply(reply, pending.codec if pending.codec in (JSON, MSGPACK) else JSON))
        self._send(pending.lane, frames)

    def _send(self, lane: str, frames: list[bytes]) -> None:
        sock = self.sockets.get(lane)
        if sock is None:
            return
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # The client's pipe is full: keep the reply and try again soon.
            if len(self._resend) == self._resend.maxlen:
                self._count("reply.dropped")
                self.metrics.dropped.labels(lane=lane).inc()
                self.log_tag.error("router.reply.dropped", lane=lane, reason="resend queue full")
            else:
                self.metrics.deferred.labels(lane=lane).inc()
            self._resend.append((lane, frames))
        except zmq.ZMQError as error:
            if error.errno == errno.EHOSTUNREACH:
                self._count("reply.unroutable")
                self.metrics.unroutable.labels(lane=lane).inc()
                self.log_tag.info("router.reply.unroutable", lane=lane, reason="client disconnected")
            else:
                raise

    def _retry_sends(self) -> None:
        for _ in range(len(self._resend)):
            lane, frames = self._resend.popleft()
            self._send(lane, frames)


def _body_hash(event: Event) -> int:
    """Hash what the client sent, without the fields the router assigns."""
    return xxhash.xxh64_intdigest(_body_encoder.encode(msgspec.structs.replace(event, seq=None, ts=None)))


def publish_topic(type_name: str, namespace: str | None) -> bytes:
    """Return the PUB topic of an event: `TYPE/NAMESPACE/`.

    The trailing slash keeps prefixes exact: a subscription to
    `Store/agent-1/` does not also match `Store/agent-10/`. A Maintain over
    every namespace has an empty namespace part (`Maintain//`).
    """
    return f"{type_name}/{namespace or ''}/".encode()


def _peek_id(payload: bytes) -> str | None:
    """Return the request's id for a Busy reply, without a full decode."""
    try:
        header = msgspec.json.decode(payload, type=_IdOnly) if detect_codec(payload) == JSON else msgspec.msgpack.decode(payload, type=_IdOnly)
    except (msgspec.DecodeError, RecursionError):
        return None
    return header.id


class _IdOnly(msgspec.Struct):
    id: str | None = None
