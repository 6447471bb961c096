"""Tests of `Shard`: repeated batches, recovery, the redo record, rebuilds, catch-up.

Every tier is a `MemoryTier`. A crash is simulated by a wrapper that makes
a tier raise from a chosen call on, while the records under it survive, as
Redis or SQLite keep theirs when the process that wrote them dies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

import msgspec
import pytest
from structlog.testing import capture_logs

from events.log import EventLog, LoggedId
from events.types import Event, Forget, Get, Maintain, Store, Value
from handlers.policy import Policy
from handlers.shard import Shard
from handlers.sharding import shard_of
from tiers.base import TIER_NAMES, TierWrites
from tiers.memory import MemoryTier

# Small enough that WORKLOAD moves records through every tier, evicts from
# the cache and from LTM, and expires a record.
POLICY = Policy(
    cache_capacity=2,
    stm_capacity=2,
    stm_idle_ms=100,
    im_capacity=2,
    im_idle_ms=1_000,
    ltm_capacity=2,
    half_life_ms=500,
)

WORKLOAD: list[Event] = [
    Store(
        namespace="a", key="k1", value="v1", importance=0.2, seq=1, ts=1_000, id="e1"
    ),
    Store(namespace="a", key="k2", value={"n": 2}, seq=2, ts=1_000, id="e2"),
    Store(namespace="a", key="k3", value=[3], importance=0.9, seq=3, ts=1_000, id="e3"),
    Get(namespace="a", key="k1", seq=4, ts=1_010, id="e4"),
    Store(namespace="b", key="k1", value="b1", seq=5, ts=1_020, id="e5"),
    Maintain(seq=6, ts=1_200, id="e6"),
    Get(namespace="a", key="k2", seq=7, ts=1_300, id="e7"),
    Store(namespace="a", key="k4", value="v4", ttl_s=5, seq=8, ts=2_500, id="e8"),
    Forget(namespace="b", key="k1", seq=9, ts=2_600, id="e9"),
    Maintain(seq=10, ts=3_000, id="e10"),
    Get(namespace="a", key="k1", seq=11, ts=3_100, id="e11"),
    Maintain(seq=12, ts=12_000, id="e12"),
]
# STM-only writes, then a batch whose writes reach IM and LTM.
FIRST, SECOND = WORKLOAD[:5], WORKLOAD[5:]
LAST_SEQ = WORKLOAD[-1].seq

# The control values `Shard` keeps in STM.
CONTROL_NAMES = ("policy", "im_wm", "ltm_wm", "redo")


class ListLog:
    """An `EventLog` kept in a list, read in small batches to exercise paging."""

    def __init__(self, read_batch: int = 3) -> None:
        self.events: list[Event] = []
        self.ids: dict[str, LoggedId] = {}
        self.read_batch = read_batch

    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        return [self.ids.get(event_id) for event_id in ids]

    def append(self, events: Sequence[Event], body_hashes: Sequence[int]) -> None:
        for event, body_hash in zip(events, body_hashes, strict=True):
            if event.seq != self.last_seq() + 1:
                raise ValueError(f"seq {event.seq} does not follow {self.last_seq()}")
            self.events.append(event)
            self.ids[event.id] = LoggedId(event.seq, body_hash)

    def read(self, after_seq: int, limit: int) -> list[Event]:
        return [event for event in self.events if event.seq > after_seq][:limit]

    def iter_from(
        self, after_seq: int, until_seq: int | None = None
    ) -> Iterator[list[Event]]:
        position = after_seq
        while until_seq is None or position < until_seq:
            limit = self.read_batch
            if until_seq is not None:
                limit = min(limit, until_seq - position)
            batch = self.read(position, limit)
            if not batch:
                return
            position = batch[-1].seq
            yield batch


class TierDown(Exception):
    """A tier call failed, as a lost connection or a killed process makes it."""


class FaultyTier:
    """A tier wrapper that raises `TierDown` on chosen calls and counts every call."""

    def __init__(self, inner: MemoryTier) -> None:
        self.inner = inner
        self.name = inner.name
        self.shard = inner.shard
        self.calls: Counter[str] = Counter()
        self.dead = False
        self._crash_on: str | None = None
        self._failures: Counter[str] = Counter()

    def crash_on(self, method: str) -> None:
        """Die at the next call of `method`: that call and every later one raise."""
        self._crash_on = method

    def fail_next(self, method: str, times: int = 1) -> None:
        """Make the next `times` calls of `method` raise; later calls succeed."""
        self._failures[method] = times

    def __getattr__(self, attribute: str):
        target = getattr(self.inner, attribute)

        def call(*args, **kwargs):
            self.calls[attribute] += 1
            if attribute == self._crash_on:
                self.dead = True
            if self.dead:
                raise TierDown(f"{self.name} is down")
            if self._failures[attribute] > 0:
                self._failures[attribute] -= 1
                raise TierDown(f"{self.name}.{attribute} failed")
            return target(*args, **kwargs)

        return call


def make_tiers(shard: int = 0) -> dict[str, MemoryTier]:
    return {name: MemoryTier(name, shard) for name in TIER_NAMES}


STARTED: list[Shard] = []


@pytest.fixture(autouse=True)
def close_started_shards():
    """Stop the breaker retries of shards left paused by a test."""
    yield
    while STARTED:
        STARTED.pop()._closed.set()


def start(
    tiers, policy: Policy = POLICY, event_log=None, shard: int = 0, shards: int = 1
) -> Shard:
    """Build a shard on `tiers` and recover it, as its actor does on start."""
    built = Shard(shard, shards, tiers, policy, event_log)
    STARTED.append(built)
    built.recover()
    return built


def feed(shard: Shard, event_log: ListLog, events: list[Event]):
    """Log a batch, then apply it, in the router's order."""
    event_log.append(events, [0] * len(events))
    return shard.apply(events)


