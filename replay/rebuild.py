"""Rebuild tier state from the log into scratch tiers and compare it with live.

The scratch tiers are in memory, and the rebuild runs the same `Shard` code
as the live actors, so matching digests show that live state is what the
log prefix defines (invariant: rebuild equals live).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import msgspec
import structlog

from events.log import EventLog
from events.types import TierDigest
from handlers.policy import Policy
from handlers.shard import Shard
from tiers.base import TIER_NAMES
from tiers.memory import MemoryTier

__all__ = ["Mismatch", "RebuildResult", "compare_digests", "rebuild"]

log = structlog.get_logger("tiermem.replay")


class RebuildResult(msgspec.Struct, frozen=True, kw_only=True):
    """Digests of a rebuild at log position `seq`, and how long it took."""

    seq: int
    events: int
    seconds: float
    digests: list[TierDigest]

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class Mismatch(msgspec.Struct, frozen=True, kw_only=True):
    shard: int
    tier: str
    expected: str | None
    actual: str | None


def memory_shards(shards: int, policy: Policy) -> list[Shard]:
    """Return shards backed by fresh in-memory tiers, with no log attached."""
    hosts = [
        Shard(index, shards, {name: MemoryTier(name, index) for name in TIER_NAMES}, policy)
        for index in range(shards)
    ]
    for host in hosts:
        # Their log lines (an empty `shard.recovered` first) must not read
        # like those of the live shards.
        host.log_tag = host.log_tag.bind(scratch=True)
    return hosts


def rebuild(
    event_log: EventLog,
    *,
    shards: int,
    policy: Policy,
    until_seq: int,
    progress: Callable[[int], None] | None = None,
) -> RebuildResult:
    """Apply log events 1..until_seq to scratch shards and return their digests."""
    started = time.monotonic()
    hosts = memory_shards(shards, policy)
    for host in hosts:
        host.recover()
    count = 0
    for batch in event_log.iter_from(0, until_seq):
        per_shard: list[list] = [[] for _ in hosts]
        for event in batch:
            for host in hosts:
                if host.owns(event):
                    per_shard[host.shard].append(event)
        for host, events in zip(hosts, per_shard, strict=True):
            if events:
                host.apply(events)
        count += len(batch)
        if progress is not None:
            progress(len(batch))
    digests = [digest for host in hosts for digest in host.digests()]
    seconds = time.monotonic() - started
    log.info("replay.rebuild.completed", events=count, seq=until_seq, seconds=round(seconds, 3))
    return RebuildResult(seq=until_seq, events=count, seconds=seconds, digests=digests)


def compare_digests(expected: Sequence[TierDigest], actual: Sequence[TierDigest]) -> list[Mismatch]:
    """Return every (shard, tier) whose digest differs or exists on one side only."""
    left = {(item.shard, item.tier): item.digest for item in expected}
    right = {(item.shard, item.tier): item.digest for item in actual}
    return [
        Mismatch(shard=shard, tier=tier, expected=left.get((shard, tier)), actual=right.get((shard, tier)))
        for shard, tier in sorted(left.keys() | right.keys())
        if left.get((shard, tier)) != right.get((shard, tier))
    ]
