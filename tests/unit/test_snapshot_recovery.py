"""Tests of snapshots built from the log and of shard recovery from them, on in-memory tiers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from events.log import LoggedId
from events.types import Event, Forget, Get, Maintain, Store
from handlers.policy import Policy
from handlers.shard import Shard
from handlers.sharding import shard_of
from replay.snapshot import replay_shard, snapshot_root, take_snapshot
from tiers.base import TIER_NAMES, TierWrites
from tiers.memory import MemoryTier
from tiers.snapshot import list_snapshots, read_snapshot, write_snapshot

POLICY = Policy(cache_capacity=4, stm_capacity=2, stm_idle_ms=100, im_capacity=2, im_idle_ms=1_000, ltm_capacity=3)
SHARDS = 2


class MemoryLog:
    """An `EventLog` in a list, stamping seq and ts as the router would."""

    def __init__(self, read_batch: int = 7) -> None:
        self.events: list[Event] = []
        self.read_batch = read_batch

    def add(self, events: Sequence[Event], ts_step: int = 10) -> list[Event]:
        stamped = []
        for event in events:
            seq = self.last_seq() + 1
            stamped.append(event.__class__(**{**_fields(event), "seq": seq, "ts": seq * ts_step, "id": f"e{seq}"}))
            self.events.append(stamped[-1])
        return stamped

    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        return [None for _ in ids]

    def append(self, events: Sequence[Event], body_hashes: Sequence[int]) -> None:
        self.events.extend(events)

    def read(self, after_seq: int, limit: int) -> list[Event]:
        return self.events[after_seq : after_seq + limit]

    def iter_from(self, after_seq: int, until_seq: int | None = None) -> Iterator[list[Event]]:
        end = len(self.events) if until_seq is None else min(until_seq, len(self.events))
        for start in range(after_seq, end, self.read_batch):
            yield self.events[start : min(start + self.read_batch, end)]


def _fields(event: Event) -> dict:
    return {name: getattr(event, name) for name in event.__struct_fields__}


def workload(rounds: int, start: int = 0) -> list[Event]:
    events: list[Event] = []
    for round_ in range(start, start + rounds):
        for n in range(4):
            for k in range(5):
                events.append(Store(namespace=f"ns{n}", key=f"k{k}", value={"r": round_, "k": k}, importance=(k % 3) / 3))
            events.append(Get(namespace=f"ns{n}", key=f"k{round_ % 5}"))
            events.append(Forget(namespace=f"ns{n}", key=f"k{(round_ + 2) % 5}"))
        events.append(Maintain())
    return events


def memory_tiers(shard: int) -> dict[str, MemoryTier]:
    return {name: MemoryTier(name, shard) for name in TIER_NAMES}


def live_shards(event_log: MemoryLog, snapshots: Path | None = None) -> list[Shard]:
    shards = [Shard(i, SHARDS, memory_tiers(i), POLICY, event_log, snapshot_dir=snapshots) for i in range(SHARDS)]
    for shard in shards:
        shard.recover()
    return shards


def feed(shards: list[Shard], events: list[Event]) -> None:
    for shard in shards:
        mine = [event for event in events if shard.owns(event)]
        if mine:
            shard.apply(mine)


def own_events(events: list[Event], shard: int) -> int:
    return sum(1 for event in events if isinstance(event, Maintain) or shard_of(event.namespace, SHARDS) == shard)


def test_snapshot_from_log_equals_live(tmp_path: Path):
    event_log = MemoryLog()
    shards = live_shards(event_log)
    feed(shards, event_log.add(workload(4)))

    for shard in shards:
        result = take_snapshot(tmp_path, event_log, SHARDS, POLICY, shard.shard)
        snapshot = read_snapshot(result.path)
        live = {item.tier: (item.digest, item.records) for item in shard.digests() if item.tier != "cache"}
        assert result.written is True
        assert result.watermark == event_log.last_seq()
        assert snapshot.digests() == live
        assert snapshot.ts == event_log.events[-1].ts


def test_snapshot_starts_from_previous(tmp_path: Path):
    event_log = MemoryLog()
    first = event_log.add(workload(3))
    take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0)
    second = event_log.add(workload(2, start=3))

    result = take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0)

    assert result.base_seq == len(first)
    assert result.events == own_events(second, 0)
    full = replay_shard(event_log, shard=0, shards=SHARDS, policy=POLICY, until_seq=event_log.last_seq())
    assert read_snapshot(result.path).digests() == full.snapshot().digests()


def test_take_snapshot_twice_same_files(tmp_path: Path):
    event_log = MemoryLog()
    event_log.add(workload(2))
    first = take_snapshot(tmp_path, event_log, SHARDS, POLICY, 1)
    files = {path: path.read_bytes() for _, path in list_snapshots(snapshot_root(tmp_path), 1)}

    again = take_snapshot(tmp_path, event_log, SHARDS, POLICY, 1)

    assert again.written is False
    assert again.path == first.path
    assert {path: path.read_bytes() for _, path in list_snapshots(snapshot_root(tmp_path), 1)} == files


def test_take_snapshot_keeps_newest(tmp_path: Path):
    event_log = MemoryLog()
    for round_ in range(5):
        event_log.add(workload(1, start=round_))
        result = take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0, keep=2)

    kept = [watermark for watermark, _ in list_snapshots(snapshot_root(tmp_path), 0)]
    assert kept == [event_log.last_seq() - len(workload(1)), event_log.last_seq()]
    assert len(result.pruned) == 1


def test_recover_replays_only_tail(tmp_path: Path):
    event_log = MemoryLog()
    snapshots = snapshot_root(tmp_path)
    shards = live_shards(event_log, snapshots)
    head = event_log.add(workload(3))
    feed(shards, head)
    for shard in shards:
        take_snapshot(tmp_path, event_log, SHARDS, POLICY, shard.shard)
    tail = event_log.add(workload(2, start=3))
    feed(shards, tail)
    before = [shard.digests() for shard in shards]

    for shard in shards:
        shard.tiers["stm"].clear()  # STM lost everything: a rebuild is due
        restarted = Shard(shard.shard, SHARDS, shard.tiers, POLICY, event_log, snapshot_dir=snapshots)
        with capture_logs() as logs:
            report = restarted.recover()

        assert report.rebuilt is True
        assert report.snapshot_seq == len(head)
        assert report.loaded_watermark == len(head)
        assert report.replayed == own_events(tail, shard.shard)
        assert restarted.digests() == before[shard.shard]
        started = [entry for entry in logs if entry["event"] == "shard.rebuild.started"]
        assert started[0]["snapshot_seq"] == len(head)


def test_recover_empty_tiers_use_snapshot(tmp_path: Path):
    event_log = MemoryLog()
    snapshots = snapshot_root(tmp_path)
    head = event_log.add(workload(2))
    take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0)
    tail = event_log.add(workload(1, start=2))

    fresh = Shard(0, SHARDS, memory_tiers(0), POLICY, event_log, snapshot_dir=snapshots)
    report = fresh.recover()

    assert report.rebuilt is True
    assert report.reason == f"the tiers are empty but the log holds events up to seq {event_log.last_seq()}"
    assert report.snapshot_seq == len(head)
    assert report.replayed == own_events(tail, 0)
    reference = live_shards(event_log)[0]
    assert fresh.digests() == reference.digests()


def test_recover_without_snapshot_replays_all(tmp_path: Path):
    event_log = MemoryLog()
    events = event_log.add(workload(2))

    fresh = Shard(1, SHARDS, memory_tiers(1), POLICY, event_log, snapshot_dir=snapshot_root(tmp_path))
    report = fresh.recover()

    assert report.snapshot_seq is None
    assert report.replayed == own_events(events, 1)


def test_recover_skips_snapshot_past_log_end(tmp_path: Path):
    """A snapshot beyond the log's last event belongs to another log."""
    longer = MemoryLog()
    longer.add(workload(3))
    take_snapshot(tmp_path, longer, SHARDS, POLICY, 0)
    event_log = MemoryLog()
    events = event_log.add(workload(1))

    fresh = Shard(0, SHARDS, memory_tiers(0), POLICY, event_log, snapshot_dir=snapshot_root(tmp_path))
    report = fresh.recover()

    assert report.snapshot_seq is None
    assert report.replayed == own_events(events, 0)


