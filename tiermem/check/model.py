"""The reference model: docs/semantics.md and the envelope rules of docs/protocol.md.

This module implements the documents again, from their text, without the
apply code in `handlers/`, so a bug in one is not repeated in the other. It
takes events that already carry the router's `seq` and `ts` and returns the
reply each one must get. `Envelope` contains the id rules (dense sequence
numbers, duplicates and conflicts); `Model` contains the records, the
per-shard caches and the four maintenance steps.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import xxhash

from events.errors import ErrorCode
from events.types import (
    Ack,
    Conflict,
    Error,
    Event,
    Forget,
    Get,
    Maintain,
    Message,
    NotFound,
    Search,
    Store,
    Value,
)
from handlers.policy import Policy

__all__ = [
    "Envelope",
    "IdUse",
    "Model",
    "ModelRecord",
    "body_digest",
    "placement",
    "retention_score",
]

Key = tuple[str, str]
TIERS = ("stm", "im", "ltm")

_body_encoder = msgspec.msgpack.Encoder(order="sorted")
_size_encoder = msgspec.msgpack.Encoder()


def placement(namespace: str, shards: int) -> int:
    """Return the shard of a namespace as the spec defines it: xxh64 modulo shards."""
    return xxhash.xxh64_intdigest(namespace.encode("utf-8", "surrogatepass")) % shards


def body_digest(event: Event) -> bytes:
    """Return a digest of what a client sent: the event without `seq` and `ts`."""
    body = msgspec.structs.replace(event, seq=None, ts=None)
    return hashlib.blake2b(_body_encoder.encode(body), digest_size=16).digest()


@dataclass
class ModelRecord:
    """One record with every metadata field of the semantics table."""

    namespace: str
    key: str
    value: Any
    tier: str
    importance: float
    tags: tuple[str, ...]
    created_ts: int
    updated_ts: int
    accessed_ts: int
    access_count: int
    version: int
    tier_since_ts: int
    expires_ts: int | None
    cache_touch: int
    size: int


def retention_score(record: ModelRecord, ts: int, policy: Policy) -> int:
    """Return the integer retention score of the semantics page at time `ts`."""
    base = round(record.importance * 1000)
    halvings = (ts - record.accessed_ts) // policy.half_life_ms
    return (base >> halvings) + policy.access_weight * record.access_count.bit_length()


def _expired(record: ModelRecord, ts: int) -> bool:
    return record.expires_ts is not None and record.expires_ts <= ts


# ----------------------------------------------------------------- envelope


@dataclass(frozen=True)
class IdUse:
    """The router's treatment of one request id: new, a duplicate, or a conflict."""

    kind: str  # "new", "duplicate" or "conflict"
    seq: int | None = None  # the original sequence number of a duplicate or conflict


class Envelope:
    """The id rules of the protocol: dense sequence numbers and idempotent ids.

    A repeated id with the same body gets the original `seq` (`duplicate`
    true) and is not logged again. A repeated id with another body is an
    `Error` with code `conflict`. Events are logged with dense `seq`
    values; `last_seq` is where this run starts, after any earlier events
    of the log.
    """

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self.logged: dict[str, tuple[int, bytes, Event]] = {}

    def classify(self, event: Event) -> IdUse:
        if event.id is None:
            raise ValueError("the model needs every request to carry an id")
        earlier = self.logged.get(event.id)
        if earlier is None:
            return IdUse("new")
        if earlier[1] == body_digest(event):
            return IdUse("duplicate", earlier[0])
        return IdUse("conflict", earlier[0])

    def record(self, event: Event) -> None:
        """Note a logged event; raise if its seq or id breaks the envelope rules."""
        if event.seq is None or event.ts is None or event.id is None:
            raise ValueError(f"logged event {event!r} lacks seq, ts or id")
        if event.id in self.logged:
            raise AssertionError(
                f"id {event.id!r} was logged twice: seq {self.logged[event.id][0]} "
                f"and seq {event.seq}"
            )
        self.logged[event.id] = (event.seq, body_digest(event), event)
        self.last_seq = max(self.last_seq, event.seq)


# ----------------------------------------------------------------- tier state


@dataclass
class _Shard:
    # Cache keys, least recently used first. The value copy lives in the record.
    cache: list[Key] = field(default_factory=list)


