"""The runner's pure parts: which events are readable, and gap detection."""

from __future__ import annotations

import pytest

from events.types import Forget, Get, Maintain, Search, Store
from handlers.sharding import shard_of
from replay.projections import LogGapError
from replay.projections.runner import _check_dense, readable_count

# xxh64 places these namespaces on shards 0 and 1 of 2.
ZERO, ONE = "agent-1", "agent-3"


def test_namespaces_on_expected_shards():
    assert (shard_of(ZERO, 2), shard_of(ONE, 2)) == (0, 1)


def events_for(*kinds: tuple[type, str | None]) -> list:
    built = []
    for seq, (cls, namespace) in enumerate(kinds, start=1):
        if cls is Maintain:
            built.append(Maintain(seq=seq, ts=seq, namespace=namespace))
        elif cls is Search:
            built.append(Search(seq=seq, ts=seq, namespace=namespace, query="q"))
        else:
            built.append(cls(seq=seq, ts=seq, namespace=namespace, key="k", **({"value": 1} if cls is Store else {})))
    return built


def test_readable_all_committed():
    events = events_for((Store, ZERO), (Get, ONE), (Forget, ZERO))
    assert readable_count(events, [3, 2]) == 3


def test_readable_stops_at_uncommitted_shard():
    events = events_for((Store, ZERO), (Store, ONE), (Store, ZERO))
    assert readable_count(events, [3, 1]) == 1


def test_readable_ignores_idle_shard():
    events = events_for((Store, ONE), (Store, ZERO), (Store, ZERO))
    assert readable_count(events, [3, 1]) == 3


def test_readable_maintain_needs_every_shard():
    events = events_for((Store, ZERO), (Maintain, None), (Store, ZERO))
    assert readable_count(events, [3, 1]) == 1
    assert readable_count(events, [3, 2]) == 3


def test_readable_search_needs_no_shard():
    events = events_for((Store, ZERO), (Search, ONE))
    assert readable_count(events, [1, 0]) == 2


def test_readable_empty():
    assert readable_count([], [0, 0]) == 0


def test_check_dense_accepts_consecutive():
    _check_dense(events_for((Store, ZERO), (Store, ZERO))[1:], 1)


def test_check_dense_rejects_hole():
    events = events_for((Store, ZERO), (Store, ZERO), (Store, ZERO))
    with pytest.raises(LogGapError, match="expected seq 2, got seq 3") as caught:
        _check_dense([events[0], events[2]], 0)
    assert (caught.value.expected_seq, caught.value.actual_seq) == (2, 3)


def test_check_dense_rejects_missing_events():
    with pytest.raises(LogGapError, match="expected seq 6, found no event"):
        _check_dense([], 5)