def test_recover_falls_back_past_corrupt_snapshot(tmp_path: Path):
    event_log = MemoryLog()
    snapshots = snapshot_root(tmp_path)
    head = event_log.add(workload(2))
    take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0)
    event_log.add(workload(1, start=2))
    newest = take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0)
    Path(newest.path).write_bytes(Path(newest.path).read_bytes()[:100])
    tail = event_log.events[len(head) :]

    fresh = Shard(0, SHARDS, memory_tiers(0), POLICY, event_log, snapshot_dir=snapshots)
    with capture_logs() as logs:
        report = fresh.recover()

    assert report.snapshot_seq == len(head)
    assert report.replayed == own_events(tail, 0)
    skipped = [entry for entry in logs if entry["event"] == "snapshot.skipped"]
    assert [entry["path"] for entry in skipped] == [newest.path]


def test_rebuild_restores_lost_record(tmp_path: Path):
    """`rebuild` repairs damage that the consistency check of `recover` cannot see."""
    event_log = MemoryLog()
    snapshots = snapshot_root(tmp_path)
    shards = live_shards(event_log, snapshots)
    head = event_log.add(workload(2))
    feed(shards, head)
    take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0)
    tail = event_log.add(workload(1, start=2))
    feed(shards, tail)
    shard = shards[0]
    before = shard.digests()
    victim = next(shard.tiers["stm"].records())
    stm = shard.tiers["stm"]
    stm.commit(TierWrites(deletes=[(victim.namespace, victim.key)]), stm.watermark())
    assert shard.tiers["stm"].digest() != next(d for d in before if d.tier == "stm").digest

    report = shard.rebuild()

    assert report.rebuilt is True
    assert report.reason == "rebuild requested"
    assert report.snapshot_seq == len(head)
    assert report.replayed == own_events(tail, 0)
    assert shard.digests() == before