def copy_tiers(tiers: dict[str, MemoryTier]) -> dict[str, MemoryTier]:
    """Return new memory tiers with the same records, watermarks and control values."""
    copies = make_tiers()
    for name in TIER_NAMES:
        control = {entry: tiers[name].control(entry) for entry in CONTROL_NAMES}
        records = TierWrites(puts=list(tiers[name].records()))
        copies[name].commit(records, tiers[name].watermark(), control)
    return copies


def uninterrupted(events: list[Event] = WORKLOAD, policy: Policy = POLICY):
    """Return the digests of a fresh shard that applied `events` in one batch."""
    shard = start(make_tiers(), policy)
    shard.apply(events)
    return shard.digests()


def test_list_log_is_event_log():
    assert isinstance(ListLog(), EventLog)


def test_workload_reaches_every_tier():
    """A guard for the tests below: SECOND writes to IM and LTM."""
    shard = start(make_tiers())
    shard.apply(FIRST)
    writes, _ = shard.state.apply_batch(SECOND)

    assert writes["im"]
    assert writes["ltm"]
    assert {move.reason for move in shard.state.moves} >= {
        "idle",
        "capacity",
        "evicted",
        "expired",
    }


def test_shard_requires_every_tier():
    tiers = make_tiers()
    del tiers["im"]

    with pytest.raises(ValueError, match=r"missing tiers \['im'\]"):
        Shard(0, 1, tiers, POLICY)


# ----------------------------------------------------------------- repeats


def test_apply_repeated_batch_is_noop():
    tiers = {name: FaultyTier(tier) for name, tier in make_tiers().items()}
    shard = start(tiers)
    shard.apply(FIRST)
    shard.apply(SECOND)
    digests, watermark = shard.digests(), shard.watermark
    commits = {name: tier.calls["commit"] for name, tier in tiers.items()}

    replies = shard.apply(SECOND)

    assert shard.digests() == digests
    assert shard.watermark == watermark
    assert {name: tier.calls["commit"] for name, tier in tiers.items()} == commits
    assert [reply.id for reply in replies] == ["e7", "e11"]


def test_apply_repeated_get_records_no_access():
    shard = start(make_tiers())
    batch = [
        Store(namespace="a", key="k", value="v", seq=1, ts=1_000, id="e1"),
        Get(namespace="a", key="k", seq=2, ts=2_000, id="e2"),
    ]
    first = shard.apply(batch)
    digests = shard.digests()

    again = shard.apply(batch)

    assert first == [Value(id="e2", seq=2, key="k", value="v", tier="cache")]
    assert again == first
    assert shard.digests() == digests
    assert shard.tiers["stm"].get("a", "k").meta.access_count == 1
    assert shard.tiers["stm"].get("a", "k").meta.accessed_ts == 2_000


