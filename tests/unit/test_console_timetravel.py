"""Time travel: a namespace rebuilt at a past seq from a log, and its diff to now."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from events.types import Event, Forget, Get, Maintain, Store
from handlers.policy import Policy
from handlers.sharding import shard_of
from tiermem.console.sources import InvalidRequestError, NotFoundError
from tiermem.console.timetravel import TimeTravel

TINY = Policy(cache_capacity=4, stm_capacity=2, im_capacity=2, ltm_capacity=100)


class ListLog:
    def __init__(self, events: list[Event]) -> None:
        self.events = events

    def last_seq(self) -> int:
        return len(self.events)

    def read(self, after_seq: int, limit: int) -> list[Event]:
        return self.events[after_seq : after_seq + limit]

    def iter_from(
        self, after_seq: int, until_seq: int | None = None
    ) -> Iterator[list[Event]]:
        end = len(self.events) if until_seq is None else until_seq
        if after_seq < end:
            yield self.events[after_seq:end]


class Target:
    def __init__(self, snapshots: Path) -> None:
        self.shards = 2
        self.policy = TINY
        self.snapshots = snapshots


class FakeSources:
    def __init__(self, events: list[Event], snapshots: Path) -> None:
        self.log = ListLog(events)
        self._target = Target(snapshots)

    def event_log(self) -> ListLog:
        return self.log

    def target(self) -> Target:
        return self._target


def logged(events: list[Event]) -> list[Event]:
    return [
        msgspec.structs.replace(event, seq=index, ts=1000 * index, id=f"e{index}")
        for index, event in enumerate(events, start=1)
    ]


@pytest.fixture
def travel(tmp_path):
    # Another namespace on the other shard, so the rebuild must pick the right one.
    other = next(
        name
        for name in ("b", "c", "d", "e", "f")
        if shard_of(name, 2) != shard_of("agent", 2)
    )
    events = logged(
        [
            Store(
                namespace="agent", key="plan", value="red apples", importance=0.8
            ),  # 1
            Store(namespace="agent", key="secret", value="code 0451"),  # 2
            Store(namespace=other, key="x", value="elsewhere"),  # 3
            Get(namespace="agent", key="plan"),  # 4
            Store(namespace="agent", key="plan", value="green pears"),  # 5
            Forget(namespace="agent", key="secret"),  # 6
            Store(namespace="agent", key="late", value="added later"),  # 7
            Forget(namespace="agent", key="late", expected_version=5),  # 8, rejected
        ]
    )
    return TimeTravel(FakeSources(events, tmp_path / "snapshots")), events


def rows_by_key(page):
    return {row["key"]: row for row in page["rows"]}


def test_past_before_forget(travel):
    machine, _ = travel
    state = machine.state("agent", 4, 8)
    page = machine.page(state, changes_only=False, offset=0, limit=100)
    rows = rows_by_key(page)

    assert page["seq"] == 4
    assert page["now_seq"] == 8
    assert page["then_records"] == 2
    assert page["now_records"] == 2
    assert sorted(rows) == ["late", "plan", "secret"]
    assert rows["secret"]["change"] == "removed"
    assert rows["secret"]["forgotten_seq"] == 6
    assert rows["secret"]["then"]["value"] is None
    assert "0451" not in repr(page)
    assert rows["plan"]["change"] == "changed"
    assert rows["plan"]["then"]["value"] == '"red apples"'
    assert rows["plan"]["then"]["access_count"] == 1
    assert rows["plan"]["now"]["value"] == '"green pears"'
    assert rows["late"]["change"] == "added"
    assert rows["late"]["forgotten_seq"] is None
    assert page["counts"] == {
        "added": 1,
        "removed": 1,
        "changed": 1,
        "moved": 0,
        "same": 0,
    }


def test_past_after_forget(travel):
    machine, _ = travel
    page = machine.page(
        machine.state("agent", 6, 8), changes_only=False, offset=0, limit=100
    )
    rows = rows_by_key(page)

    assert sorted(rows) == ["late", "plan"]
    assert rows["plan"]["change"] == "same"


def test_changes_only_and_paging(travel):
    machine, _ = travel
    state = machine.state("agent", 6, 8)
    changes = machine.page(state, changes_only=True, offset=0, limit=100)
    first = machine.page(state, changes_only=False, offset=0, limit=1)
    second = machine.page(state, changes_only=False, offset=1, limit=1)

    assert [row["key"] for row in changes["rows"]] == ["late"]
    assert [row["key"] for row in first["rows"]] == ["late"]
    assert first["next_offset"] == 1
    assert [row["key"] for row in second["rows"]] == ["plan"]
    assert second["next_offset"] is None


def test_rejected_forget_is_not_forgotten(travel):
    machine, _ = travel
    rows = rows_by_key(
        machine.page(
            machine.state("agent", 7, 8), changes_only=False, offset=0, limit=10
        )
    )

    assert rows["late"]["change"] == "same"
    assert rows["late"]["then"]["value"] == '"added later"'


def test_state_follows_new_events(travel):
    machine, events = travel
    state = machine.state("agent", 6, 8)
    events.append(
        msgspec.structs.replace(
            Forget(namespace="agent", key="plan"), seq=9, ts=9000, id="e9"
        )
    )
    events.append(
        msgspec.structs.replace(Maintain(namespace="agent"), seq=10, ts=10000, id="e10")
    )
    again = machine.state("agent", 6, 10)
    rows = rows_by_key(machine.page(again, changes_only=False, offset=0, limit=10))

    assert again is state
    assert again.now_seq == 10
    assert rows["plan"]["forgotten_seq"] == 9
    assert rows["plan"]["then"]["value"] is None


def test_cache_bound_and_discard(travel):
    machine, _ = travel
    for seq in range(5):
        machine.state("agent", seq, 8)

    assert [item["seq"] for item in machine.cached()] == [2, 3, 4]
    assert machine.discard("other") == 0
    assert machine.discard("agent") == 3
    assert machine.cached() == []
    with pytest.raises(NotFoundError, match="no cached state"):
        machine.require("agent", 4)


def test_resolve_seq_by_time(travel):
    machine, _ = travel

    assert machine.resolve_seq(seq=None, time_ms=4500) == (4, 8)
    assert machine.resolve_seq(seq=None, time_ms=1) == (0, 8)
    assert machine.resolve_seq(seq=3, time_ms=None) == (3, 8)


@pytest.mark.parametrize(
    ("seq", "message"),
    [
        (9, "seq 9 is invalid"),
        (-1, "seq -1 is invalid"),
        (None, "seq or time is missing"),
    ],
)
def test_resolve_seq_rejects(travel, seq, message):
    machine, _ = travel

    with pytest.raises(InvalidRequestError, match=message):
        machine.resolve_seq(seq=seq, time_ms=None)


def test_page_rejects_bad_limit(travel):
    machine, _ = travel
    state = machine.state("agent", 1, 8)

    with pytest.raises(InvalidRequestError, match="limit 0 is invalid"):
        machine.page(state, changes_only=False, offset=0, limit=0)


def test_namespace_forget_hides_past_values(tmp_path):
    events = logged(
        [
            Store(namespace="agent", key="plan", value="red apples"),  # 1
            Store(namespace="agent", key="secret", value="code 0451"),  # 2
            Forget(namespace="agent"),  # 3
            Store(namespace="agent", key="fresh", value="after the forget"),  # 4
        ]
    )
    machine = TimeTravel(FakeSources(events, tmp_path / "snapshots"))

    state = machine.state("agent", 2, 4)
    rows = rows_by_key(machine.page(state, changes_only=False, offset=0, limit=100))

    assert sorted(rows) == ["fresh", "plan", "secret"]
    for key in ("plan", "secret"):
        assert rows[key]["change"] == "removed"
        assert rows[key]["forgotten_seq"] == 3
        assert rows[key]["then"]["value"] is None
    assert rows["fresh"]["forgotten_seq"] is None
    assert rows["fresh"]["now"]["value"] == '"after the forget"'
