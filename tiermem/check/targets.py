"""Targets of the check: the target protocol and the in-process target.

A target takes the requests of one step (one or more clients, each on a
lane), returns one reply per request, and shows what it logged, so the
state machine can compare both with the model. The in-process target runs
the real `handlers.shard.Shard` code over `tiers.memory.MemoryTier`, behind
a small sequencer in this module that plays the router's part (sequence
numbers, timestamps from a fake clock, deduplication by id), with no Ray
and no network. The stack and deployment targets are in
`tiermem.check.remote`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import structlog

from events.codec import encode_event
from events.errors import ErrorCode
from events.log import LoggedId
from events.types import (
    Ack,
    Error,
    Event,
    Maintain,
    Message,
    Search,
    TierDigest,
)
from handlers.effects import Effect
from handlers.policy import Policy
from handlers.shard import Shard, answered_by_shard
from replay.rebuild import rebuild
from tiers.base import TIER_NAMES, Meta, Record, TierWrites
from tiers.errors import StorageError
from tiers.memory import MemoryTier

__all__ = [
    "CHECK_POLICY",
    "InProcessTarget",
    "LiveShard",
    "MemoryEffectLog",
    "MemoryEventLog",
    "Outgoing",
    "Schedule",
    "ShardCrashed",
    "StepResult",
    "Target",
]

log = structlog.get_logger("tiermem.check")

# Seconds before a paused shard's first retry, and between the sequencer's
# checks that it resumed.
_RESUME_S = 0.005

# Small enough that a few dozen events fill the cache, move records down
# every tier and evict from LTM. The times are in the fake clock's
# milliseconds, which the in-process machine advances in steps of 1 to
# 5,000 ms, so idle moves, decay and one-second TTLs all happen.
CHECK_POLICY = Policy(
    cache_capacity=3,
    stm_capacity=2,
    stm_idle_ms=200,
    im_capacity=2,
    im_idle_ms=1_000,
    ltm_capacity=3,
    half_life_ms=300,
    access_weight=100,
)


@dataclass(frozen=True)
class Outgoing:
    """One request of a step: the client that sends it and its lane."""

    client: int
    lane: str
    request: Event


@dataclass(frozen=True)
class Schedule:
    """The arrival order and batch cuts of an in-process step.

    `order` is the arrival order (indices into the step's requests; each
    client's requests keep their order), and `cuts` are the positions in
    `order` after which the sequencer closes a batch. Remote targets ignore
    it, because the network decides.
    """

    order: tuple[int, ...]
    cuts: frozenset[int] = frozenset()


@dataclass
class StepResult:
    """The replies of one step, aligned with its requests, and what it logged.

    `logged` maps request ids to the events the log holds for them, with
    the router's `seq` and `ts`. `foreign` are the other events logged during the step: other
    clients of a shared deployment, or the `Maintain` passes of Celery
    beat. `ts_window` bounds the timestamp that a repeated
    `Get` was served at, because such a read is not logged again.
    `recovered` contains the ids of requests that a restarted shard answered
    from its state after recovery. `faulted` is true when a tier was down
    during the step: degraded reads and `unavailable` replies are then
    acceptable. The target returns only once its shards have caught up.
    """

    replies: list[Message]
    logged: dict[str, Event]
    foreign: list[Event] = field(default_factory=list)
    ts_window: tuple[int, int] = (0, 0)
    recovered: set[str] = field(default_factory=set)
    faulted: bool = False


@dataclass
class LiveShard:
    """One shard's live records per tier and its cache, least recently used first."""

    records: dict[str, dict[tuple[str, str], Record]]
    cache: list[tuple[str, str]]


class Target(Protocol):
    """The interface through which the state machine drives a system under test."""

    name: str
    shards: int
    policy: Policy
    exclusive: bool  # no other client writes to the log or the namespaces
    controls_clock: bool  # `advance_clock` moves the timestamps the router assigns
    supports_search: bool
    client_resends: bool  # the client resends on its own timeout, so a new event may get a duplicate Ack

    def begin(self) -> int:
        """Prepare a fresh example; return the log's last sequence number."""
        ...

    def send(
        self, step: Sequence[Outgoing], schedule: Schedule | None
    ) -> StepResult: ...

    def advance_clock(self, ms: int) -> None: ...

    def digests(self) -> tuple[int, list[TierDigest]] | None:
        """Return the live digests and the log position they describe."""
        ...

    def rebuilt_digests(self, until_seq: int) -> list[TierDigest] | None:
        """Return the digests of the log replayed into scratch shards."""
        ...

    def live_state(self) -> list[LiveShard] | None: ...

    def faults(self) -> tuple[str, ...]:
        """Return the names of the faults `inject` accepts on this target."""
        ...

    def inject(self, fault: str, target: int) -> str:
        """Cause one fault; return what was done, for the failure report."""
        ...

    def events(self) -> list[Event]:
        """Return this example's logged events in seq order."""
        ...

    def end(self, written: set[tuple[str, str]]) -> None:
        """Finish an example; a shared target forgets every key in `written`."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------- the log


def body_hash(event: Event) -> int:
    """Return a 64-bit hash of an event without `seq` and `ts`, for the id index."""
    body = msgspec.msgpack.encode(msgspec.structs.replace(event, seq=None, ts=None))
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "big")


class MemoryEventLog:
    """An `EventLog` kept in a list, with an id index, for in-process runs.

    The first appended event may have any `seq` (a failing run saved from a
    stack starts where that example started); after it they are dense.
    """

    def __init__(self, read_batch: int = 64) -> None:
        self.entries: list[Event] = []
        self.ids: dict[str, LoggedId] = {}
        self.read_batch = read_batch
        self.offset = 0  # seq of the first entry, minus one

    def last_seq(self) -> int:
        return self.offset + len(self.entries)

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        return [self.ids.get(event_id) for event_id in ids]

    def append(
        self, events: Sequence[Event], body_hashes: Sequence[int]
    ) -> list[bytes]:
        for event, hashed in zip(events, body_hashes, strict=True):
            if not self.entries and event.seq is not None:
                self.offset = event.seq - 1
            if event.seq != self.last_seq() + 1 or event.id is None:
                raise ValueError(
                    f"event {event.id!r} has seq {event.seq}, expected "
                    f"{self.last_seq() + 1} and an id"
                )
            self.entries.append(event)
            self.ids[event.id] = LoggedId(event.seq, hashed)
        return [encode_event(event) for event in events]

    def read(self, after_seq: int, limit: int) -> list[Event]:
        start = max(0, after_seq - self.offset)
        return self.entries[start : start + limit]

    def iter_from(
        self, after_seq: int, until_seq: int | None = None
    ) -> Iterator[list[Event]]:
        position = max(after_seq, self.offset)
        end = self.last_seq() if until_seq is None else min(until_seq, self.last_seq())
        while position < end:
            batch = self.read(position, min(self.read_batch, end - position))
            position += len(batch)
            yield batch


class MemoryEffectLog:
    """An `EffectLog` kept in lists, one per shard, for in-process runs.

    Entries are keyed like the Redis streams, (seq, position within the
    event), and an append skips the ones already written, so a shard that
    applies a batch again after a crash writes each effect once.
    """

    def __init__(self) -> None:
        self.entries: dict[int, list[tuple[tuple[int, int], Effect]]] = {}

    def append(self, shard: int, effects: Sequence[Effect]) -> None:
        stream = self.entries.setdefault(shard, [])
        last = stream[-1][0] if stream else (0, -1)
        position, previous = -1, -1
        for effect in effects:
            position = position + 1 if effect.seq == previous else 0
            previous = effect.seq
            if (effect.seq, position) > last:
                stream.append(((effect.seq, position), effect))

    def read(self, shard: int, after_seq: int, until_seq: int) -> list[Effect]:
        return [
            effect
            for (seq, _), effect in self.entries.get(shard, [])
            if after_seq < seq <= until_seq
        ]


# ----------------------------------------------------------------- faults


class ShardCrashed(Exception):
    """The shard's process died (simulated): every later tier call fails too."""


class _FaultSwitch:
    """Crash and outage state shared by the tiers of one shard."""

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.crash_countdown: int | None = None
        self.dead = False
        self.down: set[str] = set()

    def before(self, tier: str, action: str, durable: bool) -> None:
        if self.dead:
            raise ShardCrashed(f"shard {self.shard} is dead")
        if tier in self.down:
            raise StorageError(
                f"{tier} shard {self.shard}: {action} failed: the tier is down",
                tier=tier,
                shard=self.shard,
                action=action,
            )
        if durable and self.crash_countdown is not None:
            self.crash_countdown -= 1
            if self.crash_countdown <= 0:
                # The process dies before this write reaches the tier.
                self.crash_countdown = None
                self.dead = True
                raise ShardCrashed(
                    f"shard {self.shard} crashed before a {tier} {action}"
                )


class FaultyTier:
    """A `Tier` that forwards to a `MemoryTier` unless its shard crashed or it is down.

    The inner tier outlives the shard object, as Redis and SQLite outlive a
    killed actor.
    """

    def __init__(self, inner: MemoryTier, switch: _FaultSwitch) -> None:
        self.inner = inner
        self.switch = switch
        self.name = inner.name
        self.shard = inner.shard

    def _check(self, action: str, durable: bool = False) -> None:
        self.switch.before(self.name, action, durable)

    def watermark(self) -> int:
        self._check("watermark")
        return self.inner.watermark()

    def get(self, namespace: str, key: str) -> Record | None:
        self._check("get")
        return self.inner.get(namespace, key)

    def get_many(self, keys):
        self._check("get_many")
        return self.inner.get_many(keys)

    def scan_meta(self) -> Iterator[tuple[str, str, Meta]]:
        self._check("scan_meta")
        return self.inner.scan_meta()

    def records(self) -> Iterator[Record]:
        self._check("records")
        return self.inner.records()

    def commit(
        self,
        writes: TierWrites,
        watermark: int,
        control: dict[str, bytes | None] | None = None,
    ) -> None:
        self._check("commit", durable=True)
        self.inner.commit(writes, watermark, control)

    def control(self, name: str) -> bytes | None:
        self._check("control")
        return self.inner.control(name)

    def put_control(self, name: str, value: bytes | None) -> None:
        self._check("put_control", durable=True)
        self.inner.put_control(name, value)

    def digest(self) -> tuple[str, int]:
        self._check("digest")
        return self.inner.digest()

    def clear(self) -> None:
        self._check("clear", durable=True)
        self.inner.clear()

    def close(self) -> None:
        """Do nothing: the inner tier stays for the shard's next process."""


# ----------------------------------------------------------------- in-process


class InProcessTarget:
    """Real shards over in-memory tiers behind a sequencer with a fake clock.

    The sequencer does what the router does for a batch: looks up each id in
    the log's id index (a repeated id with the same body is a duplicate,
    with another body a conflict), gives new events consecutive sequence
    numbers and the clock's time, appends them, answers `Ack`s, and gives
    each shard its part of the batch in one `apply` call, a `Maintain` to
    every shard. A shard that crashes in `apply` is rebuilt over its
    surviving tiers, recovers from the log, and gets the batch again, as
    `bus.dispatch.RayDispatcher` resends to a restarted actor. A tier that
    is down for a step pauses its shard (the shard's circuit breaker); the
    step returns once the tier is back and the shard has resumed.
    """

    name = "inprocess"
    exclusive = True
    controls_clock = True
    supports_search = False
    client_resends = False

    def __init__(
        self,
        shards: int = 2,
        policy: Policy = CHECK_POLICY,
        *,
        start_ms: int = 1_000_000,
        outages: bool = False,
    ) -> None:
        self.shards = shards
        self.policy = policy
        self.start_ms = start_ms
        self.outages = outages
        self.log = MemoryEventLog()
        self.effects = MemoryEffectLog()
        self.now = start_ms
        self._inner: list[dict[str, MemoryTier]] = []
        self._switches: list[_FaultSwitch] = []
        self.hosts: list[Shard] = []
        self._pending_outage: tuple[int, str] | None = None

    # ------------------------------------------------------------- lifecycle

    def begin(self) -> int:
        self.log = MemoryEventLog()
        self.effects = MemoryEffectLog()
        self.now = self.start_ms
        self._inner = [
            {name: MemoryTier(name, index) for name in TIER_NAMES}
            for index in range(self.shards)
        ]
        self._switches = [_FaultSwitch(index) for index in range(self.shards)]
        self._pending_outage = None
        self.hosts = [self._start_shard(index) for index in range(self.shards)]
        return 0

    def _start_shard(self, index: int) -> Shard:
        switch = self._switches[index]
        tiers = {
            name: FaultyTier(tier, switch) for name, tier in self._inner[index].items()
        }
        host = Shard(index, self.shards, tiers, self.policy, self.log, self.effects)
        # The breaker's first retry after a tier comes back; the sequencer
        # waits for it (see `_wait_resumed`), so a short one keeps runs fast.
        host.resume_initial_s = _RESUME_S
        host.recover()
        return host

    def _restart(self, index: int) -> None:
        # The dead shard object still has a breaker thread; stop it, as the
        # process's death would.
        self.hosts[index].close()
        self._switches[index] = _FaultSwitch(index)
        self.hosts[index] = self._start_shard(index)

    def end(self, written: set[tuple[str, str]]) -> None:
        """Stop the shards' breaker threads; the next example starts from fresh tiers."""
        for host in self.hosts:
            host.close()

    def close(self) -> None:
        self.end(set())
        self.hosts = []

    def advance_clock(self, ms: int) -> None:
        self.now += ms

    def events(self) -> list[Event]:
        return list(self.log.entries)

    # ------------------------------------------------------------- faults

    def faults(self) -> tuple[str, ...]:
        names = ("crash_shard",)
        if self.outages:
            names += ("tier_outage",)
        return names

    def inject(self, fault: str, target: int) -> str:
        """Arm a fault for the next step.

        `crash_shard`: shard `target % shards` dies before its
        `target // shards + 1`-th durable write of the next step, or between
        steps if the step writes less. `tier_outage`: one tier of one shard
        is down for the next step.
        """
        shard = target % self.shards
        if fault == "crash_shard":
            writes = target // self.shards + 1
            self._switches[shard].crash_countdown = writes
            return f"shard {shard} dies before durable write {writes} of the next step"
        if fault == "tier_outage":
            tier = TIER_NAMES[(target // self.shards) % len(TIER_NAMES)]
            self._pending_outage = (shard, tier)
            return f"{tier} of shard {shard} is down for the next step"
        raise ValueError(f"fault {fault!r} is not one of {self.faults()}")

    # ------------------------------------------------------------- steps

    def send(self, step: Sequence[Outgoing], schedule: Schedule | None) -> StepResult:
        first = self.log.last_seq()
        order = schedule.order if schedule else tuple(range(len(step)))
        cuts = schedule.cuts if schedule else frozenset()
        if sorted(order) != list(range(len(step))):
            raise ValueError(
                f"schedule order {order} is not a permutation of {len(step)} requests"
            )
        faulted = self._pending_outage is not None
        if self._pending_outage is not None:
            shard, tier = self._pending_outage
            self._switches[shard].down.add(tier)

        replies: list[Message | None] = [None] * len(step)
        recovered: set[str] = set()
        batch: list[int] = []
        for position, index in enumerate(order):
            batch.append(index)
            if position in cuts or position == len(order) - 1:
                requests = [(member, step[member].request) for member in batch]
                self._run_batch(requests, replies, recovered)
                batch = []

        for switch in self._switches:
            switch.down.clear()
            if switch.crash_countdown is not None:
                # The step wrote less than the countdown: crash while idle.
                switch.crash_countdown = None
                self._restart(switch.shard)
        self._pending_outage = None
        if faulted:
            self._wait_resumed()

        missing = [
            step[index].request.id
            for index, reply in enumerate(replies)
            if reply is None
        ]
        if missing:
            raise AssertionError(
                f"the in-process sequencer left requests {missing} unanswered"
            )
        ours = {out.request.id for out in step}
        entries = self.log.entries[first:]
        return StepResult(
            replies=[reply for reply in replies if reply is not None],
            logged={event.id or "": event for event in entries if event.id in ours},
            foreign=[event for event in entries if event.id not in ours],
            ts_window=(self.now, self.now),
            recovered=recovered,
            faulted=faulted,
        )

    def _run_batch(
        self,
        batch: list[tuple[int, Event]],
        replies: list[Message | None],
        recovered: set[str],
    ) -> None:
        now = self.now
        found = self.log.lookup([event.id or "" for _, event in batch])
        seen: dict[str, LoggedId] = {}
        new: list[Event] = []
        hashes: list[int] = []
        gets: dict[str, int] = {}
        per_shard: dict[int, list[Event]] = {}
        seq = self.log.last_seq()
        for (index, event), logged in zip(batch, found, strict=True):
            hashed = body_hash(event)
            earlier = logged or seen.get(event.id or "")
            if earlier is not None:
                if earlier.body_hash != hashed:
                    replies[index] = Error(
                        id=event.id,
                        code=ErrorCode.CONFLICT,
                        message=f"id {event.id!r} was used for another event",
                        field="$.id",
                    )
                elif answered_by_shard(event):
                    # A repeated read or conditional write: its shard answers
                    # from what it applied, and it is not logged again.
                    repeated = msgspec.structs.replace(event, seq=earlier.seq, ts=now)
                    per_shard.setdefault(self._owner(repeated), []).append(repeated)
                    gets[event.id or ""] = index
                elif isinstance(event, Search):
                    replies[index] = _search_unavailable(event)
                else:
                    replies[index] = Ack(id=event.id, seq=earlier.seq, duplicate=True)
                continue
            seq += 1
            stamped = msgspec.structs.replace(event, seq=seq, ts=now)
            seen[event.id or ""] = LoggedId(seq, hashed)
            new.append(stamped)
            hashes.append(hashed)
            if isinstance(event, Search):
                replies[index] = _search_unavailable(event)
                continue
            if answered_by_shard(event):
                gets[event.id or ""] = index
            else:
                replies[index] = Ack(id=event.id, seq=seq)
            owners = (
                range(self.shards)
                if isinstance(event, Maintain)
                else (self._owner(stamped),)
            )
            for owner in owners:
                per_shard.setdefault(owner, []).append(stamped)
        self.log.append(new, hashes)
        for shard in sorted(per_shard):
            events = sorted(per_shard[shard], key=lambda item: item.seq or 0)
            shard_replies, restarted = self._apply(shard, events)
            waiting = {event.id for event in events if answered_by_shard(event)}
            if shard_replies is None:
                for request_id in waiting:
                    replies[gets[request_id or ""]] = Error(
                        id=request_id,
                        code=ErrorCode.UNAVAILABLE,
                        message=f"shard {shard} failed",
                    )
                continue
            for reply in shard_replies:
                if reply.id in waiting:
                    replies[gets[reply.id or ""]] = reply
                    if restarted:
                        recovered.add(reply.id or "")

    def _owner(self, event: Event) -> int:
        owners = [host.shard for host in self.hosts if host.owns(event)]
        if len(owners) != 1:
            raise AssertionError(
                f"namespace {event.namespace!r} is owned by shards {owners}, expected exactly one"
            )
        return owners[0]

    def _apply(
        self, shard: int, events: list[Event]
    ) -> tuple[list[Message] | None, bool]:
        """Apply a batch; after a simulated crash, restart the shard and resend it.

        The shard may catch its tiers' errors itself (its breaker), so the
        fault switch, not an exception, shows that the process died.
        """
        try:
            replies: list[Message] | None = self.hosts[shard].apply(events)
        except ShardCrashed:
            replies = None
        except StorageError as error:
            log.info(
                "check.shard.apply_failed",
                shard=shard,
                error=str(error),
                next="answering its reads unavailable",
            )
            return None, False
        if not self._switches[shard].dead:
            return replies, False
        log.info(
            "check.shard.restarted",
            shard=shard,
            first_seq=events[0].seq,
            next="recovering and resending the batch",
        )
        self._restart(shard)
        return self.hosts[shard].apply(events), True

    def _wait_resumed(self, timeout: float = 10.0) -> None:
        """Wait until every shard paused by an outage has caught up again."""
        deadline = time.monotonic() + timeout
        for host in self.hosts:
            while getattr(host, "paused", False):
                if time.monotonic() >= deadline:
                    raise AssertionError(
                        f"shard {host.shard} did not resume within {timeout:.0f}s after its tier came back"
                    )
                time.sleep(_RESUME_S)

    # ------------------------------------------------------------- inspection

    def digests(self) -> tuple[int, list[TierDigest]]:
        return self.log.last_seq(), [
            digest for host in self.hosts for digest in host.digests()
        ]

    def rebuilt_digests(self, until_seq: int) -> list[TierDigest]:
        return rebuild(
            self.log, shards=self.shards, policy=self.policy, until_seq=until_seq
        ).digests

    def live_state(self) -> list[LiveShard]:
        shards = []
        for index, host in enumerate(self.hosts):
            records = {
                name: {
                    (record.namespace, record.key): record
                    for record in self._inner[index][name].records()
                }
                for name in TIER_NAMES
            }
            shards.append(LiveShard(records=records, cache=host.state.cache_keys()))
        return shards


def _search_unavailable(event: Event) -> Message:
    return Error(
        id=event.id,
        code=ErrorCode.UNAVAILABLE,
        message="search is not configured: no search projection",
    )


def describe(value: Any) -> str:
    """Return a short text for an event or reply in failure messages."""
    if isinstance(value, msgspec.Struct):
        return msgspec.json.encode(value).decode()
    return repr(value)