def test_apply_overlapping_batch_applies_new_events():
    shard = start(make_tiers())
    shard.apply(WORKLOAD[:6])

    shard.apply(WORKLOAD[3:])

    assert shard.watermark == LAST_SEQ
    assert shard.digests() == uninterrupted()


def test_apply_batch_split_matches_one_batch():
    shard = start(make_tiers())
    for event in WORKLOAD:
        shard.apply([event])

    assert shard.digests() == uninterrupted()


# ----------------------------------------------------------------- recovery


def test_recover_reloads_identical_state():
    tiers = make_tiers()
    live = start(tiers)
    live.apply(FIRST)
    live.apply(SECOND)

    restarted = Shard(0, 1, tiers, POLICY)
    report = restarted.recover()

    assert restarted.digests() == live.digests()
    assert restarted.state.cache_keys() == live.state.cache_keys()
    assert restarted.watermark == LAST_SEQ
    assert report.loaded_watermark == LAST_SEQ
    assert report.rebuilt is False
    assert report.redo_finished is False
    assert report.replayed == 0


def test_recover_then_apply_matches_live():
    """The reloaded in-memory state, not just the tiers, equals the live one."""
    tiers = make_tiers()
    live = start(tiers, POLICY)
    live.apply(WORKLOAD[:8])
    restarted = Shard(0, 1, copy_tiers(tiers), POLICY)
    restarted.recover()

    live_replies = live.apply(WORKLOAD[8:])
    restarted_replies = restarted.apply(WORKLOAD[8:])

    assert restarted_replies == live_replies
    assert restarted.digests() == live.digests()


def test_recover_catches_up_from_log():
    event_log = ListLog()
    tiers = make_tiers()
    shard = start(tiers, event_log=event_log)
    feed(shard, event_log, FIRST)
    event_log.append(SECOND, [0] * len(SECOND))  # logged, never applied

    restarted = Shard(0, 1, tiers, POLICY, event_log)
    report = restarted.recover()

    assert report.loaded_watermark == FIRST[-1].seq
    assert report.replayed == len(SECOND)
    assert report.watermark == LAST_SEQ
    assert restarted.digests() == uninterrupted()


# ----------------------------------------------------------------- redo


@pytest.mark.parametrize(
    ("tier", "method"),
    [("im", "commit"), ("ltm", "commit"), ("stm", "commit")],
    ids=["before-im", "before-ltm", "before-stm"],
)
def test_recover_finishes_redo(tier, method):
    """A crash after the redo record is written is finished from it, without a log."""
    inner = make_tiers()
    tiers = {name: FaultyTier(memory) for name, memory in inner.items()}
    shard = start(tiers)
    shard.apply(FIRST)
    tiers[tier].crash_on(method)

    shard.apply(SECOND)
    assert shard.paused

    assert inner["stm"].control("redo") is not None
    assert inner["stm"].watermark() == FIRST[-1].seq
    shard.close()
    restarted = Shard(0, 1, inner, POLICY)
    report = restarted.recover()
    assert report.redo_finished is True
    assert report.rebuilt is False
    assert report.watermark == LAST_SEQ
    assert inner["stm"].control("redo") is None
    assert restarted.digests() == uninterrupted()


def test_recover_redo_skips_committed_tiers():
    """A crash just before the STM commit leaves only STM for the redo to commit."""
    inner = make_tiers()
    tiers = {name: FaultyTier(memory) for name, memory in inner.items()}
    shard = start(tiers)
    shard.apply(FIRST)
    tiers["stm"].crash_on("commit")
    shard.apply(SECOND)
    assert shard.paused
    assert inner["im"].watermark() == LAST_SEQ
    assert inner["ltm"].watermark() == LAST_SEQ

    watched = {name: FaultyTier(memory) for name, memory in inner.items()}
    Shard(0, 1, watched, POLICY).recover()

    assert watched["im"].calls["commit"] == 0
    assert watched["ltm"].calls["commit"] == 0
    assert watched["stm"].calls["commit"] == 1