class Model:
    """Records per (namespace, key), per-shard LRU caches, and the event rules."""

    def __init__(self, shards: int, policy: Policy) -> None:
        self.shards = shards
        self.policy = policy
        self.records: dict[Key, ModelRecord] = {}
        self._shards = [_Shard() for _ in range(shards)]

    # ------------------------------------------------------------- queries

    def shard_of(self, namespace: str) -> int:
        return placement(namespace, self.shards)

    def cache_order(self, shard: int) -> list[Key]:
        """Return the cached keys of a shard, least recently used first."""
        return list(self._shards[shard].cache)

    def namespaces(self) -> list[str]:
        return sorted({namespace for namespace, _ in self.records})

    def counts(self) -> dict[tuple[int, str], int]:
        """Return the number of records per (shard, tier), the cache included."""
        counts: dict[tuple[int, str], int] = {}
        for shard in range(self.shards):
            counts[(shard, "cache")] = len(self._shards[shard].cache)
            for tier in TIERS:
                counts[(shard, tier)] = 0
        for record in self.records.values():
            counts[(self.shard_of(record.namespace), record.tier)] += 1
        return counts

    # ------------------------------------------------------------- events

    def apply(self, event: Event) -> Message | None:
        """Apply one logged event; return the reply its shard must produce.

        A `Get` and a conditional `Store` or `Forget` (with
        `expected_version`) are answered by their shard. The router answers
        the others with an `Ack` once logged, and `Search` changes no tier,
        so for those this returns None and the caller builds the reply from
        the envelope.
        """
        if event.seq is None or event.ts is None:
            raise ValueError(f"event {event!r} must carry seq and ts")
        if isinstance(event, (Store, Forget)) and event.expected_version is not None:
            actual = self.version(event.namespace, event.key, event.ts)
            if actual != event.expected_version:
                return Conflict(
                    id=event.id,
                    seq=event.seq,
                    key=event.key,
                    expected_version=event.expected_version,
                    actual_version=actual,
                )
        if isinstance(event, Store):
            self._store(event)
        elif isinstance(event, Get):
            return self._get(event)
        elif isinstance(event, Forget):
            self._forget(event.namespace, event.key)
        elif isinstance(event, Maintain):
            self._maintain(event.namespace, event.ts)
        elif not isinstance(event, Search):
            raise TypeError(f"the model has no rule for {type(event).__name__}")
        if isinstance(event, (Store, Forget)) and event.expected_version is not None:
            return Ack(id=event.id, seq=event.seq)
        return None

    def version(self, namespace: str, key: str, ts: int) -> int:
        """Return a key's version at `ts`: its Stores since it last did not exist, 0 if absent."""
        record = self.records.get((namespace, key))
        if record is None or _expired(record, ts):
            return 0
        return record.version

    def peek(self, namespace: str, key: str, seq: int, ts: int) -> Message:
        """Return the reply to a repeated `Get`: current state, no access recorded."""
        record = self.records.get((namespace, key))
        if record is None or _expired(record, ts):
            return NotFound(seq=seq, key=key)
        return self._value(record, seq)

    def search_keys(self, namespace: str, query: str, ts: int) -> set[str]:
        """Return the keys a `Search` at `ts` must match: every query word in a string or tag.

        An expired record matches nothing, as a `Get` would not find it.

        NOTE: the words are runs of ASCII letters and digits, compared in
        lower case. The search projection also folds Unicode and splits
        scripts without spaces (docs/projections.md); the generated values
        use ASCII words only, so the two agree on them.
        """
        words = set(_words(query))
        return {
            record.key
            for record in self.records.values()
            if record.namespace == namespace
            and not _expired(record, ts)
            and words <= set(_record_words(record))
        }

    # ------------------------------------------------------------- rules

    def _store(self, event: Store) -> None:
        assert event.seq is not None and event.ts is not None
        key = (event.namespace, event.key)
        ts = event.ts
        old = self.records.get(key)
        expires = ts + event.ttl_s * 1000 if event.ttl_s is not None else None
        if old is not None and _expired(old, ts):
            # An expired key counts as not existing, even before maintenance
            # removes it, so the new record starts a fresh history.
            self._delete(key)
            old = None
        if old is None:
            created, count, version, since = ts, 0, 1, ts
        else:
            created = old.created_ts
            count = old.access_count
            version = old.version + 1
            # tier_since_ts changes only when the record enters another tier.
            since = old.tier_since_ts if old.tier == "stm" else ts
        self.records[key] = ModelRecord(
            namespace=event.namespace,
            key=event.key,
            value=event.value,
            tier="stm",
            importance=event.importance,
            tags=tuple(event.tags),
            created_ts=created,
            updated_ts=ts,
            accessed_ts=ts,
            access_count=count,
            version=version,
            tier_since_ts=since,
            expires_ts=expires,
            cache_touch=0,
            size=len(_size_encoder.encode(event.value)),
        )
        self._cache_use(key, event.seq)

    def _get(self, event: Get) -> Message:
        assert event.seq is not None and event.ts is not None
        key = (event.namespace, event.key)
        record = self.records.get(key)
        if record is None or _expired(record, event.ts):
            return NotFound(id=event.id, seq=event.seq, key=event.key)
        reply = self._value(record, event.seq, event.id)
        record.accessed_ts = event.ts
        record.access_count += 1
        self._cache_use(key, event.seq)
        return reply

    def _value(
        self, record: ModelRecord, seq: int, request_id: str | None = None
    ) -> Value:
        cached = (record.namespace, record.key) in self._cache(record.namespace)
        return Value(
            id=request_id,
            seq=seq,
            key=record.key,
            value=record.value,
            tier="cache" if cached else record.tier,
            importance=record.importance,
            tags=list(record.tags),
        )

    def _forget(self, namespace: str, key: str | None) -> None:
        # No key: the whole namespace goes.
        doomed = [item for item in self.records if item[0] == namespace and key in (None, item[1])]
        for item in doomed:
            self._delete(item)

    def _maintain(self, namespace: str | None, ts: int) -> None:
        present = self.namespaces()
        if namespace is None:
            chosen = present
        else:
            chosen = [namespace] if namespace in present else []
        for name in chosen:
            self._expire(name, ts)
            self._consolidate(name, "stm", "im", ts)
            self._consolidate(name, "im", "ltm", ts)
            self._evict(name, ts)

    def _members(self, namespace: str, tier: str) -> list[ModelRecord]:
        return [
            record
            for (name, _), record in sorted(self.records.items())
            if name == namespace and record.tier == tier
        ]

    def _expire(self, namespace: str, ts: int) -> None:
        for record in list(self.records.values()):
            if record.namespace == namespace and _expired(record, ts):
                self._delete((record.namespace, record.key))

    def _consolidate(self, namespace: str, source: str, target: str, ts: int) -> None:
        if source == "stm":
            idle_ms, capacity = self.policy.stm_idle_ms, self.policy.stm_capacity
        else:
            idle_ms, capacity = self.policy.im_idle_ms, self.policy.im_capacity
        members = self._members(namespace, source)
        idle = [record for record in members if ts - record.accessed_ts >= idle_ms]
        remaining = [record for record in members if record not in idle]
        moving = list(idle)
        if len(remaining) > capacity:
            remaining.sort(key=lambda record: self._rank(record, ts))
            moving += remaining[: len(remaining) - capacity]
        for record in moving:
            record.tier = target
            record.tier_since_ts = ts

    def _evict(self, namespace: str, ts: int) -> None:
        members = self._members(namespace, "ltm")
        if len(members) <= self.policy.ltm_capacity:
            return
        members.sort(key=lambda record: self._rank(record, ts))
        for record in members[: len(members) - self.policy.ltm_capacity]:
            self._delete((record.namespace, record.key))

    def _rank(self, record: ModelRecord, ts: int) -> tuple[int, int, str]:
        # The record that sorts first by (score, accessed_ts, key) goes first.
        return (
            retention_score(record, ts, self.policy),
            record.accessed_ts,
            record.key,
        )

    def _delete(self, key: Key) -> None:
        del self.records[key]
        cache = self._cache(key[0])
        if key in cache:
            cache.remove(key)

    # ------------------------------------------------------------- cache

    def _cache(self, namespace: str) -> list[Key]:
        return self._shards[self.shard_of(namespace)].cache

    def _cache_use(self, key: Key, seq: int) -> None:
        cache = self._cache(key[0])
        if key in cache:
            cache.remove(key)
        cache.append(key)
        self.records[key].cache_touch = seq
        while len(cache) > self.policy.cache_capacity:
            evicted = cache.pop(0)
            self.records[evicted].cache_touch = 0


def envelope_reply(event: Event, use: IdUse, seq: int | None) -> Message | None:
    """Return the router's own reply to a request, or None when a shard answers it.

    `seq` is the sequence number the event was logged under (for a new
    event) or the original one (for a duplicate). A repeated conditional
    write gets its first outcome, which only the caller knows when that was
    a `Conflict`; this returns the duplicate `Ack` of one that succeeded.
    A `Search` reply depends on the target's search index, so this returns
    None for it too.
    """
    if use.kind == "conflict":
        return Error(id=event.id, code=ErrorCode.CONFLICT, message="", field="$.id")
    if isinstance(event, (Get, Search)):
        return None
    if (
        isinstance(event, (Store, Forget))
        and event.expected_version is not None
        and use.kind == "new"
    ):
        return None
    assert seq is not None
    return Ack(id=event.id, seq=seq, duplicate=use.kind == "duplicate")


_WORD = re.compile(r"[0-9A-Za-z]+")


def _words(text: str) -> Iterable[str]:
    return (word.lower() for word in _WORD.findall(text))


def _record_words(record: ModelRecord) -> Iterable[str]:
    for tag in record.tags:
        yield from _words(tag)
    stack = [record.value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield from _words(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
