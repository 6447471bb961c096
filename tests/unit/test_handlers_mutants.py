"""Checks that mutation testing of `handlers/` showed missing.

Each test pins a behaviour that a surviving mutant changed while every other
unit test still passed. The areas are conditional writes, effects, replies
to resends, the circuit breaker (retries, degraded replies, log lines),
recovery and snapshot loads, the retention score and shard placement.
docs/testing.md lists the mutants and the command that runs them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash
from structlog.testing import capture_logs

from events.errors import ErrorCode
from events.types import Ack, Conflict, Forget, Get, Maintain, NotFound, Store, Value
from handlers.effects import Effect
from handlers.policy import Policy, retention
from handlers.shard import Shard
from handlers.sharding import shard_of
from handlers.state import ShardState, StateError
from tiermem.check.targets import MemoryEffectLog, MemoryEventLog
from tiermem.servers import wait_until
from tiers.base import TIER_NAMES, Meta, TierWrites
from tiers.errors import StorageError
from tiers.memory import MemoryTier
from tiers.snapshot import snapshot_from_tiers

DEADLINE_S = 10.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    wait_until(condition, timeout=DEADLINE_S, interval=0.005, what=what)


def memory_tiers() -> dict[str, MemoryTier]:
    return {name: MemoryTier(name, 0) for name in TIER_NAMES}


# ----------------------------------------------------------------- versions


def apply(state: ShardState, *events) -> list:
    """Apply one batch, commit its writes to the tiers and return the replies."""
    writes, replies = state.apply_batch(events)
    for name in TIER_NAMES:
        state.tiers[name].commit(writes[name], state.watermark)
    return replies


def store(seq: int, value: object, **fields) -> Store:
    return Store(
        namespace="a",
        key="k",
        value=value,
        seq=seq,
        ts=seq * 10,
        id=f"e{seq}",
        **fields,
    )


def test_entry_count_counts_every_namespace():
    state = ShardState(0, Policy(), memory_tiers())
    apply(
        state,
        store(1, "v1"),
        Store(namespace="b", key="k", value=1, seq=2, ts=20, id="e2"),
        Store(namespace="b", key="k2", value=2, seq=3, ts=30, id="e3"),
    )

    assert state.entry_count() == 3


def test_conditional_store_matches_current_version():
    state = ShardState(0, Policy(), memory_tiers())
    apply(state, store(1, "v1"), store(2, "v2"))

    replies = apply(state, store(3, "v3", expected_version=2))

    assert replies == [Ack(id="e3", seq=3)]
    record = state.tiers["stm"].get("a", "k")
    assert record.value == "v3"
    assert record.meta.version == 3


def test_conditional_store_stale_version_conflicts():
    state = ShardState(0, Policy(), memory_tiers())
    apply(state, store(1, "v1"), store(2, "v2"))

    replies = apply(state, store(3, "v3", expected_version=1))

    assert replies == [
        Conflict(id="e3", seq=3, key="k", expected_version=1, actual_version=2)
    ]
    assert state.tiers["stm"].get("a", "k").value == "v2"


def test_conditional_store_zero_on_existing_conflicts():
    state = ShardState(0, Policy(), memory_tiers())
    apply(state, store(1, "v1"))

    replies = apply(state, store(2, "v2", expected_version=0))

    assert replies == [
        Conflict(id="e2", seq=2, key="k", expected_version=0, actual_version=1)
    ]


def test_conditional_store_of_new_key_expects_zero():
    state = ShardState(0, Policy(), memory_tiers())

    replies = apply(state, store(1, "v1", expected_version=0))

    assert replies == [Ack(id="e1", seq=1)]
    assert state.tiers["stm"].get("a", "k").meta.version == 1


def test_conditional_store_after_expiry_expects_zero():
    state = ShardState(0, Policy(), memory_tiers())
    apply(state, store(1, "v1", ttl_s=1), store(2, "v2", ttl_s=1))

    # ts 2,000 is past the second Store's expiry (20 + 1,000 ms).
    replies = apply(
        state,
        Store(
            namespace="a",
            key="k",
            value="v3",
            expected_version=0,
            seq=3,
            ts=2_000,
            id="e3",
        ),
    )

    assert replies == [Ack(id="e3", seq=3)]
    assert state.tiers["stm"].get("a", "k").meta.version == 1


def test_missing_tier_record_names_key():
    state = ShardState(0, Policy(cache_capacity=1), memory_tiers())
    apply(
        state,
        store(1, "v1"),
        Store(namespace="a", key="k2", value=2, seq=2, ts=20, id="e2"),
    )
    # Lose the record behind the state's back, as a damaged tier would.
    state.tiers["stm"].commit(TierWrites(deletes=[("a", "k")]), state.watermark)

    with pytest.raises(StateError) as caught:
        state.apply_batch([Get(namespace="a", key="k", seq=3, ts=30, id="e3")])

    assert str(caught.value) == "stm is missing a/k"


def test_event_without_ts_rejected():
    state = ShardState(0, Policy(), memory_tiers())

    with pytest.raises(StateError) as caught:
        state.apply_batch([Store(namespace="a", key="k", value=1, seq=1, id="e1")])

    assert "must carry seq and ts" in str(caught.value)


def test_idle_move_effect_names_tiers():
    state = ShardState(0, Policy(stm_idle_ms=1, im_idle_ms=10**12), memory_tiers())
    apply(state, store(1, "v1"))

    apply(state, Maintain(seq=2, ts=100, id="e2"))

    assert state.effects == [
        Effect(2, "move", "a", "k", tier="stm", target="im", reason="idle"),
    ]


def test_get_effect_names_serving_tier():
    state = ShardState(0, Policy(), memory_tiers())
    apply(state, store(1, "v1"))

    apply(state, Get(namespace="a", key="k", seq=2, ts=20, id="e2"))

    assert state.effects == [
        Effect(2, "read", "a", "k", tier="cache", client="e2"),
    ]


def test_conflict_effect_records_versions():
    state = ShardState(0, Policy(), memory_tiers())
    apply(state, store(1, "v1"))

    apply(state, store(2, "v2", expected_version=4))

    assert state.effects == [
        Effect(2, "conflict", "a", "k", reason="4:1", client="e2"),
    ]


def test_conditional_forget_matches_current_version():
    state = ShardState(0, Policy(), memory_tiers())
    apply(state, store(1, "v1"))

    stale = apply(
        state, Forget(namespace="a", key="k", expected_version=2, seq=2, ts=20, id="e2")
    )
    current = apply(
        state, Forget(namespace="a", key="k", expected_version=1, seq=3, ts=30, id="e3")
    )

    assert stale == [
        Conflict(id="e2", seq=2, key="k", expected_version=2, actual_version=1)
    ]
    assert current == [Ack(id="e3", seq=3)]
    assert state.tier_of("a", "k") is None


def test_maintain_delete_effects_name_reason():
    state = ShardState(
        0, Policy(ltm_capacity=1, stm_idle_ms=1, im_idle_ms=1), memory_tiers()
    )
    apply(
        state,
        store(1, "v1", ttl_s=1),
        Store(namespace="a", key="k2", value=2, seq=2, ts=20, id="e2"),
        Store(namespace="a", key="k3", value=3, importance=0.9, seq=3, ts=30, id="e3"),
    )

    apply(state, Maintain(seq=4, ts=5_000, id="e4"))

    deletes = [effect for effect in state.effects if effect.kind == "delete"]
    assert deletes == [
        Effect(4, "delete", "a", "k", tier="stm", reason="expired"),
        Effect(4, "delete", "a", "k2", tier="ltm", reason="evicted"),
    ]


# ----------------------------------------------------------------- resends


def conditional_shard() -> Shard:
    shard = Shard(0, 1, memory_tiers(), Policy(), None, MemoryEffectLog())
    shard.recover()
    return shard


def test_resent_conflict_answered_as_conflict():
    shard = conditional_shard()
    shard.apply([store(1, "v1")])
    stale = store(2, "v2", expected_version=5)

    first = shard.apply([stale])
    resent = shard.apply([stale])

    conflict = Conflict(id="e2", seq=2, key="k", expected_version=5, actual_version=1)
    assert first == [conflict]
    assert resent == [conflict]


def test_resent_applied_write_answered_as_duplicate():
    shard = conditional_shard()
    applied = store(1, "v1", expected_version=0)
    shard.apply([applied])
    # A later conditional write of the same key conflicts, and its effect must
    # not be taken for the outcome of the earlier one.
    shard.apply([store(2, "v2", expected_version=7)])

    resent = shard.apply([applied])

    assert resent == [Ack(id="e1", seq=1, duplicate=True)]


def test_resent_get_after_expiry_not_found():
    shard = conditional_shard()
    shard.apply([store(1, "v1", ttl_s=1)])
    late_get = Get(namespace="a", key="k", seq=2, ts=2_000, id="e2")

    first = shard.apply([late_get])
    resent = shard.apply([late_get])

    assert first == [NotFound(id="e2", seq=2, key="k")]
    assert resent == [NotFound(id="e2", seq=2, key="k")]


def test_resent_get_of_uncached_key_reads_tier():
    shard = Shard(0, 1, memory_tiers(), Policy(cache_capacity=1), None)
    shard.recover()
    shard.apply(
        [store(1, "v1"), Store(namespace="a", key="k2", value=2, seq=2, ts=20, id="e2")]
    )
    get = Get(namespace="a", key="k", seq=3, ts=30, id="e3")
    missing = Get(namespace="a", key="x", seq=4, ts=40, id="e4")
    shard.apply([get, missing])
    # Reading k put it back in the cache; k2 pushes it out again.
    shard.apply([Get(namespace="a", key="k2", seq=5, ts=50, id="e5")])

    resent = shard.apply([get, missing])

    assert resent == [
        Value(id="e3", seq=3, key="k", value="v1", tier="stm", importance=0.5, tags=[]),
        NotFound(id="e4", seq=4, key="x"),
    ]


def test_close_logs_failed_tier():
    class FailingClose(MemoryTier):
        def close(self) -> None:
            raise OSError("disk gone")

    tiers = {**memory_tiers(), "im": FailingClose("im", 0)}
    with capture_logs() as logs:
        shard = Shard(0, 1, tiers, Policy(), None)
        shard.close()

    failed = [entry for entry in logs if entry["event"] == "shard.close.failed"]
    assert len(failed) == 1
    assert failed[0]["tier"] == "im"
    assert failed[0]["error"] == "OSError('disk gone')"
    assert failed[0]["next"] == "closing the other tiers"


# ----------------------------------------------------------------- breaker


class SwitchedTier:
    """A `MemoryTier` wrapper whose calls raise `StorageError` while `down` is set."""

    def __init__(self, inner: MemoryTier) -> None:
        self.inner = inner
        self.name = inner.name
        self.shard = inner.shard
        self.down = False
        self.failures = 0
        self._lock = threading.Lock()

    def __getattr__(self, attribute: str):
        target = getattr(self.inner, attribute)

        def call(*args, **kwargs):
            if self.down:
                with self._lock:
                    self.failures += 1
                raise StorageError(
                    f"{self.name} is down",
                    tier=self.name,
                    shard=self.shard,
                    action=attribute,
                )
            return target(*args, **kwargs)

        return call


class PausedShard:
    """A shard whose STM went down while it applied one logged `Store`."""

    def __init__(self, *, resume_s: float) -> None:
        self.inner = memory_tiers()
        self.stm = SwitchedTier(self.inner["stm"])
        tiers = {**self.inner, "stm": self.stm}
        self.log = MemoryEventLog()
        self.shard = Shard(0, 1, tiers, Policy(), self.log)
        self.shard.resume_initial_s = resume_s
        self.shard.resume_max_s = resume_s
        self.shard.recover()
        self.event = Store(namespace="a", key="k", value="v", seq=1, ts=10, id="e1")
        self.log.append([self.event], [0])
        self.stm.down = True
        self.shard.apply([self.event])

    def close(self) -> None:
        self.shard.close()


@pytest.fixture
def paused_shards():
    started: list[PausedShard] = []

    def make(**options) -> PausedShard:
        started.append(PausedShard(**options))
        return started[-1]

    yield make
    for paused in started:
        paused.close()


def test_breaker_retries_until_tier_returns(paused_shards):
    with capture_logs() as logs:
        paused = paused_shards(resume_s=0.001)
        assert paused.shard.paused

        # The apply failed twice (its commit and its reload), every retry once.
        wait_for(lambda: paused.stm.failures >= 14, "12 failed resumes")
        paused.stm.down = False
        wait_for(lambda: not paused.shard.paused, "the breaker to close")

    assert paused.inner["stm"].get("a", "k").value == "v"
    assert paused.shard.watermark == 1

    failed = [entry for entry in logs if entry["event"] == "shard.apply.failed"]
    assert len(failed) == 1
    assert failed[0]["watermark"] == 0
    reload_failed = [entry for entry in logs if entry["event"] == "shard.reload.failed"]
    assert len(reload_failed) == 1
    assert "stm is down" in reload_failed[0]["error"]

    opened = [entry for entry in logs if entry["event"] == "shard.breaker.opened"]
    assert len(opened) == 1
    assert opened[0]["tier"] == "stm"
    assert opened[0]["shard"] == 0
    assert opened[0]["next"] == (
        "serving degraded reads; applying from the log once the tier answers"
    )
    assert "stm is down" in opened[0]["error"]

    still_open = [
        entry for entry in logs if entry["event"] == "shard.breaker.still_open"
    ]
    attempts = [entry["attempts"] for entry in still_open]
    assert attempts[:2] == [1, 11]
    assert all(count % 10 == 1 for count in attempts)
    assert "stm is down" in still_open[0]["error"]
    assert still_open[0]["next"] == "retrying later"

    closed = [entry for entry in logs if entry["event"] == "shard.breaker.closed"]
    assert len(closed) == 1
    assert closed[0]["replayed"] == 1
    assert closed[0]["rebuilt"] is False
    assert closed[0]["watermark"] == 1
    assert closed[0]["log_level"] == "warning"


def test_paused_shard_replies_degraded(paused_shards):
    paused = paused_shards(resume_s=60.0)
    cached = Get(namespace="a", key="k", seq=2, ts=20, id="e2")
    conditional = store(3, "v3", expected_version=1)
    events = [cached, conditional]
    paused.log.append(events, [0, 0])

    replies = paused.shard.apply(events)

    assert replies[0] == Value(
        id="e2",
        seq=2,
        key="k",
        value="v",
        tier="cache",
        importance=0.5,
        tags=[],
        degraded=True,
    )
    error = replies[1]
    assert error.id == "e3"
    assert error.code == ErrorCode.UNAVAILABLE
    assert error.message.startswith("shard 0 is paused (stm failed: stm is down);")


def test_paused_shard_unreadable_tier_not_found():
    tiers = memory_tiers()
    im = SwitchedTier(tiers["im"])
    shard = Shard(
        0, 1, {**tiers, "im": im}, Policy(cache_capacity=1, stm_idle_ms=1), None
    )
    shard.resume_initial_s = 60.0
    shard.recover()
    shard.apply([store(1, "v1"), Maintain(seq=2, ts=100, id="e2")])
    assert shard.state.tier_of("a", "k") == "im"
    shard.apply([Store(namespace="a", key="k2", value=2, seq=3, ts=110, id="e3")])
    im.down = True
    # A batch that moves k2 to IM fails, so the shard pauses.
    shard.apply([Maintain(seq=4, ts=200, id="e4")])
    assert shard.paused

    replies = shard.apply([Get(namespace="a", key="k", seq=5, ts=210, id="e5")])

    assert replies == [NotFound(id="e5", seq=5, key="k", degraded=True)]
    shard.close()


def test_paused_shard_reports_committed_watermark(paused_shards):
    paused = paused_shards(resume_s=60.0)

    assert paused.shard.paused
    assert paused.inner["stm"].watermark() == 0
    assert paused.shard.watermark == 0


def test_breaker_waits_before_first_retry(paused_shards):
    paused = paused_shards(resume_s=60.0)
    failures = paused.stm.failures

    # No retry is due for 60 s, so the count must not move in this window.
    with pytest.raises(TimeoutError):
        wait_until(
            lambda: paused.stm.failures > failures,
            timeout=0.3,
            interval=0.01,
            what="a retry",
        )
    assert paused.shard.paused


def test_breaker_resume_resets_failed_count(paused_shards):
    paused = paused_shards(resume_s=0.001)
    wait_for(lambda: paused.stm.failures >= 4, "2 failed resumes")
    paused.stm.down = False
    wait_for(lambda: not paused.shard.paused, "the breaker to close")

    with capture_logs() as logs:
        paused.stm.down = True
        second = Store(namespace="a", key="k2", value="v2", seq=2, ts=20, id="e2")
        paused.log.append([second], [0])
        paused.shard.apply([second])
        wait_for(
            lambda: any(e["event"] == "shard.breaker.still_open" for e in logs),
            "a failed resume",
        )
        paused.stm.down = False
        wait_for(lambda: not paused.shard.paused, "the breaker to close again")

    first = next(e for e in logs if e["event"] == "shard.breaker.still_open")
    assert first["attempts"] == 1


def test_rebuild_closes_breaker(paused_shards):
    paused = paused_shards(resume_s=60.0)
    paused.stm.down = False

    report = paused.shard.rebuild()

    assert not paused.shard.paused
    assert report.rebuilt
    assert report.watermark == 1
    replies = paused.shard.apply([Get(namespace="a", key="k", seq=2, ts=20, id="e2")])
    assert replies == [
        Value(id="e2", seq=2, key="k", value="v", tier="cache", importance=0.5, tags=[])
    ]


# ----------------------------------------------------------------- snapshots


def test_rebuild_log_level_follows_reason():
    log = MemoryEventLog()
    log.append([store(1, "v1")], [0])
    with capture_logs() as logs:
        # Empty tiers under a log with events: recovery finds the fault itself.
        shard = Shard(0, 1, memory_tiers(), Policy(), log)
        shard.recover()
        shard.rebuild()

    started = [entry for entry in logs if entry["event"] == "shard.rebuild.started"]
    assert [entry["log_level"] for entry in started] == ["error", "warning"]
    assert [entry["reason"] for entry in started] == [
        "the tiers are empty but the log holds events up to seq 1",
        "rebuild requested",
    ]
    assert all(entry["next"] == "replaying the whole log" for entry in started)


class ResetCountingEffectLog(MemoryEffectLog):
    """A `MemoryEffectLog` that counts `reset` calls per shard."""

    def __init__(self) -> None:
        super().__init__()
        self.resets: list[int] = []

    def reset(self, shard: int) -> None:
        self.resets.append(shard)
        self.entries.pop(shard, None)


def test_effects_reset_only_on_policy_change():
    log = MemoryEventLog()
    log.append([store(1, "v1")], [0])
    effects = ResetCountingEffectLog()
    tiers = memory_tiers()
    with capture_logs() as logs:
        Shard(0, 1, tiers, Policy(), log, effects).recover()
        assert effects.resets == []

        Shard(0, 1, tiers, Policy(stm_capacity=3), log, effects).recover()

    assert effects.resets == [0]
    assert "shard.effects.reset" in [entry["event"] for entry in logs]


def test_empty_log_and_tiers_not_rebuilt():
    with capture_logs() as logs:
        report = Shard(0, 1, memory_tiers(), Policy(), MemoryEventLog()).recover()

    assert not report.rebuilt
    recovered = [entry for entry in logs if entry["event"] == "shard.recovered"]
    assert len(recovered) == 1
    assert recovered[0]["shard"] == 0
    assert recovered[0]["rebuilt"] is False
    assert recovered[0]["watermark"] == 0


def test_data_without_fingerprint_rebuilt():
    tiers = memory_tiers()
    tiers["im"].commit(TierWrites(), 3)

    report = Shard(0, 1, tiers, Policy(), None).recover()

    assert report.rebuilt
    assert report.reason == "STM has no policy fingerprint but tiers hold data"


def test_redo_finished_on_restart():
    inner = memory_tiers()
    im = SwitchedTier(inner["im"])
    shard = Shard(0, 1, {**inner, "im": im}, Policy(stm_idle_ms=1), None)
    shard.resume_initial_s = 60.0
    shard.recover()
    shard.apply([store(1, "v1")])
    im.down = True
    # The move to IM writes the redo record, then its IM commit fails.
    shard.apply([Maintain(seq=2, ts=100, id="e2")])
    shard.close()
    im.down = False

    with capture_logs() as logs:
        report = Shard(0, 1, inner, Policy(stm_idle_ms=1), None).recover()

    assert report.redo_finished
    assert report.watermark == 2
    finished = [entry for entry in logs if entry["event"] == "shard.redo.finished"]
    assert len(finished) == 1
    assert finished[0]["seq"] == 2
    assert inner["im"].get("a", "k").value == "v1"


def test_rebuild_from_empty_keeps_tiers_consistent():
    tiers = memory_tiers()
    shard = Shard(0, 1, tiers, Policy(), None)
    shard.recover()
    shard.rebuild()
    shard.apply([store(1, "v1")])

    report = Shard(0, 1, tiers, Policy(), None).recover()

    assert not report.rebuilt
    assert tiers["stm"].control("ltm_wm") == b"0"
    assert tiers["stm"].control("im_wm") == b"0"


def test_gap_before_batch_filled_from_log():
    log = MemoryEventLog()
    shard = Shard(0, 1, memory_tiers(), Policy(), log)
    shard.recover()
    lost = store(1, "v1")
    later = Get(namespace="a", key="k", seq=2, ts=20, id="e2")
    log.append([lost, later], [0, 0])

    with capture_logs() as logs:
        replies = shard.apply([later], prev_seq=1)

    assert replies == [
        Value(
            id="e2", seq=2, key="k", value="v1", tier="cache", importance=0.5, tags=[]
        )
    ]
    gaps = [entry for entry in logs if entry["event"] == "shard.gap.filling"]
    assert len(gaps) == 1
    assert gaps[0]["prev_seq"] == 1
    assert gaps[0]["watermark"] == 0


def test_rebuild_without_log_uses_empty_tiers(tmp_path: Path):
    tiers = memory_tiers()
    shard = Shard(0, 1, tiers, Policy(), None, snapshot_dir=tmp_path)
    shard.recover()
    shard.apply([store(1, "v1")])

    report = shard.rebuild()

    assert report.rebuilt
    assert report.snapshot_seq is None
    assert report.watermark == 0
    assert list(tiers["stm"].records()) == []
    shard.close()


def test_load_snapshot_writes_control_values():
    source_tiers = memory_tiers()
    source = Shard(0, 1, source_tiers, Policy(), None)
    source.recover()
    source.apply([store(1, "v1"), store(2, "v2")])
    snapshot = snapshot_from_tiers(
        source_tiers,
        shard=0,
        shards=1,
        fingerprint=source.fingerprint,
        watermark=2,
        ts=20,
    )
    target_tiers = memory_tiers()
    target = Shard(0, 1, target_tiers, Policy(), None)

    target.load_snapshot(snapshot)

    stm = target_tiers["stm"]
    assert stm.control("policy") == source.fingerprint.encode()
    assert stm.control("im_wm") == b"2"
    assert stm.control("ltm_wm") == b"2"
    assert stm.control("redo") is None
    assert target.watermark == 2

    # A shard started on the loaded tiers trusts them and does not rebuild.
    restarted = Shard(0, 1, target_tiers, Policy(), None)
    report = restarted.recover()
    assert not report.rebuilt
    assert report.reason is None
    assert report.loaded_watermark == 2
    assert restarted.digests() == target.digests()


def test_load_snapshot_then_apply_reads_snapshot_records():
    source_tiers = memory_tiers()
    source = Shard(0, 1, source_tiers, Policy(), None)
    source.recover()
    source.apply([store(1, "v1")])
    snapshot = snapshot_from_tiers(
        source_tiers,
        shard=0,
        shards=1,
        fingerprint=source.fingerprint,
        watermark=1,
        ts=10,
    )
    target = Shard(0, 1, memory_tiers(), Policy(), None)
    target.load_snapshot(snapshot)

    replies = target.apply(
        [
            Get(namespace="a", key="k", seq=2, ts=20, id="e2"),
            Get(namespace="a", key="x", seq=3, ts=30, id="e3"),
        ]
    )

    assert replies == [
        Value(
            id="e2", seq=2, key="k", value="v1", tier="cache", importance=0.5, tags=[]
        ),
        NotFound(id="e3", seq=3, key="x"),
    ]


# ----------------------------------------------------------------- policy


def retention_meta(importance: float, accessed_ts: int = 0) -> Meta:
    return Meta(
        importance=importance,
        tags=(),
        created_ts=0,
        updated_ts=0,
        accessed_ts=accessed_ts,
        access_count=0,
        version=1,
        tier_since_ts=0,
    )


def test_retention_full_importance_is_1000():
    assert retention(retention_meta(1.0), 0, Policy()) == 1_000


def test_retention_no_idle_time_no_halving():
    policy = Policy(half_life_ms=1)

    assert retention(retention_meta(1.0, accessed_ts=500), 500, policy) == 1_000
    assert retention(retention_meta(1.0, accessed_ts=500), 501, policy) == 500


def test_policy_below_one_names_field():
    with pytest.raises(ValueError) as caught:
        Policy(stm_capacity=0)

    assert str(caught.value) == "policy.stm_capacity must be at least 1, got 0"


# ----------------------------------------------------------------- sharding


def test_shard_of_lone_surrogate_namespace():
    namespace = "ns-\ud800"
    expected = xxhash.xxh64_intdigest(namespace.encode("utf-8", "surrogatepass")) % 7

    assert shard_of(namespace, 7) == expected