@pytest.mark.parametrize("until", [0, 1, 17, 40])
def test_replay_shard_until_seq(until: int):
    event_log = MemoryLog()
    events = event_log.add(workload(2))
    reference = live_shards(MemoryLog())
    feed(reference, events[:until])

    replayed = replay_shard(event_log, shard=1, shards=SHARDS, policy=POLICY, until_seq=until)

    assert replayed.host.digests() == reference[1].digests()
    assert replayed.events == own_events(events[:until], 1)
    assert replayed.ts == (events[until - 1].ts if until else 0)


def test_replay_shard_past_log_end_raises():
    event_log = MemoryLog()
    event_log.add(workload(1))

    with pytest.raises(ValueError, match="past the end of the log"):
        replay_shard(event_log, shard=0, shards=SHARDS, policy=POLICY, until_seq=event_log.last_seq() + 1)


def test_snapshot_used_as_base_is_checked(tmp_path: Path):
    """A snapshot of the wrong fingerprint is never a base; the build replays from empty."""
    event_log = MemoryLog()
    event_log.add(workload(2))
    other = Policy(stm_capacity=3)
    wrong = replay_shard(event_log, shard=0, shards=SHARDS, policy=other, until_seq=10).snapshot()
    write_snapshot(snapshot_root(tmp_path), wrong)

    with capture_logs():
        result = take_snapshot(tmp_path, event_log, SHARDS, POLICY, 0)

    assert result.base_seq == 0
