"""A subscriber that receives every committed event exactly once, in order.

The router publishes each committed event on its PUB socket. PUB drops
messages for a subscriber that falls behind its high-water mark, and a
subscriber that connects late misses what came before, so published
messages alone can have gaps. This subscriber tracks the next sequence
number it expects and fills any gap from the log with `ReadLog` requests
on the router, so it yields each event once and in sequence order.

Gap detection needs every sequence number, so the socket subscribes to
all topics and the type and namespace filters are applied here. A client
that can tolerate gaps may subscribe to topics itself (see
`bus.router.publish_topic`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator

import structlog
import zmq

from bus.client import Client
from events.codec import decode_event
from events.types import Event, LogEvents, ReadLog

__all__ = ["Subscriber"]

log = structlog.get_logger("tiermem.subscriber")


class Subscriber:
    """Iterate committed events from `from_seq` on, with no gaps and no repeats."""

    def __init__(
        self,
        endpoints: dict[str, str],
        *,
        from_seq: int = 1,
        types: Collection[str] | None = None,
        namespaces: Collection[str] | None = None,
        read_batch: int = 1000,
        receive_hwm: int = 10_000,
        curve: tuple[bytes, bytes, bytes] | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        if from_seq < 1:
            raise ValueError(f"from_seq must be at least 1, got {from_seq}")
        self.next_seq = from_seq
        self.types = set(types) if types is not None else None
        self.namespaces = set(namespaces) if namespaces is not None else None
        self.read_batch = read_batch
        self.filled = 0
        self.context = context or zmq.Context.instance()
        self.sock = self.context.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, receive_hwm)
        if curve is not None:
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoints["pub"])
        self.client = Client(endpoints, curve=curve, context=self.context)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.client.close()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _wanted(self, event: Event) -> bool:
        if self.types is not None and event.__struct_config__.tag not in self.types:
            return False
        return self.namespaces is None or event.namespace in self.namespaces

    def _fill(self, until_seq: int | None) -> list[Event]:
        """Read the log from `next_seq`; up to `until_seq` if given, else to its end."""
        events: list[Event] = []
        while until_seq is None or self.next_seq <= until_seq:
            reply = self.client.request(ReadLog(from_seq=self.next_seq, limit=self.read_batch), lane="normal")
            if not isinstance(reply, LogEvents):
                raise TypeError(f"ReadLog got {type(reply).__name__}")
            batch = [e for e in reply.events if until_seq is None or (e.seq or 0) <= until_seq]
            if not batch:
                break
            for event in batch:
                if event.seq != self.next_seq:
                    raise RuntimeError(f"the log returned seq {event.seq} where {self.next_seq} was expected")
                self.next_seq += 1
                events.append(event)
            self.filled += len(batch)
        return events

    def events(self, *, idle_check_s: float = 0.2, timeout: float | None = None) -> Iterator[Event]:
        """Yield events in sequence order until `timeout` seconds pass with none new.

        While no message arrives, the log is read every `idle_check_s`, so
        a late joiner catches up even when nothing new is published.
        """
        last_progress = time.monotonic()
        for event in self._fill(None):
            last_progress = time.monotonic()
            if self._wanted(event):
                yield event
        while True:
            if self.sock.poll(int(idle_check_s * 1000)):
                _topic, payload = self.sock.recv_multipart()
                event = decode_event(payload)
                seq = event.seq or 0
                if seq < self.next_seq:
                    continue
                if seq > self.next_seq:
                    log.info("subscriber.gap", expected=self.next_seq, received=seq, next="reading the gap from the log")
                    for missing in self._fill(seq - 1):
                        if self._wanted(missing):
                            yield missing
                self.next_seq = seq + 1
                last_progress = time.monotonic()
                if self._wanted(event):
                    yield event
                continue
            caught_up = self._fill(None)
            for event in caught_up:
                if self._wanted(event):
                    yield event
            if caught_up:
                last_progress = time.monotonic()
            elif timeout is not None and time.monotonic() - last_progress >= timeout:
                return
