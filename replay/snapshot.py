"""Taking snapshots: replay the log into a scratch shard and write its tiers to a file.

A snapshot is built from the log, never copied from the live tiers, so it
is exactly what the log prefix defines even if a live tier has drifted.
The build starts from the shard's newest valid snapshot at or below the
target, or from empty. It applies the log tail up to the target to a shard
backed by in-memory tiers, which runs the same `Shard` code as the live
actors, and writes the result with `tiers.snapshot.write_snapshot`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import structlog

from events.log import EventLog
from handlers.policy import Policy
from handlers.shard import Shard
from tiers.base import TIER_NAMES
from tiers.memory import MemoryTier
from tiers.snapshot import (
    Snapshot,
    newest_valid,
    prune_snapshots,
    snapshot_from_tiers,
    snapshot_path,
    write_snapshot,
)

__all__ = [
    "DEFAULT_KEEP",
    "ReplayedShard",
    "SnapshotResult",
    "event_ts",
    "replay_shard",
    "scratch_shard",
    "snapshot_root",
    "take_snapshot",
]

log = structlog.get_logger("tiermem.replay.snapshot")

# Snapshots kept per shard by default: the newest, plus two to fall back on
# when the newest turns out corrupt.
DEFAULT_KEEP = 3


def snapshot_root(data_dir: str | Path) -> Path:
    """Return the directory of a data directory's snapshots (`DIR/snapshots`)."""
    return Path(data_dir) / "snapshots"


def scratch_shard(shard: int, shards: int, policy: Policy) -> Shard:
    """Return a shard backed by empty in-memory tiers, with no log attached."""
    host = Shard(shard, shards, {name: MemoryTier(name, shard) for name in TIER_NAMES}, policy)
    host.recover()
    return host


def event_ts(event_log: EventLog, seq: int) -> int:
    """Return the ingest timestamp of the event at `seq`, 0 for seq 0.

    Raises ValueError when the log has no event at `seq`.
    """
    if seq == 0:
        return 0
    found = event_log.read(seq - 1, 1)
    if not found or found[0].seq != seq:
        raise ValueError(f"seq {seq} is past the end of the log, which ends at seq {event_log.last_seq()}")
    return found[0].ts or 0