def test_recover_after_crash_before_redo():
    """A crash before the redo record is written leaves the log to replay the batch."""
    event_log = ListLog()
    inner = make_tiers()
    tiers = {name: FaultyTier(memory) for name, memory in inner.items()}
    shard = start(tiers, event_log=event_log)
    feed(shard, event_log, FIRST)
    tiers["stm"].crash_on("put_control")

    feed(shard, event_log, SECOND)
    assert shard.paused

    assert inner["stm"].control("redo") is None
    assert inner["im"].watermark() == 0
    shard.close()
    restarted = Shard(0, 1, inner, POLICY, event_log)
    report = restarted.recover()
    assert report.redo_finished is False
    assert report.rebuilt is False
    assert report.replayed == len(SECOND)
    assert restarted.digests() == uninterrupted()


def test_apply_retry_after_failed_commit():
    """A batch resent after its STM commit failed ends as if it never failed."""
    tiers = {name: FaultyTier(memory) for name, memory in make_tiers().items()}
    shard = start(tiers)
    shard.apply(FIRST)
    tiers["stm"].fail_next("commit")

    shard.apply(SECOND)
    assert shard.paused
    shard.apply(SECOND)

    assert shard.watermark == LAST_SEQ
    assert shard.digests() == uninterrupted()


def test_apply_retry_after_failed_reload():
    """When the reload after a failure fails too, the next apply reloads first."""
    tiers = {name: FaultyTier(memory) for name, memory in make_tiers().items()}
    shard = start(tiers)
    shard.apply(FIRST)
    tiers["stm"].fail_next("commit", times=2)

    with capture_logs() as logs:
        shard.apply(SECOND)
    assert shard.paused
    shard.apply(SECOND)

    assert "shard.reload.failed" in [entry["event"] for entry in logs]
    assert shard.watermark == LAST_SEQ
    assert shard.digests() == uninterrupted()


def test_apply_after_failure_keeps_expected_watermarks():
    """After the reload finishes a failed commit, a restart finds no mismatch."""
    inner = make_tiers()
    tiers = {name: FaultyTier(memory) for name, memory in inner.items()}
    shard = start(tiers)
    shard.apply(FIRST)
    tiers["stm"].fail_next("commit")
    shard.apply(SECOND)
    assert shard.paused
    follow_up = [
        Store(namespace="a", key="k9", value=9, seq=LAST_SEQ + 1, ts=12_000, id="e13")
    ]

    shard.apply(follow_up)
    shard.close()
    restarted = Shard(0, 1, inner, POLICY)
    report = restarted.recover()

    assert report.rebuilt is False
    assert restarted.digests() == uninterrupted(WORKLOAD + follow_up)


# ----------------------------------------------------------------- rebuilds


def _lose_im(tiers: dict[str, MemoryTier], watermark: int) -> None:
    tiers["im"].clear()


def _advance_ltm(tiers: dict[str, MemoryTier], watermark: int) -> None:
    tiers["ltm"].commit(TierWrites(), watermark + 5)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_lose_im, "im watermark is 0, STM expects 12"),
        (_advance_ltm, "ltm watermark is 17, STM expects 12"),
    ],
    ids=["im-lost", "ltm-ahead"],
)
def test_recover_rebuilds_on_watermark_mismatch(damage, reason):
    event_log = ListLog()
    tiers = make_tiers()
    shard = start(tiers, event_log=event_log)
    feed(shard, event_log, FIRST)
    feed(shard, event_log, SECOND)
    damage(tiers, shard.watermark)

    with capture_logs() as logs:
        restarted = Shard(0, 1, tiers, POLICY, event_log)
        report = restarted.recover()

    assert report.rebuilt is True
    assert report.reason == reason
    assert report.replayed == len(WORKLOAD)
    assert restarted.digests() == uninterrupted()
    started = [entry for entry in logs if entry["event"] == "shard.rebuild.started"]
    assert [entry["reason"] for entry in started] == [reason]


