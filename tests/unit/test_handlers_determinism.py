"""Tests that tier state is a pure function of the log prefix.

Handlers read time only from event timestamps, so a clock that raises or
lies changes nothing, and however a log is cut into batches, or interrupted
by a crash and recovered, the shard ends with the same digests.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import event as label_example
from hypothesis import given, settings
from hypothesis import strategies as st

from events.log import LoggedId
from events.types import Event, Forget, Get, Maintain, Store
from handlers.policy import Policy
from handlers.shard import Shard
from tiers.base import TIER_NAMES
from tiers.memory import MemoryTier

POLICY = Policy(
    cache_capacity=3,
    stm_capacity=2,
    stm_idle_ms=100,
    im_capacity=2,
    im_idle_ms=1_000,
    ltm_capacity=2,
    half_life_ms=300,
)

MIXED_BATCH: list[Event] = [
    Store(
        namespace="a", key="k1", value="v1", importance=0.2, seq=1, ts=1_000, id="e1"
    ),
    Store(namespace="a", key="k2", value={"n": 2}, ttl_s=1, seq=2, ts=1_000, id="e2"),
    Store(namespace="b", key="k1", value=[1], seq=3, ts=1_010, id="e3"),
    Get(namespace="a", key="k1", seq=4, ts=1_050, id="e4"),
    Get(namespace="a", key="missing", seq=5, ts=1_050, id="e5"),
    Store(namespace="a", key="k3", value=3, importance=0.9, seq=6, ts=1_060, id="e6"),
    Store(namespace="c", key="k1", value=None, seq=7, ts=1_070, id="e7"),
    Maintain(seq=8, ts=2_500, id="e8"),
    Forget(namespace="b", key="k1", seq=9, ts=2_600, id="e9"),
    Get(namespace="a", key="k3", seq=10, ts=2_700, id="e10"),
    Maintain(namespace="a", seq=11, ts=5_000, id="e11"),
]


class ClockRead(Exception):
    """A handler read the wall clock."""


def _read_clock(*args, **kwargs):
    raise ClockRead("handlers must take time from event timestamps")


class _NoClockDatetime(datetime.datetime):
    now = classmethod(_read_clock)
    utcnow = classmethod(_read_clock)
    today = classmethod(_read_clock)


class ListLog:
    """An `EventLog` kept in a list, read in pages of three events."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def lookup(self, ids: Sequence[str]) -> list[LoggedId | None]:
        logged = {event.id: LoggedId(event.seq, 0) for event in self.events}
        return [logged.get(event_id) for event_id in ids]

    def append(self, events: Sequence[Event], body_hashes: Sequence[int]) -> None:
        self.events.extend(events)

    def read(self, after_seq: int, limit: int) -> list[Event]:
        return [event for event in self.events if event.seq > after_seq][:limit]

    def iter_from(
        self, after_seq: int, until_seq: int | None = None
    ) -> Iterator[list[Event]]:
        position = after_seq
        while until_seq is None or position < until_seq:
            batch = self.read(position, 3)
            if until_seq is not None:
                batch = [event for event in batch if event.seq <= until_seq]
            if not batch:
                return
            position = batch[-1].seq
            yield batch


class TierDown(Exception):
    """The simulated crash of the process that talks to a tier."""


class CrashingTier:
    """A tier wrapper that dies at the first call of `method` after `arm`.

    The call that dies and every later one raise `TierDown`, while the
    records of the wrapped tier survive.
    """

    def __init__(self, inner: MemoryTier) -> None:
        self.inner = inner
        self.name = inner.name
        self.shard = inner.shard
        self.method: str | None = None
        self.dead = False

    def arm(self, method: str) -> None:
        self.method = method

    def __getattr__(self, attribute: str):
        target = getattr(self.inner, attribute)

        def call(*args, **kwargs):
            if attribute == self.method:
                self.dead = True
            if self.dead:
                raise TierDown(f"{self.name} is down")
            return target(*args, **kwargs)

        return call


def make_tiers() -> dict[str, MemoryTier]:
    return {name: MemoryTier(name, 0) for name in TIER_NAMES}


def start(tiers, event_log=None) -> Shard:
    shard = Shard(0, 1, tiers, POLICY, event_log)
    shard.recover()
    return shard


# ----------------------------------------------------------------- clock


def test_apply_never_reads_clock(monkeypatch):
    shard = start(make_tiers())
    reference = start(make_tiers())
    reference_replies = reference.apply(MIXED_BATCH)
    for name in ("time", "time_ns", "monotonic", "monotonic_ns", "perf_counter"):
        monkeypatch.setattr(time, name, _read_clock)
    monkeypatch.setattr(datetime, "datetime", _NoClockDatetime)
    with pytest.raises(ClockRead):
        time.time()

    replies = shard.apply(MIXED_BATCH)
    repeated = shard.apply(MIXED_BATCH)
    digests = shard.digests()

    monkeypatch.undo()
    assert replies == reference_replies
    assert [reply.id for reply in repeated] == ["e4", "e5", "e10"]
    assert digests == reference.digests()