class ReplayedShard:
    """A scratch shard rebuilt up to `seq`, and what the rebuild cost.

    `base_seq` is the watermark of the snapshot it started from (0 when it
    started empty) and `events` the number of this shard's events applied
    after it.
    """

    def __init__(self, host: Shard, seq: int, ts: int, base_seq: int, events: int, seconds: float) -> None:
        self.host = host
        self.seq = seq
        self.ts = ts
        self.base_seq = base_seq
        self.events = events
        self.seconds = seconds

    def advance(
        self,
        event_log: EventLog,
        until_seq: int,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Apply the shard's events in (`seq`, `until_seq`] and move `seq` there; return how many.

        Raises ValueError when `until_seq` is below `seq` or past the end of
        the log.
        """
        if until_seq < self.seq:
            raise ValueError(f"seq {until_seq} is below the scratch shard's seq {self.seq}")
        started = time.monotonic()
        ts = event_ts(event_log, until_seq)
        applied = _apply_range(self.host, event_log, self.seq, until_seq, progress)
        self.seq, self.ts = until_seq, ts
        self.events += applied
        self.seconds += time.monotonic() - started
        return applied

    def snapshot(self) -> Snapshot:
        """Return the scratch shard's tiers as a snapshot at `seq`."""
        return snapshot_from_tiers(
            self.host.tiers,
            shard=self.host.shard,
            shards=self.host.shards,
            fingerprint=self.host.fingerprint,
            watermark=self.seq,
            ts=self.ts,
        )


def replay_shard(
    event_log: EventLog,
    *,
    shard: int,
    shards: int,
    policy: Policy,
    until_seq: int,
    snapshots: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReplayedShard:
    """Rebuild one shard's state at `until_seq` in scratch tiers.

    Starts from the newest valid snapshot under `snapshots` whose watermark
    is at most `until_seq` (or from empty when `snapshots` is None or
    contains none), then applies the shard's events in (snapshot, until_seq].
    `progress` is called with the number of log events read per batch.
    Raises ValueError when `until_seq` is past the end of the log or
    `shard` is not in range(shards).
    """
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} does not exist: there are shards 0 to {shards - 1}")
    started = time.monotonic()
    ts = event_ts(event_log, until_seq)
    host = scratch_shard(shard, shards, policy)
    # Values forgotten after a snapshot are erased from it as it loads, so
    # a view or a new snapshot never brings back what a Forget removed.
    forgets = getattr(event_log, "forgets_after", None)
    base = (
        newest_valid(snapshots, shard, host.fingerprint, max_seq=until_seq, forgets=forgets)
        if snapshots is not None
        else None
    )
    base_seq = 0
    if base is not None:
        host.load_snapshot(base)
        base_seq = base.watermark
    applied = _apply_range(host, event_log, base_seq, until_seq, progress)
    seconds = time.monotonic() - started
    log.info(
        "replay.shard.rebuilt",
        shard=shard,
        seq=until_seq,
        base_seq=base_seq,
        events=applied,
        seconds=round(seconds, 3),
    )
    return ReplayedShard(host, until_seq, ts, base_seq, applied, seconds)


def _apply_range(
    host: Shard,
    event_log: EventLog,
    after_seq: int,
    until_seq: int,
    progress: Callable[[int], None] | None,
) -> int:
    """Apply `host`'s events in (`after_seq`, `until_seq`]; return how many it applied."""
    applied = 0
    for batch in event_log.iter_from(after_seq, until_seq):
        mine = [event for event in batch if host.owns(event)]
        if mine:
            host.apply(mine)
            applied += len(mine)
        if progress is not None:
            progress(len(batch))
    return applied


class SnapshotResult(msgspec.Struct, frozen=True, kw_only=True):
    """One `take_snapshot`: the file, what it was built from, and the files pruned.

    `written` is False when a valid snapshot at `watermark` already existed,
    which is then left as it is.
    """

    shard: int
    watermark: int
    path: str
    written: bool
    base_seq: int
    events: int
    seconds: float
    records: dict[str, int]
    pruned: list[str] = []


def take_snapshot(
    data_dir: str | Path,
    event_log: EventLog,
    shards: int,
    policy: Policy,
    shard: int,
    until_seq: int | None = None,
    *,
    keep: int = DEFAULT_KEEP,
    progress: Callable[[int], None] | None = None,
) -> SnapshotResult:
    """Write the snapshot of `shard` at `until_seq` (default: the log's last seq).

    Built from the newest valid snapshot and the log as `replay_shard`
    describes, into `DIR/snapshots/shard-<n>/`. Then all but the newest
    `keep` snapshot files of the shard are deleted. Taking the same
    snapshot twice leaves the same files. `progress` is passed to
    `replay_shard`.
    """
    root = snapshot_root(data_dir)
    if until_seq is None:
        until_seq = event_log.last_seq()
    replayed = replay_shard(
        event_log,
        shard=shard,
        shards=shards,
        policy=policy,
        until_seq=until_seq,
        snapshots=root,
        progress=progress,
    )
    path = snapshot_path(root, shard, until_seq)
    written = replayed.base_seq != until_seq or not path.exists()
    snapshot = replayed.snapshot()
    if written:
        path = write_snapshot(root, snapshot)
    pruned = prune_snapshots(root, shard, keep)
    return SnapshotResult(
        shard=shard,
        watermark=until_seq,
        path=str(path),
        written=written,
        base_seq=replayed.base_seq,
        events=replayed.events,
        seconds=round(replayed.seconds, 3),
        records={name: len(snapshot.tiers[name]) for name in TIER_NAMES},
        pruned=[str(item) for item in pruned],
    )
