"""Time travel: one namespace as it was after a past log position, and its diff to now.

The past state is rebuilt from the log, never read from the live tiers: the
namespace's shard is replayed from its newest snapshot at or before the
position into in-memory tiers (`replay.snapshot.replay_shard`, which runs
the same `Shard` code as the live actors). The console takes the
namespace's records there, then lets the same scratch shard apply the rest
of the log, which gives "now" at one exact log position and shows which keys
a `Forget` removed in between. Those keys' past values are hidden.

Built states are cached, at most `max_states` of them, each with its scratch
shard, so returning to a position and following new events cost little. A
cached state keeps the whole shard in memory, roughly the size of its
snapshot.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import msgspec
import redis

from events.types import Conflict, Forget
from handlers.shard import Shard
from handlers.sharding import shard_of
from replay.engine import seq_at_time
from replay.snapshot import event_ts, replay_shard
from tiermem.console.queries import MAX_PAGE, render_value
from tiermem.console.sources import InvalidRequestError, NotFoundError, StackSources
from tiers.base import TIER_NAMES

__all__ = ["KeyState", "PastState", "TimeTravel", "diff_changes", "diff_row"]

DEFAULT_MAX_STATES = 3

_VALUE_PREVIEW = 300


class KeyState(msgspec.Struct, frozen=True, kw_only=True):
    """One record of the namespace at one position, as the page shows it.

    `value` is a JSON preview, None when the value is hidden because the key
    was forgotten later.
    """

    tier: str
    cached: bool
    importance: float
    tags: list[str]
    access_count: int
    version: int
    updated_ts: int
    value: str | None
    value_cut: bool


class PastState:
    """The namespace's records after `seq` (then) and after `now_seq` (now).

    `forgotten` maps each key that a Forget (of the key or of the whole
    namespace) removed after `seq` to the seq of the last such Forget; a
    rejected conditional Forget does not count.
    """

    def __init__(self, namespace: str, seq: int, ts: int, host: Shard) -> None:
        self.namespace = namespace
        self.seq = seq
        self.ts = ts
        self.host = host
        self.then: dict[str, KeyState] = {}
        self.now: dict[str, KeyState] = {}
        self.now_seq = seq
        self.now_ts = ts
        self.forgotten: dict[str, int] = {}
        self.built_seconds = 0.0
        # (key, change) of every key, and of the changed keys only, built on first use.
        self.rows: dict[bool, list[tuple[str, str]]] = {}


def _records(host: Shard, namespace: str, now_ms: int) -> dict[str, KeyState]:
    """Return the namespace's records in the scratch shard, leaving out expired ones."""
    found: dict[str, KeyState] = {}
    for tier in TIER_NAMES:
        for record in host.tiers[tier].records():
            if record.namespace != namespace:
                continue
            meta = record.meta
            if meta.expires_ts is not None and now_ms >= meta.expires_ts:
                continue
            value, cut = render_value(record.value, _VALUE_PREVIEW)
            found[record.key] = KeyState(
                tier=tier,
                cached=bool(meta.cache_touch),
                importance=meta.importance,
                tags=list(meta.tags),
                access_count=meta.access_count,
                version=meta.version,
                updated_ts=meta.updated_ts,
                value=value,
                value_cut=cut,
            )
    return found


def _change(then: KeyState | None, now: KeyState | None) -> str:
    if then is None:
        return "added"
    if now is None:
        return "removed"
    if then.version != now.version or then.updated_ts != now.updated_ts:
        return "changed"
    if then.tier != now.tier:
        return "moved"
    return "same"


def diff_changes(state: PastState) -> list[tuple[str, str]]:
    """Return (key, change) for every key of then or now, sorted by key."""
    return [
        (key, _change(state.then.get(key), state.now.get(key)))
        for key in sorted(state.then.keys() | state.now.keys())
    ]


def diff_row(state: PastState, key: str, change: str) -> dict[str, Any]:
    """Return the page's row for one key: its change, and its record then and now.

    A key forgotten after the state's position shows its past record with
    the value hidden, and the row gives the seq of that Forget.
    """
    then = state.then.get(key)
    now = state.now.get(key)
    forgotten_seq = state.forgotten.get(key)
    if then is not None and forgotten_seq is not None:
        then = msgspec.structs.replace(then, value=None, value_cut=False)
    return {
        "key": key,
        "change": change,
        "then": msgspec.to_builtins(then) if then is not None else None,
        "now": msgspec.to_builtins(now) if now is not None else None,
        "forgotten_seq": forgotten_seq,
    }


