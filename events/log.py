"""The durable event log: the `EventLog` protocol and its Redis Streams backend.

Entry `N-0` of the stream holds the event with sequence number N, so the
stream's own ordering rejects a sequence number that does not grow, and the
last entry's id is the last sequence number. A hash maps each event id to
its sequence number and body hash; it is written in the same MULTI/EXEC as
the entries, so the log and its id index never disagree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import msgspec
import redis
import structlog

from events.codec import decode_event, encode_event
from events.errors import LogConfigError, LogError
from events.types import Event

__all__ = ["EventLog", "LoggedId", "RedisEventLog", "check_log_config"]

log = structlog.get_logger("tiermem.log")


class LoggedId(msgspec.Struct, frozen=True, array_like=True):
    """Where an event id was logged, and a hash of the body logged under it."""

    seq: int
    body_hash: int


@runtime_checkable
class EventLog(Protocol):
    """An append-only sequence of events numbered 1, 2, 3, …"""

    def last_seq(self) -> int:
        """Return the sequence number of the last event, 0 for an empty log."""
        ...

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        """Return, for each id, where it was logged, or None."""
        ...

    def append(self, events: Sequence[Event], body_hashes: Sequence[int]) -> None:
        """Append events that carry consecutive `seq` values, durably, at once."""
        ...

    def read(self, after_seq: int, limit: int) -> list[Event]:
        """Return up to `limit` events with `seq > after_seq`, in order."""
        ...

    def iter_from(self, after_seq: int, until_seq: int | None = None) -> Iterator[list[Event]]:
        """Yield the events after `after_seq` (up to `until_seq`) in batches."""
        ...


def check_log_config(client: redis.Redis, *, allow_everysec: bool = False) -> None:
    """Raise `LogConfigError` unless the server keeps every acknowledged event.

    The log needs `appendonly yes` (otherwise a restart loses the log),
    `appendfsync always` (otherwise a crash loses up to a second of
    acknowledged events; `everysec` is accepted only when the operator opts
    in) and `maxmemory-policy noeviction` (otherwise Redis may evict the log).
    """
    try:
        settings = client.config_get("appendonly", "appendfsync", "maxmemory-policy")
    except redis.ResponseError as error:
        raise LogError(
            f"cannot read the log Redis configuration ({error}); tiermem must "
            "check appendonly, appendfsync and maxmemory-policy before it "
            "acknowledges anything, so CONFIG GET must be allowed"
        ) from error

    def setting(name: str) -> str:
        value = settings.get(name, settings.get(name.encode(), b""))
        return value.decode() if isinstance(value, bytes) else str(value)

    if setting("appendonly") != "yes":
        raise LogConfigError(
            "appendonly", setting("appendonly"), "yes",
            "start redis-server with --appendonly yes (or CONFIG SET appendonly yes)",
        )  # fmt: skip
    fsync = setting("appendfsync")
    allowed = ("always", "everysec") if allow_everysec else ("always",)
    if fsync not in allowed:
        raise LogConfigError(
            "appendfsync", fsync, " or ".join(allowed),
            "start redis-server with --appendfsync always; everysec is accepted "
            "only with log.allow_everysec = true, and can lose one second of "
            "acknowledged events on a crash of the host",
        )  # fmt: skip
    if setting("maxmemory-policy") != "noeviction":
        raise LogConfigError(
            "maxmemory-policy", setting("maxmemory-policy"), "noeviction",
            "start redis-server with --maxmemory-policy noeviction",
        )  # fmt: skip


_ids_encoder = msgspec.msgpack.Encoder()
_ids_decoder = msgspec.msgpack.Decoder(LoggedId)


class RedisEventLog:
    """The event log in a Redis Stream, with batched, transactional appends."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = "tiermem:log",
        ids_key: str = "tiermem:ids",
        read_batch: int = 5000,
    ) -> None:
        self.client = client
        self.stream = stream
        self.ids_key = ids_key
        self.read_batch = read_batch

    def last_seq(self) -> int:
        entries = self.client.xrevrange(self.stream, count=1)
        if not entries:
            return 0
        entry_id = entries[0][0]
        return int(entry_id.split(b"-")[0])

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        if not ids:
            return []
        found = self.client.hmget(self.ids_key, list(ids))
        return [_ids_decoder.decode(item) if item is not None else None for item in found]

    def append(self, events: Sequence[Event], body_hashes: Sequence[int]) -> None:
        if not events:
            return
        pipe = self.client.pipeline(transaction=True)
        mapping: dict[str, bytes] = {}
        for event, body_hash in zip(events, body_hashes, strict=True):
            if event.seq is None or event.id is None:
                raise ValueError("events must carry seq and id before they are logged")
            pipe.xadd(self.stream, {b"e": encode_event(event)}, id=f"{event.seq}-0")
            mapping[event.id] = _ids_encoder.encode(LoggedId(event.seq, body_hash))
        pipe.hset(self.ids_key, mapping=mapping)
        try:
            pipe.execute()
        except redis.ResponseError as error:
            raise LogError(
                f"appending events {events[0].seq}..{events[-1].seq} failed: {error}"
            ) from error

    def read(self, after_seq: int, limit: int) -> list[Event]:
        entries = self.client.xrange(self.stream, min=f"{after_seq + 1}-0", count=limit)
        return [decode_event(fields[b"e"]) for _, fields in entries]

    def iter_from(self, after_seq: int, until_seq: int | None = None) -> Iterator[list[Event]]:
        position = after_seq
        while until_seq is None or position < until_seq:
            limit = self.read_batch
            if until_seq is not None:
                limit = min(limit, until_seq - position)
            batch = self.read(position, limit)
            if not batch:
                return
            position = batch[-1].seq or position
            yield batch