def test_recover_rebuilds_on_policy_change():
    event_log = ListLog()
    tiers = make_tiers()
    shard = start(tiers, event_log=event_log)
    feed(shard, event_log, WORKLOAD)
    changed = msgspec.structs.replace(POLICY, stm_capacity=1, im_capacity=1)

    with capture_logs() as logs:
        restarted = Shard(0, 1, tiers, changed, event_log)
        report = restarted.recover()

    assert report.rebuilt is True
    assert report.reason.startswith("policy or shard count changed")
    assert "shard.rebuild.started" in [entry["event"] for entry in logs]
    assert report.replayed == len(WORKLOAD)
    assert restarted.digests() == uninterrupted(policy=changed)
    assert restarted.digests() != uninterrupted(policy=POLICY)


def test_recover_rebuilds_on_shard_count_change():
    event_log = ListLog()
    tiers = make_tiers()
    shard = start(tiers, event_log=event_log)
    feed(shard, event_log, WORKLOAD)

    restarted = Shard(0, 2, tiers, POLICY, event_log)
    report = restarted.recover()

    assert report.rebuilt is True
    assert report.reason.startswith("policy or shard count changed")
    fresh = Shard(0, 2, make_tiers(), POLICY, event_log)
    fresh.recover()
    assert restarted.digests() == fresh.digests()


def test_recover_same_policy_does_not_rebuild():
    event_log = ListLog()
    tiers = make_tiers()
    shard = start(tiers, event_log=event_log)
    feed(shard, event_log, WORKLOAD)

    report = Shard(
        0, 1, tiers, Policy(**msgspec.structs.asdict(POLICY)), event_log
    ).recover()

    assert report.rebuilt is False
    assert report.reason is None


# ----------------------------------------------------------------- catch-up


def _namespace_on(shard: int, shards: int) -> str:
    return next(f"ns-{i}" for i in range(1_000) if shard_of(f"ns-{i}", shards) == shard)


MINE, THEIRS = _namespace_on(0, 2), _namespace_on(1, 2)

TWO_SHARD_LOG: list[Event] = [
    Store(namespace=MINE, key="k1", value=1, seq=1, ts=1_000, id="e1"),
    Store(namespace=THEIRS, key="k1", value=1, seq=2, ts=1_000, id="e2"),
    Get(namespace=THEIRS, key="k1", seq=3, ts=1_010, id="e3"),
    Store(namespace=MINE, key="k2", value=2, seq=4, ts=1_020, id="e4"),
    Maintain(seq=5, ts=1_500, id="e5"),
    Store(namespace=THEIRS, key="k2", value=2, seq=6, ts=1_600, id="e6"),
    Maintain(namespace=THEIRS, seq=7, ts=1_700, id="e7"),
    Get(namespace=MINE, key="k2", seq=8, ts=1_800, id="e8"),
]


def _two_shard_log() -> ListLog:
    event_log = ListLog()
    event_log.append(TWO_SHARD_LOG, [0] * len(TWO_SHARD_LOG))
    return event_log


@pytest.mark.parametrize(
    ("shard", "own_seqs"),
    [(0, [1, 4, 5, 7, 8]), (1, [2, 3, 5, 6, 7])],
    ids=["shard-0", "shard-1"],
)
def test_catch_up_applies_own_events_and_maintain(shard, own_seqs):
    caught_up = start(make_tiers(shard), shard=shard, shards=2)
    caught_up.log = _two_shard_log()

    applied = caught_up.catch_up()

    assert applied == len(own_seqs)
    assert caught_up.watermark == own_seqs[-1]
    direct = start(make_tiers(shard), shard=shard, shards=2)
    direct.apply([event for event in TWO_SHARD_LOG if event.seq in own_seqs])
    assert caught_up.digests() == direct.digests()


def test_catch_up_keeps_other_namespaces_out():
    shard = start(make_tiers(), shards=2)
    shard.log = _two_shard_log()

    shard.catch_up()

    namespaces = {
        record.namespace
        for name in TIER_NAMES
        for record in shard.tiers[name].records()
    }
    assert namespaces == {MINE}
    assert shard.state.tier_of(MINE, "k1") == "im"  # moved by the unnamed Maintain


def test_catch_up_after_live_apply():
    shard = start(make_tiers(), shards=2)
    shard.apply([TWO_SHARD_LOG[0]])
    shard.log = _two_shard_log()

    applied = shard.catch_up()

    assert applied == 4
    assert shard.watermark == 8


def test_catch_up_without_log_applies_nothing():
    shard = start(make_tiers())

    assert shard.catch_up() == 0
    assert shard.watermark == 0