class TimeTravel:
    """Build, cache and page past states of namespaces."""

    def __init__(
        self, sources: StackSources, *, max_states: int = DEFAULT_MAX_STATES
    ) -> None:
        self.sources = sources
        self.max_states = max_states
        self._states: OrderedDict[tuple[str, int], PastState] = OrderedDict()
        # One build at a time: each keeps a whole shard in memory, and a
        # slider dragged across the log would otherwise start many at once.
        self._lock = threading.Lock()

    def resolve_seq(self, *, seq: int | None, time_ms: int | None) -> tuple[int, int]:
        """Return (seq, last seq of the log) for a requested seq or time."""
        event_log = self.sources.event_log()
        try:
            last = event_log.last_seq()
            if time_ms is not None:
                seq = seq_at_time(event_log, time_ms)
        except redis.RedisError as error:
            raise self.sources.log_down(error) from error
        if seq is None:
            raise InvalidRequestError(
                "seq or time is missing: choose a position in the log"
            )
        if not 0 <= seq <= last:
            raise InvalidRequestError(
                f"seq {seq} is invalid: the log has seqs 0 to {last}"
            )
        return seq, last

    def state(self, namespace: str, seq: int, last: int) -> PastState:
        """Return the namespace's state after `seq`, with "now" brought up to `last`."""
        with self._lock:
            state = self._states.get((namespace, seq))
            try:
                if state is None:
                    state = self._build(namespace, seq)
                    self._states[(namespace, seq)] = state
                    while len(self._states) > self.max_states:
                        self._states.popitem(last=False)
                self._states.move_to_end((namespace, seq))
                if state.now_seq < last or not state.rows:
                    self._advance(state, last)
            except redis.RedisError as error:
                self._states.pop((namespace, seq), None)
                raise self.sources.log_down(error) from error
            return state

    def discard(self, namespace: str | None = None) -> int:
        """Drop the cached states of `namespace` (all when None); return how many."""
        with self._lock:
            doomed = [
                item
                for item in self._states
                if namespace is None or item[0] == namespace
            ]
            for item in doomed:
                del self._states[item]
            return len(doomed)

    def cached(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "namespace": state.namespace,
                    "seq": state.seq,
                    "now_seq": state.now_seq,
                }
                for state in self._states.values()
            ]

    def _build(self, namespace: str, seq: int) -> PastState:
        started = time.monotonic()
        target = self.sources.target()
        replayed = replay_shard(
            self.sources.event_log(),
            shard=shard_of(namespace, target.shards),
            shards=target.shards,
            policy=target.policy,
            until_seq=seq,
            snapshots=target.snapshots,
        )
        state = PastState(namespace, seq, replayed.ts, replayed.host)
        state.then = _records(replayed.host, namespace, replayed.ts)
        state.built_seconds = time.monotonic() - started
        return state

    def _advance(self, state: PastState, last: int) -> None:
        """Apply the log after `now_seq` up to `last` to the scratch shard; refresh "now"."""
        started = time.monotonic()
        event_log = self.sources.event_log()
        for batch in event_log.iter_from(state.now_seq, last):
            mine = [event for event in batch if state.host.owns(event)]
            if not mine:
                continue
            replies = state.host.apply(mine)
            rejected = {reply.id for reply in replies if isinstance(reply, Conflict)}
            for event in mine:
                if (
                    isinstance(event, Forget)
                    and event.namespace == state.namespace
                    and event.id not in rejected
                ):
                    # A Forget without a key forgets the whole namespace,
                    # so every key it had at `seq` has its value hidden.
                    keys = [event.key] if event.key is not None else list(state.then)
                    for key in keys:
                        state.forgotten[key] = event.seq or 0
        if last != state.now_seq:
            state.now_ts = event_ts(event_log, last)
        state.now_seq = last
        # Expiry now is judged by the clock, as a Get sent now would be.
        state.now = _records(state.host, state.namespace, int(time.time() * 1000))
        state.rows = {}
        state.built_seconds += time.monotonic() - started

    def page(
        self, state: PastState, *, changes_only: bool, offset: int, limit: int
    ) -> dict[str, Any]:
        """Return one page of the state's diff rows, and the counts of every change."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequestError(f"limit {limit} is invalid: use 1 to {MAX_PAGE}")
        if offset < 0:
            raise InvalidRequestError(f"offset {offset} is invalid: use 0 or more")
        with self._lock:
            if False not in state.rows:
                state.rows[False] = diff_changes(state)
                state.rows[True] = [
                    row for row in state.rows[False] if row[1] != "same"
                ]
            rows = state.rows[changes_only]
            counts = {
                name: 0 for name in ("added", "removed", "changed", "moved", "same")
            }
            for _, change in state.rows[False]:
                counts[change] += 1
            chosen = [
                diff_row(state, key, change)
                for key, change in rows[offset : offset + limit]
            ]
        return {
            "namespace": state.namespace,
            "seq": state.seq,
            "ts": state.ts,
            "now_seq": state.now_seq,
            "now_ts": state.now_ts,
            "then_records": len(state.then),
            "now_records": len(state.now),
            "counts": counts,
            "built_seconds": round(state.built_seconds, 3),
            "rows": chosen,
            "offset": offset,
            "total_rows": len(rows),
            "next_offset": offset + len(chosen)
            if offset + len(chosen) < len(rows)
            else None,
        }

    def require(self, namespace: str, seq: int) -> PastState:
        """Return a cached state or raise NotFoundError."""
        with self._lock:
            state = self._states.get((namespace, seq))
        if state is None:
            raise NotFoundError(
                f"no cached state of {namespace!r} at seq {seq}: open it again to build it"
            )
        return state