def _run_with_clock(monkeypatch, seconds: float) -> Shard:
    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: seconds)
        patched.setattr(time, "time_ns", lambda: int(seconds * 1e9))
        patched.setattr(time, "monotonic", lambda: seconds)
        shard = start(make_tiers())
        shard.apply(MIXED_BATCH[:5])
        shard.apply(MIXED_BATCH[5:])
    return shard


def test_apply_ignores_wall_clock(monkeypatch):
    """Two shards whose clocks are 40 years apart end with the same digests."""
    early = _run_with_clock(monkeypatch, 0.0)
    late = _run_with_clock(monkeypatch, 1.3e9)

    assert early.digests() == late.digests()
    assert early.state.cache_keys() == late.state.cache_keys()


# ----------------------------------------------------------------- log prefix

NAMESPACES = ["a", "b", "c"]
KEYS = ["k1", "k2", "k3", "k4"]
# Steps between timestamps: equal, small, past stm_idle_ms and half_life_ms,
# past im_idle_ms, past a ttl of one second.
STEPS_MS = [0, 1, 60, 150, 400, 1_200, 2_500]
# Weights of the event types in a drawn log.
KINDS = ["store"] * 3 + ["get"] * 2 + ["forget"] + ["maintain"] * 2
CRASH_POINTS = [
    ("stm", "put_control"),
    ("im", "commit"),
    ("ltm", "commit"),
    ("stm", "commit"),
]


@st.composite
def logs(draw) -> list[Event]:
    """Draw a log of Store, Get, Forget and Maintain events numbered from 1."""
    count = draw(st.integers(min_value=1, max_value=40))
    events: list[Event] = []
    ts = 1_000
    for seq in range(1, count + 1):
        ts += draw(st.sampled_from(STEPS_MS))
        kind = draw(st.sampled_from(KINDS))
        namespace = draw(st.sampled_from(NAMESPACES))
        key = draw(st.sampled_from(KEYS))
        envelope = {"seq": seq, "ts": ts, "id": f"e{seq}"}
        if kind == "store":
            event = Store(
                namespace=namespace,
                key=key,
                value=draw(st.one_of(st.integers(0, 3), st.text(max_size=3))),
                importance=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
                ttl_s=draw(st.sampled_from([None, None, 1, 3])),
                **envelope,
            )
        elif kind == "get":
            event = Get(namespace=namespace, key=key, **envelope)
        elif kind == "forget":
            event = Forget(namespace=namespace, key=key, **envelope)
        else:
            target = draw(st.sampled_from([None, *NAMESPACES]))
            event = Maintain(namespace=target, **envelope)
        events.append(event)
    return events


def _split(events: list[Event], cuts: list[bool]) -> list[list[Event]]:
    """Cut `events` into batches, a new batch after each event whose cut is True."""
    batches: list[list[Event]] = [[]]
    for event, cut in zip(events, cuts, strict=True):
        batches[-1].append(event)
        if cut:
            batches.append([])
    return [batch for batch in batches if batch]


@settings(max_examples=300, deadline=None)
@given(events=logs(), data=st.data())
def test_digests_are_function_of_log(events, data):
    single = start(make_tiers())
    single_replies = single.apply(events)
    expected = single.digests()

    cuts = data.draw(
        st.lists(st.booleans(), min_size=len(events), max_size=len(events))
    )
    split = start(make_tiers())
    split_replies = []
    for batch in _split(events, cuts):
        split_replies.extend(split.apply(batch))

    assert split_replies == single_replies
    assert split.digests() == expected

    # The crashing batch starts in the first half, so it is often long
    # enough to hold a Maintain that writes to IM and LTM.
    first_cut = data.draw(st.integers(min_value=0, max_value=len(events) // 2))
    second_cut = data.draw(st.integers(min_value=first_cut, max_value=len(events)))
    tier_name, method = data.draw(st.sampled_from(CRASH_POINTS))
    event_log = ListLog()
    inner = make_tiers()
    tiers = {name: inner[name] for name in TIER_NAMES}
    crashing_tier = CrashingTier(inner[tier_name])
    tiers[tier_name] = crashing_tier
    crashing = start(tiers, event_log)
    event_log.append(events[:first_cut], [0] * first_cut)
    crashing.apply(events[:first_cut])
    crashing_tier.arm(method)
    event_log.append(events[first_cut:second_cut], [0] * (second_cut - first_cut))
    try:
        crashing.apply(events[first_cut:second_cut])
    except TierDown:
        pass  # the crash the test is about; the restart below recovers from it
    outcome = "yes" if crashing_tier.dead else "not reached"
    label_example(f"crash at {tier_name}.{method}: {outcome}")
    restarted = start(inner, event_log)
    event_log.append(events[second_cut:], [0] * (len(events) - second_cut))
    restarted.apply(events[second_cut:])

    assert restarted.watermark == len(events)
    assert restarted.digests() == expected
