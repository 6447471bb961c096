"""Tests of `Shard` with tier pools: the IM and LTM commits run in parallel and stay crash-safe.

The workload, the crash wrapper and the reference run come from
`test_handlers_shard`, so each crash case there also runs here, with pools.
"""

from __future__ import annotations

import threading

import pytest

from handlers.shard import Shard
from tiers.memory import MemoryTier
from tiers.pools import PoolClosedError, PoolSettings, TierPools, TierPoolSettings
from test_handlers_shard import (
    FIRST,
    LAST_SEQ,
    POLICY,
    SECOND,
    WORKLOAD,
    FaultyTier,
    TierDown,
    make_tiers,
    uninterrupted,
)

DEADLINE_S = 10.0

STARTED: list[Shard] = []


@pytest.fixture(autouse=True)
def close_started_shards():
    """Close every shard a test started, which shuts down its pools."""
    yield
    while STARTED:
        STARTED.pop().close()


def start_pooled(tiers, pools: TierPools | None = None) -> Shard:
    shard = Shard(0, 1, tiers, POLICY, pools=pools or TierPools())
    STARTED.append(shard)
    shard.recover()
    return shard


class MeetingTier(MemoryTier):
    """A memory tier whose commit of a batch waits at a barrier shared with another tier."""

    def __init__(self, name: str, barrier: threading.Barrier) -> None:
        super().__init__(name, 0)
        self.barrier = barrier
        self.met = False

    def commit(self, writes, watermark, control=None) -> None:
        if writes:
            # Raises BrokenBarrierError at the deadline when the other tier's
            # commit does not run at the same time.
            self.barrier.wait(DEADLINE_S)
            self.met = True
        super().commit(writes, watermark, control)


def test_pooled_commit_runs_tiers_in_parallel():
    barrier = threading.Barrier(2)
    tiers = {
        "stm": MemoryTier("stm", 0),
        "im": MeetingTier("im", barrier),
        "ltm": MeetingTier("ltm", barrier),
    }
    shard = start_pooled(tiers)
    shard.apply(FIRST)

    shard.apply(SECOND)

    assert not shard.paused
    assert tiers["im"].met
    assert tiers["ltm"].met
    assert shard.digests() == uninterrupted()


def test_pooled_commit_matches_inline():
    shard = start_pooled(make_tiers())

    shard.apply(FIRST)
    shard.apply(SECOND)

    assert shard.watermark == LAST_SEQ
    assert shard.digests() == uninterrupted()
    stats = {item.name: item for item in shard.pool_stats()}
    assert stats["im"].completed >= 1
    assert stats["ltm"].completed >= 1
    assert stats["stm"].submitted == 0


@pytest.mark.parametrize("tier", ["im", "ltm", "stm"], ids=["before-im", "before-ltm", "before-stm"])
def test_pooled_crash_finishes_redo(tier):
    """A tier that dies during a pooled commit leaves a redo record that recovery finishes."""
    inner = make_tiers()
    tiers = {name: FaultyTier(memory) for name, memory in inner.items()}
    shard = start_pooled(tiers)
    shard.apply(FIRST)
    tiers[tier].crash_on("commit")

    shard.apply(SECOND)
    assert shard.paused
    assert inner["stm"].control("redo") is not None
    assert inner["stm"].watermark() == FIRST[-1].seq
    shard.close()

    restarted = Shard(0, 1, inner, POLICY, pools=TierPools())
    STARTED.append(restarted)
    report = restarted.recover()
    assert report.redo_finished is True
    assert report.rebuilt is False
    assert report.watermark == LAST_SEQ
    assert inner["stm"].control("redo") is None
    assert restarted.digests() == uninterrupted()


def test_pooled_crash_in_im_commits_ltm():
    """The LTM commit runs beside the failed IM one, so only IM is left for the redo."""
    inner = make_tiers()
    tiers = {name: FaultyTier(memory) for name, memory in inner.items()}
    shard = start_pooled(tiers)
    shard.apply(FIRST)
    tiers["im"].crash_on("commit")

    shard.apply(SECOND)

    assert shard.paused
    assert inner["ltm"].watermark() == LAST_SEQ
    assert inner["im"].watermark() < LAST_SEQ


class Recorder:
    """A shared, ordered record of tier calls from several threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.im_failed = threading.Event()
        self.stm_called_after_failure = threading.Event()

    def add(self, call: str) -> None:
        with self.lock:
            self.calls.append(call)


class WatchedStm(MemoryTier):
    """STM that records the calls it gets once the IM commit has failed."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__("stm", 0)
        self.recorder = recorder

    def control(self, name: str):
        if self.recorder.im_failed.is_set():
            self.recorder.add("stm.control")
            self.recorder.stm_called_after_failure.set()
        return super().control(name)


class FailingIm(MemoryTier):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__("im", 0)
        self.recorder = recorder
        self.fail = False

    def commit(self, writes, watermark, control=None) -> None:
        if self.fail and writes:
            self.recorder.add("im.failed")
            self.recorder.im_failed.set()
            raise TierDown("im is down")
        super().commit(writes, watermark, control)


class SlowLtm(MemoryTier):
    """LTM whose commit, after IM failed, waits to see whether the shard touches STM meanwhile."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__("ltm", 0)
        self.recorder = recorder
        self.watch = False

    def commit(self, writes, watermark, control=None) -> None:
        if self.watch and writes:
            assert self.recorder.im_failed.wait(DEADLINE_S)
            # A shard that waits for this commit does not read STM meanwhile,
            # so this wait runs to its deadline. A shard that does not wait
            # reads STM's redo record, which ends this wait early.
            self.recorder.stm_called_after_failure.wait(0.5)
            self.recorder.add("ltm.committed")
        super().commit(writes, watermark, control)


def test_failed_commit_waits_for_other_tier():
    """After IM fails, the shard reloads only once the LTM commit beside it has finished."""
    recorder = Recorder()
    im, ltm = FailingIm(recorder), SlowLtm(recorder)
    tiers = {"stm": WatchedStm(recorder), "im": im, "ltm": ltm}
    shard = start_pooled(tiers)
    shard.apply(FIRST)
    im.fail = True
    ltm.watch = True

    shard.apply(SECOND)

    assert shard.paused
    assert recorder.calls[:3] == ["im.failed", "ltm.committed", "stm.control"]


def test_closed_pools_pause_shard():
    """A commit whose pool is shut down fails like a tier, and the reload finishes its redo."""
    tiers = make_tiers()
    tier_pools = TierPools()
    shard = start_pooled(tiers, tier_pools)
    shard.apply(FIRST)
    tier_pools.shutdown()

    shard.apply(SECOND)

    assert shard.paused
    assert tiers["stm"].control("redo") is None
    assert tiers["stm"].watermark() == LAST_SEQ
    assert shard.digests() == uninterrupted()


def test_close_shuts_pools_down():
    sizes = PoolSettings(min_workers=1, max_workers=1)
    tier_pools = TierPools(TierPoolSettings(stm=sizes, im=sizes, ltm=sizes))
    shard = start_pooled(make_tiers(), tier_pools)
    shard.apply(WORKLOAD)

    shard.close()

    assert [item.workers for item in shard.pool_stats()] == [0, 0, 0]
    with pytest.raises(PoolClosedError):
        tier_pools["im"].submit(print)


def test_shard_without_pools_has_no_stats():
    shard = Shard(0, 1, make_tiers(), POLICY)
    STARTED.append(shard)

    assert shard.pool_stats() == []
