"""The apply logic: a deterministic state machine from events to tier writes.

`ShardState` holds what a shard knows in memory (every record's tier and
metadata, and the cache's values in LRU order) and turns a batch of events
into replies and one `TierWrites` per tier. It reads time only from event
timestamps, iterates in sorted order wherever order reaches the output, and
reads committed values through the tiers it is given. Committing the writes
is the caller's job (see `handlers.shard`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from events.limits import value_size
from events.types import (
    Ack,
    Conflict,
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
from handlers.effects import Effect
from handlers.policy import Policy, retention
from tiers.base import TIER_NAMES, Meta, Record, Tier, TierWrites

__all__ = ["Move", "ShardState", "StateError"]

Key = tuple[str, str]
_replace = msgspec.structs.replace


class StateError(Exception):
    """The state machine was handed events it cannot apply (a caller bug)."""


class Move(msgspec.Struct, frozen=True, array_like=True):
    """One tier change made by maintenance, with its reason."""

    seq: int
    namespace: str
    key: str
    source: str
    target: str | None  # None: the record was deleted
    reason: str  # "idle", "capacity", "expired", "evicted"


class _Entry:
    __slots__ = ("tier", "meta")

    def __init__(self, tier: str, meta: Meta) -> None:
        self.tier = tier
        self.meta = meta


class _Overlay:
    """Uncommitted writes of the current batch to one tier, last write wins."""

    __slots__ = ("puts", "touches", "deletes")

    def __init__(self) -> None:
        self.puts: dict[Key, Record] = {}
        self.touches: dict[Key, Meta] = {}
        self.deletes: set[Key] = set()

    def put(self, record: Record) -> None:
        key = (record.namespace, record.key)
        self.deletes.discard(key)
        self.touches.pop(key, None)
        self.puts[key] = record

    def touch(self, key: Key, meta: Meta) -> None:
        put = self.puts.get(key)
        if put is not None:
            self.puts[key] = _replace(put, meta=meta)
        else:
            self.touches[key] = meta

    def delete(self, key: Key) -> None:
        self.puts.pop(key, None)
        self.touches.pop(key, None)
        self.deletes.add(key)

    def writes(self) -> TierWrites:
        # Sorted, so the same batch always produces byte-identical commits.
        return TierWrites(
            puts=[self.puts[key] for key in sorted(self.puts)],
            touches=[(ns, k, self.touches[(ns, k)]) for ns, k in sorted(self.touches)],
            deletes=sorted(self.deletes),
        )


class ShardState:
    """The in-memory state of one shard and the rules that change it."""

    def __init__(self, shard: int, policy: Policy, tiers: Mapping[str, Tier]) -> None:
        self.shard = shard
        self.policy = policy
        self.tiers = tiers
        self.watermark = 0
        self._index: dict[str, dict[str, _Entry]] = {}
        self._cache: OrderedDict[Key, Any] = OrderedDict()
        self._overlays: dict[str, _Overlay] = {}
        self._fetched: dict[str, dict[Key, Record]] = {}
        self.moves: list[Move] = []
        self.effects: list[Effect] = []

    # ----------------------------------------------------------- loading

    def load(self, watermark: int) -> None:
        """Rebuild the in-memory state from the committed contents of the tiers."""
        self._index = {}
        cached: list[tuple[int, Key, str]] = []
        for tier_name in TIER_NAMES:
            for namespace, key, meta in self.tiers[tier_name].scan_meta():
                self._index.setdefault(namespace, {})[key] = _Entry(tier_name, meta)
                if meta.cache_touch:
                    cached.append((meta.cache_touch, (namespace, key), tier_name))
        cached.sort()
        self._cache = OrderedDict()
        for tier_name in TIER_NAMES:
            wanted = [key for _, key, name in cached if name == tier_name]
            found = self.tiers[tier_name].get_many(wanted) if wanted else {}
            self._fetched[tier_name] = found
        for _, key, tier_name in cached:
            self._cache[key] = self._fetched[tier_name][key].value
        self._fetched = {}
        self.watermark = watermark

    # ----------------------------------------------------------- queries

    def entry_count(self) -> int:
        return sum(len(keys) for keys in self._index.values())

    def tier_of(self, namespace: str, key: str) -> str | None:
        entry = self._index.get(namespace, {}).get(key)
        return entry.tier if entry else None

    def cache_keys(self) -> list[Key]:
        """Return the cached keys, least recently used first."""
        return list(self._cache)

    def cache_digest_records(self) -> list[tuple[str, str, int]]:
        return [
            (ns, key, self._index[ns][key].meta.cache_touch) for ns, key in self._cache
        ]

    def peek(self, namespace: str, key: str, seq: int, now_ms: int | None) -> Message:
        """Read a key without recording the access (a repeated `Get`)."""
        entry = self._index.get(namespace, {}).get(key)
        if entry is None or (now_ms is not None and _expired(entry.meta, now_ms)):
            return NotFound(seq=seq, key=key)
        cache_key = (namespace, key)
        if cache_key in self._cache:
            value, served = self._cache[cache_key], "cache"
        else:
            record = self.tiers[entry.tier].get(namespace, key)
            if record is None:
                raise StateError(f"{entry.tier} is missing {namespace}/{key}")
            value, served = record.value, entry.tier
        return Value(
            seq=seq,
            key=key,
            value=value,
            tier=served,
            importance=entry.meta.importance,
            tags=list(entry.meta.tags),
        )

    # ----------------------------------------------------------- applying

    def apply_batch(self, events: Iterable[Event]) -> tuple[dict[str, TierWrites], list[Message]]:
        """Apply events in order; return the writes per tier and the replies.

        Events at or below the watermark are skipped, which makes a repeated
        batch a no-op. Only `Get` produces a reply here; the router already
        acknowledged the others when they became durable.
        """
        self._overlays = {name: _Overlay() for name in TIER_NAMES}
        self._fetched = {name: {} for name in TIER_NAMES}
        self.moves = []
        self.effects = []
        events = [event for event in events if (event.seq or 0) > self.watermark]
        self._prefetch_gets(events)
        replies: list[Message] = []
        last = self.watermark
        for event in events:
            seq = event.seq
            if seq is None or event.ts is None or seq <= last:
                raise StateError(
                    f"events must carry seq and ts and arrive in increasing seq "
                    f"order; got seq {seq} after {last}"
                )
            last = seq
            if isinstance(event, Store):
                reply = self._store(event)
                if reply is not None:
                    replies.append(reply)
            elif isinstance(event, Get):
                replies.append(self._get(event))
            elif isinstance(event, Forget):
                reply = self._forget(event)
                if reply is not None:
                    replies.append(reply)
            elif isinstance(event, Maintain):
                self._maintain(event)
            elif isinstance(event, Search):
                continue  # Served by the search projection; no tier changes.
            else:
                raise StateError(f"cannot apply {type(event).__name__}")
        self.watermark = last
        writes = {name: overlay.writes() for name, overlay in self._overlays.items()}
        self._overlays = {}
        self._fetched = {}
        return writes, replies

    def _entry(self, namespace: str, key: str) -> _Entry | None:
        keys = self._index.get(namespace)
        return keys.get(key) if keys else None

    def _set_entry(self, namespace: str, key: str, entry: _Entry) -> None:
        self._index.setdefault(namespace, {})[key] = entry

    def _drop_entry(self, namespace: str, key: str) -> None:
        keys = self._index.get(namespace)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._index[namespace]

    def _version(self, namespace: str, key: str, now: int) -> int:
        entry = self._entry(namespace, key)
        if entry is None or _expired(entry.meta, now):
            return 0
        return entry.meta.version

    def _check_version(self, event: Store | Forget) -> Message | None:
        """Return `Conflict` if a conditional write's expected version is stale."""
        seq, ts = event.seq or 0, event.ts or 0
        actual = self._version(event.namespace, event.key, ts)
        if event.expected_version == actual:
            return None
        self.effects.append(
            Effect(seq, "conflict", event.namespace, event.key, reason=f"{event.expected_version}:{actual}", client=event.id)
        )
        return Conflict(id=event.id, seq=seq, key=event.key, expected_version=event.expected_version or 0, actual_version=actual)

    def _store(self, event: Store) -> Message | None:
        namespace, key = event.namespace, event.key
        seq, ts = event.seq or 0, event.ts or 0
        if event.expected_version is not None:
            conflict = self._check_version(event)
            if conflict is not None:
                return conflict
        old = self._entry(namespace, key)
        expires = ts + event.ttl_s * 1000 if event.ttl_s is not None else None
        if old is not None and _expired(old.meta, ts):
            # Expired but not yet removed by maintenance: a Get already says
            # NotFound, so the new Store starts a fresh history.
            self._overlays[old.tier].delete((namespace, key))
            self._cache.pop((namespace, key), None)
            old = None
        if old is None:
            created, count, version, since = ts, 0, 1, ts
        else:
            created = old.meta.created_ts
            count = old.meta.access_count
            version = old.meta.version + 1
            since = old.meta.tier_since_ts if old.tier == "stm" else ts
            if old.tier != "stm":
                self._overlays[old.tier].delete((namespace, key))
        meta = Meta(
            importance=event.importance,
            tags=tuple(event.tags),
            created_ts=created,
            updated_ts=ts,
            accessed_ts=ts,
            access_count=count,
            version=version,
            tier_since_ts=since,
            expires_ts=expires,
            cache_touch=seq,
            size=value_size(event.value),
        )
        self._overlays["stm"].put(Record(namespace, key, event.value, meta))
        self._set_entry(namespace, key, _Entry("stm", meta))
        self._cache_put((namespace, key), event.value)
        return Ack(id=event.id, seq=seq) if event.expected_version is not None else None

    def _get(self, event: Get) -> Message:
        namespace, key = event.namespace, event.key
        seq, ts = event.seq or 0, event.ts or 0
        entry = self._entry(namespace, key)
        if entry is None or _expired(entry.meta, ts):
            self.effects.append(Effect(seq, "read", namespace, key, client=event.id))
            return NotFound(id=event.id, seq=seq, key=key)
        cache_key = (namespace, key)
        if cache_key in self._cache:
            value, served = self._cache[cache_key], "cache"
        else:
            value, served = self._value(entry.tier, cache_key), entry.tier
        self.effects.append(Effect(seq, "read", namespace, key, tier=served, client=event.id))
        meta = _replace(
            entry.meta,
            accessed_ts=ts,
            access_count=entry.meta.access_count + 1,
            cache_touch=seq,
        )
        entry.meta = meta
        self._overlays[entry.tier].touch(cache_key, meta)
        self._cache_put(cache_key, value)
        return Value(
            id=event.id,
            seq=seq,
            key=key,
            value=value,
            tier=served,
            importance=meta.importance,
            tags=list(meta.tags),
        )

    def _forget(self, event: Forget) -> Message | None:
        if event.expected_version is not None:
            conflict = self._check_version(event)
            if conflict is not None:
                return conflict
        reply = Ack(id=event.id, seq=event.seq or 0) if event.expected_version is not None else None
        if event.key is None:
            keys = sorted(self._index.get(event.namespace, {}))
        else:
            keys = [event.key]
        for key in keys:
            entry = self._entry(event.namespace, key)
            if entry is None:
                continue
            cache_key = (event.namespace, key)
            self._overlays[entry.tier].delete(cache_key)
            self._drop_entry(*cache_key)
            self._cache.pop(cache_key, None)
        return reply

    # ----------------------------------------------------------- cache

    def _cache_put(self, cache_key: Key, value: Any) -> None:
        self._cache[cache_key] = value
        self._cache.move_to_end(cache_key)
        while len(self._cache) > self.policy.cache_capacity:
            evicted, _ = self._cache.popitem(last=False)
            entry = self._entry(*evicted)
            if entry is None:
                raise StateError(f"cached key {evicted} has no record")
            entry.meta = _replace(entry.meta, cache_touch=0)
            self._overlays[entry.tier].touch(evicted, entry.meta)

    # ----------------------------------------------------------- values

    def _prefetch_gets(self, events: list[Event]) -> None:
        """Fetch the values that the batch's `Get`s will miss in the cache."""
        wanted: dict[str, list[Key]] = {}
        for event in events:
            if isinstance(event, Get):
                cache_key = (event.namespace, event.key)
                entry = self._entry(*cache_key)
                if entry is not None and cache_key not in self._cache:
                    wanted.setdefault(entry.tier, []).append(cache_key)
        for tier_name in sorted(wanted):
            self._fetched[tier_name].update(self.tiers[tier_name].get_many(wanted[tier_name]))

    def _fetch(self, tier_name: str, keys: list[Key]) -> None:
        overlay = self._overlays[tier_name]
        fetched = self._fetched[tier_name]
        missing = [k for k in keys if k not in overlay.puts and k not in fetched]
        if missing:
            fetched.update(self.tiers[tier_name].get_many(missing))

    def _value(self, tier_name: str, cache_key: Key) -> Any:
        put = self._overlays[tier_name].puts.get(cache_key)
        if put is not None:
            return put.value
        record = self._fetched[tier_name].get(cache_key)
        if record is None:
            record = self.tiers[tier_name].get(*cache_key)
        if record is None:
            raise StateError(f"{tier_name} is missing {cache_key[0]}/{cache_key[1]}")
        return record.value

    # ----------------------------------------------------------- maintenance

    def _maintain(self, event: Maintain) -> None:
        seq, now = event.seq or 0, event.ts or 0
        if event.namespace is None:
            namespaces = sorted(self._index)
        else:
            namespaces = [event.namespace] if event.namespace in self._index else []
        for namespace in namespaces:
            self._expire(namespace, seq, now)
            self._consolidate(namespace, "stm", "im", seq, now)
            self._consolidate(namespace, "im", "ltm", seq, now)
            self._evict(namespace, seq, now)

    def _in_tier(self, namespace: str, tier_name: str) -> list[tuple[str, _Entry]]:
        keys = self._index.get(namespace, {})
        return [(key, keys[key]) for key in sorted(keys) if keys[key].tier == tier_name]

    def _expire(self, namespace: str, seq: int, now: int) -> None:
        keys = self._index.get(namespace, {})
        for key in sorted(keys):
            entry = keys[key]
            if _expired(entry.meta, now):
                self._delete(namespace, key, entry, seq, "expired")

    def _consolidate(self, namespace: str, source: str, target: str, seq: int, now: int) -> None:
        capacity = self.policy.stm_capacity if source == "stm" else self.policy.im_capacity
        idle_ms = self.policy.stm_idle_ms if source == "stm" else self.policy.im_idle_ms
        members = self._in_tier(namespace, source)
        idle = [(key, entry) for key, entry in members if now - entry.meta.accessed_ts >= idle_ms]
        idle_keys = {key for key, _ in idle}
        rest = [(key, entry) for key, entry in members if key not in idle_keys]
        chosen = [(key, entry, "idle") for key, entry in idle]
        overflow = len(rest) - capacity
        if overflow > 0:
            rest.sort(key=lambda item: (retention(item[1].meta, now, self.policy), item[1].meta.accessed_ts, item[0]))
            chosen.extend((key, entry, "capacity") for key, entry in rest[:overflow])
        if not chosen:
            return
        self._fetch(source, [(namespace, key) for key, _, _ in chosen])
        for key, entry, reason in chosen:
            cache_key = (namespace, key)
            value = self._value(source, cache_key)
            meta = _replace(entry.meta, tier_since_ts=now)
            self._overlays[source].delete(cache_key)
            self._overlays[target].put(Record(namespace, key, value, meta))
            entry.tier, entry.meta = target, meta
            self.moves.append(Move(seq, namespace, key, source, target, reason))
            self.effects.append(Effect(seq, "move", namespace, key, tier=source, target=target, reason=reason))

    def _evict(self, namespace: str, seq: int, now: int) -> None:
        members = self._in_tier(namespace, "ltm")
        overflow = len(members) - self.policy.ltm_capacity
        if overflow <= 0:
            return
        members.sort(key=lambda item: (retention(item[1].meta, now, self.policy), item[1].meta.accessed_ts, item[0]))
        for key, entry in members[:overflow]:
            self._delete(namespace, key, entry, seq, "evicted")

    def _delete(self, namespace: str, key: str, entry: _Entry, seq: int, reason: str) -> None:
        cache_key = (namespace, key)
        self._overlays[entry.tier].delete(cache_key)
        self._cache.pop(cache_key, None)
        self._drop_entry(namespace, key)
        self.moves.append(Move(seq, namespace, key, entry.tier, None, reason))
        self.effects.append(Effect(seq, "delete", namespace, key, tier=entry.tier, reason=reason))


def _expired(meta: Meta, now_ms: int) -> bool:
    return meta.expires_ts is not None and now_ms >= meta.expires_ts
