"""Tests of `ShardState` against the rules of docs/semantics.md.

Expected values are worked out from the document by hand. Each test commits
the writes of every batch to in-memory tiers, as `Shard` does, so a later
batch reads committed values the way it would in production.
"""

from __future__ import annotations

import msgspec
import pytest

from events.types import Event, Forget, Get, Maintain, Message, NotFound, Store, Value
from handlers.policy import Policy, retention
from handlers.state import Move, ShardState
from tiers.base import TIER_NAMES, Meta, Record
from tiers.memory import MemoryTier

# Long enough that no test's clock reaches it by accident.
NEVER_MS = 10**12


class Events:
    """Builds events with increasing `seq`, as the router numbers them."""

    def __init__(self) -> None:
        self.seq = 0

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def store(
        self, key: str, ts: int, value=None, namespace: str = "a", **fields
    ) -> Store:
        value = f"value of {key}" if value is None else value
        return Store(
            namespace=namespace,
            key=key,
            value=value,
            seq=self._next(),
            ts=ts,
            id=f"e{self.seq}",
            **fields,
        )

    def get(self, key: str, ts: int, namespace: str = "a") -> Get:
        return Get(
            namespace=namespace, key=key, seq=self._next(), ts=ts, id=f"e{self.seq}"
        )

    def forget(self, key: str, ts: int, namespace: str = "a") -> Forget:
        return Forget(
            namespace=namespace, key=key, seq=self._next(), ts=ts, id=f"e{self.seq}"
        )

    def maintain(self, ts: int, namespace: str | None = None) -> Maintain:
        return Maintain(namespace=namespace, seq=self._next(), ts=ts, id=f"e{self.seq}")


def make_state(**settings) -> ShardState:
    tiers = {name: MemoryTier(name, 0) for name in TIER_NAMES}
    return ShardState(0, Policy(**settings), tiers)


def run(state: ShardState, *events: Event) -> list[Message]:
    """Apply one batch, commit its writes to every tier and return the replies."""
    writes, replies = state.apply_batch(events)
    for name in TIER_NAMES:
        state.tiers[name].commit(writes[name], state.watermark)
    return replies


def records(state: ShardState, tier: str) -> dict[tuple[str, str], Record]:
    return {(r.namespace, r.key): r for r in state.tiers[tier].records()}


def find(state: ShardState, key: str, namespace: str = "a") -> tuple[str, Record]:
    """Return the only tier that contains the record, and the record."""
    found = [
        (name, records(state, name)[(namespace, key)])
        for name in TIER_NAMES
        if (namespace, key) in records(state, name)
    ]
    assert len(found) == 1, (
        f"{namespace}/{key} is in tiers {[name for name, _ in found]}"
    )
    return found[0]


def tier_snapshot(state: ShardState) -> dict[str, list[Record]]:
    return {name: list(state.tiers[name].records()) for name in TIER_NAMES}


def meta(importance: float = 0.5, accessed_ts: int = 0, access_count: int = 0) -> Meta:
    return Meta(
        importance=importance,
        tags=(),
        created_ts=0,
        updated_ts=0,
        accessed_ts=accessed_ts,
        access_count=access_count,
        version=1,
        tier_since_ts=0,
    )


# Moves a record out of STM at the first Maintain, and keeps it in IM.
TO_IM = {"stm_idle_ms": 1, "im_idle_ms": NEVER_MS}
# Moves a record out of STM and out of IM at the first Maintain.
TO_LTM = {"stm_idle_ms": 1, "im_idle_ms": 1}


def place(state: ShardState, events: Events, tier: str, key: str = "k") -> None:
    """Store `key` at ts 1,000 and, with a TO_IM or TO_LTM policy, move it to `tier`."""
    run(state, events.store(key, ts=1_000))
    if tier != "stm":
        run(state, events.maintain(ts=2_000))
    assert state.tier_of("a", key) == tier


# ----------------------------------------------------------------- Store


def test_store_writes_stm_record():
    state = make_state()
    events = Events()

    run(
        state,
        events.store(
            "k", ts=1_000, value="hello", importance=0.7, tags=["x", "y"], ttl_s=5
        ),
    )

    assert records(state, "stm") == {
        ("a", "k"): Record(
            "a",
            "k",
            "hello",
            Meta(
                importance=0.7,
                tags=("x", "y"),
                created_ts=1_000,
                updated_ts=1_000,
                accessed_ts=1_000,
                access_count=0,
                version=1,
                tier_since_ts=1_000,
                expires_ts=6_000,
                cache_touch=1,
                size=6,  # MessagePack of "hello": one fixstr header byte + 5
            ),
        )
    }
    assert records(state, "im") == {}
    assert records(state, "ltm") == {}
    assert state.cache_keys() == [("a", "k")]


def test_store_defaults_have_no_expiry():
    state = make_state()

    run(state, Events().store("k", ts=1_000))

    _, record = find(state, "k")
    assert record.meta.importance == 0.5
    assert record.meta.tags == ()
    assert record.meta.expires_ts is None


def test_store_overwrite_keeps_history():
    """An overwrite keeps created_ts, access_count and tier_since_ts, bumps version."""
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000, value=1, importance=0.2, ttl_s=60))
    run(state, events.get("k", ts=2_000))

    run(state, events.store("k", ts=3_000, value=2, importance=0.9, tags=["new"]))

    tier, record = find(state, "k")
    assert tier == "stm"
    assert record.value == 2
    assert record.meta.created_ts == 1_000
    assert record.meta.updated_ts == 3_000
    assert record.meta.accessed_ts == 3_000
    assert record.meta.access_count == 1
    assert record.meta.version == 2
    assert record.meta.tier_since_ts == 1_000
    assert record.meta.importance == 0.9
    assert record.meta.tags == ("new",)
    assert record.meta.expires_ts is None
    assert record.meta.cache_touch == 3


@pytest.mark.parametrize(
    ("tier", "settings"), [("im", TO_IM), ("ltm", TO_LTM)], ids=["im", "ltm"]
)
def test_store_of_moved_key_removes_it_there(tier, settings):
    state = make_state(**settings)
    events = Events()
    place(state, events, tier)

    run(state, events.store("k", ts=5_000, value="again"))

    assert records(state, tier) == {}
    where, record = find(state, "k")
    assert where == "stm"
    assert record.value == "again"
    assert record.meta.version == 2
    assert record.meta.created_ts == 1_000
    assert record.meta.tier_since_ts == 5_000


def test_store_of_moved_key_in_same_batch():
    """A Store after a move in one batch leaves the key in STM only."""
    state = make_state(**TO_LTM)
    events = Events()
    run(state, events.store("k", ts=1_000))

    run(state, events.maintain(ts=2_000), events.store("k", ts=2_000, value="again"))

    where, record = find(state, "k")
    assert where == "stm"
    assert record.value == "again"


def test_store_puts_key_at_recent_end():
    state = make_state()
    events = Events()
    run(state, events.store("k1", ts=1_000), events.store("k2", ts=1_001))
    run(state, events.get("k1", ts=1_002))
    assert state.cache_keys() == [("a", "k2"), ("a", "k1")]

    run(state, events.store("k2", ts=1_003))

    assert state.cache_keys() == [("a", "k1"), ("a", "k2")]


# ----------------------------------------------------------------- Get


def test_get_cached_key_served_by_cache():
    state = make_state()
    events = Events()
    run(
        state,
        events.store("k", ts=1_000, value={"text": "hi"}, importance=0.8, tags=["t"]),
    )

    replies = run(state, events.get("k", ts=2_000))

    assert replies == [
        Value(
            id="e2",
            seq=2,
            key="k",
            value={"text": "hi"},
            tier="cache",
            importance=0.8,
            tags=["t"],
        )
    ]


@pytest.mark.parametrize(
    ("tier", "settings"),
    [("stm", {}), ("im", TO_IM), ("ltm", TO_LTM)],
    ids=["stm", "im", "ltm"],
)
def test_get_uncached_key_served_by_tier(tier, settings):
    state = make_state(cache_capacity=1, **settings)
    events = Events()
    place(state, events, tier)
    # A key in another namespace pushes "k" out of the one-record cache and
    # is not touched by the Maintain above.
    run(state, events.store("other", ts=3_000, namespace="b"))
    assert state.cache_keys() == [("b", "other")]

    get = events.get("k", ts=4_000)
    replies = run(state, get)

    assert [type(reply) for reply in replies] == [Value]
    assert replies[0].tier == tier
    assert replies[0].value == "value of k"
    where, record = find(state, "k")
    assert where == tier
    assert record.meta.accessed_ts == 4_000
    assert record.meta.access_count == 1
    assert record.meta.cache_touch == get.seq
    assert state.cache_keys() == [("a", "k")]


def test_get_records_each_access():
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000))

    run(state, events.get("k", ts=2_000), events.get("k", ts=3_000))
    run(state, events.get("k", ts=4_000))

    _, record = find(state, "k")
    assert record.meta.access_count == 3
    assert record.meta.accessed_ts == 4_000
    assert record.meta.updated_ts == 1_000
    assert record.meta.cache_touch == 4


def test_get_missing_key_not_found():
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000))
    before = tier_snapshot(state)

    get = events.get("missing", ts=2_000)
    writes, replies = state.apply_batch([get])

    assert replies == [NotFound(id=get.id, seq=get.seq, key="missing")]
    assert not any(writes.values())
    assert tier_snapshot(state) == before
    assert state.cache_keys() == [("a", "k")]


def test_get_before_expiry_finds_key():
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000, ttl_s=1))

    replies = run(state, events.get("k", ts=1_999))

    assert [type(reply) for reply in replies] == [Value]


def test_get_at_expiry_not_found():
    """expires_ts = ts + ttl_s * 1000, and a key is gone at that very ms."""
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000, ttl_s=1))
    before = tier_snapshot(state)

    get = events.get("k", ts=2_000)
    writes, replies = state.apply_batch([get])

    assert replies == [NotFound(id=get.id, seq=get.seq, key="k")]
    assert not any(writes.values())
    assert tier_snapshot(state) == before


def test_get_never_moves_record():
    state = make_state(**TO_LTM)
    events = Events()
    place(state, events, "ltm")

    run(state, events.get("k", ts=3_000), events.get("k", ts=3_001))

    where, _ = find(state, "k")
    assert where == "ltm"


# ----------------------------------------------------------------- Forget


@pytest.mark.parametrize(
    ("tier", "settings"),
    [("stm", {}), ("im", TO_IM), ("ltm", TO_LTM)],
    ids=["stm", "im", "ltm"],
)
def test_forget_removes_record_and_cache_entry(tier, settings):
    state = make_state(**settings)
    events = Events()
    place(state, events, tier)
    assert ("a", "k") in state.cache_keys()

    run(state, events.forget("k", ts=3_000))

    for name in TIER_NAMES:
        assert records(state, name) == {}, name
    assert state.cache_keys() == []
    assert state.tier_of("a", "k") is None
    get = events.get("k", ts=3_001)
    assert run(state, get) == [NotFound(id=get.id, seq=get.seq, key="k")]


def test_forget_missing_key_changes_nothing():
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000))

    writes, replies = state.apply_batch([events.forget("missing", ts=2_000)])

    assert replies == []
    assert not any(writes.values())
    assert state.cache_keys() == [("a", "k")]


def test_forget_then_store_starts_new_history():
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000), events.get("k", ts=1_500))

    run(state, events.forget("k", ts=2_000), events.store("k", ts=3_000))

    _, record = find(state, "k")
    assert record.meta.created_ts == 3_000
    assert record.meta.version == 1
    assert record.meta.access_count == 0


def test_store_after_expiry_starts_new_history():
    """An expired key counts as missing even before maintenance removes it."""
    state = make_state()
    events = Events()
    run(state, events.store("k", ts=1_000, ttl_s=1), events.get("k", ts=1_500))

    run(state, events.store("k", ts=4_000))

    _, record = find(state, "k")
    assert record.meta.created_ts == 4_000
    assert record.meta.version == 1
    assert record.meta.access_count == 0
    assert record.meta.expires_ts is None


# ----------------------------------------------------------------- Maintain


def test_maintain_expires_records():
    state = make_state()
    events = Events()
    run(
        state,
        events.store("gone", ts=1_000, ttl_s=1),  # expires_ts 2,000
        events.store("kept", ts=1_001, ttl_s=1),  # expires_ts 2,001
    )

    maintain = events.maintain(ts=2_000)
    run(state, maintain)

    assert state.moves == [Move(maintain.seq, "a", "gone", "stm", None, "expired")]
    assert set(records(state, "stm")) == {("a", "kept")}
    assert state.cache_keys() == [("a", "kept")]


def test_maintain_moves_idle_stm_records():
    state = make_state(stm_idle_ms=100)
    events = Events()
    run(state, events.store("idle", ts=1_000), events.store("busy", ts=1_050))
    _, before = find(state, "idle")

    maintain = events.maintain(ts=1_100)
    run(state, maintain)

    assert state.moves == [Move(maintain.seq, "a", "idle", "stm", "im", "idle")]
    where, moved = find(state, "idle")
    assert where == "im"
    assert moved.value == before.value
    assert moved.meta == msgspec.structs.replace(before.meta, tier_since_ts=1_100)
    assert find(state, "busy")[0] == "stm"


def test_maintain_move_keeps_cache_membership():
    state = make_state(stm_idle_ms=100)
    events = Events()
    run(state, events.store("k1", ts=1_000), events.store("k2", ts=1_000))

    run(state, events.maintain(ts=1_100))

    assert state.cache_keys() == [("a", "k1"), ("a", "k2")]
    assert find(state, "k1")[1].meta.cache_touch == 1
    get = events.get("k1", ts=1_200)
    assert run(state, get)[0].tier == "cache"


def test_maintain_capacity_moves_lowest_retention():
    state = make_state(stm_capacity=2, stm_idle_ms=NEVER_MS)
    events = Events()
    run(
        state,
        events.store("high", ts=1_000, importance=0.9),
        events.store("low", ts=1_000, importance=0.1),
        events.store("mid", ts=1_000, importance=0.5),
    )

    maintain = events.maintain(ts=1_000)
    run(state, maintain)

    assert state.moves == [Move(maintain.seq, "a", "low", "stm", "im", "capacity")]
    assert find(state, "low")[0] == "im"
    assert find(state, "high")[0] == "stm"
    assert find(state, "mid")[0] == "stm"


def test_maintain_capacity_ranks_decayed_score():
    """A high importance decays below a low one after two half-lives of idleness."""
    state = make_state(stm_capacity=1, stm_idle_ms=NEVER_MS, half_life_ms=1_000)
    events = Events()
    run(state, events.store("old", ts=0, importance=0.8))  # 800 >> 2 = 200 at ts 2,000
    run(state, events.store("new", ts=2_000, importance=0.3))  # 300

    run(state, events.maintain(ts=2_000))

    assert find(state, "old")[0] == "im"
    assert find(state, "new")[0] == "stm"


def test_maintain_capacity_counts_accesses():
    """One access adds access_weight points: 400 + 100 beats 450."""
    state = make_state(stm_capacity=1, stm_idle_ms=NEVER_MS)
    events = Events()
    run(
        state,
        events.store("read", ts=1_000, importance=0.4),
        events.store("unread", ts=1_000, importance=0.45),
        events.get("read", ts=1_000),
    )

    run(state, events.maintain(ts=1_000))

    assert find(state, "unread")[0] == "im"
    assert find(state, "read")[0] == "stm"


def test_maintain_capacity_tie_breaks_by_accessed_ts():
    state = make_state(stm_capacity=2, stm_idle_ms=NEVER_MS)
    events = Events()
    run(
        state,
        events.store("b", ts=1_000),
        events.store("a", ts=1_001),
        events.store("c", ts=1_001),
    )

    run(state, events.maintain(ts=1_001))

    assert find(state, "b")[0] == "im"
    assert find(state, "a")[0] == "stm"
    assert find(state, "c")[0] == "stm"


def test_maintain_capacity_tie_breaks_by_key():
    state = make_state(stm_capacity=1, stm_idle_ms=NEVER_MS)
    events = Events()
    run(
        state,
        events.store("c", ts=1_000),
        events.store("a", ts=1_000),
        events.store("b", ts=1_000),
    )

    maintain = events.maintain(ts=1_000)
    run(state, maintain)

    assert state.moves == [
        Move(maintain.seq, "a", "a", "stm", "im", "capacity"),
        Move(maintain.seq, "a", "b", "stm", "im", "capacity"),
    ]
    assert find(state, "c")[0] == "stm"


def test_maintain_capacity_counts_after_idle_moves():
    """Idle moves come first, and capacity applies to the records that remain."""
    state = make_state(stm_capacity=1, stm_idle_ms=100)
    events = Events()
    run(state, events.store("idle", ts=1_000, importance=0.9))
    run(
        state,
        events.store("k1", ts=1_100),
        events.store("k2", ts=1_100, importance=0.1),
    )

    maintain = events.maintain(ts=1_100)
    run(state, maintain)

    assert state.moves == [
        Move(maintain.seq, "a", "idle", "stm", "im", "idle"),
        Move(maintain.seq, "a", "k2", "stm", "im", "capacity"),
    ]
    assert find(state, "k1")[0] == "stm"


def test_maintain_im_step_includes_new_arrivals():
    """Records moved to IM in step 2 take part in step 3's capacity check."""
    state = make_state(
        stm_capacity=1, im_capacity=1, stm_idle_ms=NEVER_MS, im_idle_ms=NEVER_MS
    )
    events = Events()
    run(
        state,
        events.store("k1", ts=1_000, importance=0.2),
        events.store("k2", ts=1_000, importance=0.5),
        events.store("k3", ts=1_000, importance=0.9),
    )

    maintain = events.maintain(ts=1_000)
    run(state, maintain)

    assert state.moves == [
        Move(maintain.seq, "a", "k1", "stm", "im", "capacity"),
        Move(maintain.seq, "a", "k2", "stm", "im", "capacity"),
        Move(maintain.seq, "a", "k1", "im", "ltm", "capacity"),
    ]
    assert find(state, "k1")[0] == "ltm"
    assert find(state, "k2")[0] == "im"
    assert find(state, "k3")[0] == "stm"
    assert find(state, "k1")[1].meta.tier_since_ts == 1_000


def test_maintain_moves_idle_im_records():
    state = make_state(stm_idle_ms=100, im_idle_ms=1_000)
    events = Events()
    run(state, events.store("old", ts=1_000), events.store("young", ts=1_500))

    maintain = events.maintain(ts=2_000)
    run(state, maintain)

    assert state.moves == [
        Move(maintain.seq, "a", "old", "stm", "im", "idle"),
        Move(maintain.seq, "a", "young", "stm", "im", "idle"),
        Move(maintain.seq, "a", "old", "im", "ltm", "idle"),
    ]
    assert find(state, "old")[0] == "ltm"
    assert find(state, "young")[0] == "im"


def test_maintain_evicts_lowest_from_ltm():
    state = make_state(ltm_capacity=1, **TO_LTM)
    events = Events()
    run(
        state,
        events.store("low", ts=1_000, importance=0.2),
        events.store("high", ts=1_000, importance=0.9),
    )

    maintain = events.maintain(ts=2_000)
    run(state, maintain)

    assert state.moves[-1] == Move(maintain.seq, "a", "low", "ltm", None, "evicted")
    assert len(state.moves) == 5
    assert set(records(state, "ltm")) == {("a", "high")}
    assert state.tier_of("a", "low") is None
    assert state.cache_keys() == [("a", "high")]


def test_maintain_capacities_are_per_namespace():
    state = make_state(stm_capacity=1, stm_idle_ms=NEVER_MS)
    events = Events()
    run(
        state,
        events.store("k", ts=1_000, namespace="a"),
        events.store("k", ts=1_000, namespace="b"),
    )

    run(state, events.maintain(ts=1_000))

    assert state.moves == []
    assert state.tier_of("a", "k") == "stm"
    assert state.tier_of("b", "k") == "stm"


def test_maintain_namespace_touches_only_it():
    state = make_state(stm_idle_ms=100)
    events = Events()
    run(
        state,
        events.store("k", ts=1_000, namespace="a"),
        events.store("k", ts=1_000, namespace="b", ttl_s=1),
    )

    maintain = events.maintain(ts=5_000, namespace="a")
    run(state, maintain)

    assert state.moves == [Move(maintain.seq, "a", "k", "stm", "im", "idle")]
    assert state.tier_of("b", "k") == "stm"


def test_maintain_unknown_namespace_changes_nothing():
    state = make_state(stm_idle_ms=100)
    events = Events()
    run(state, events.store("k", ts=1_000))

    writes, _ = state.apply_batch([events.maintain(ts=5_000, namespace="other")])

    assert state.moves == []
    assert not any(writes.values())


def test_maintain_all_namespaces_in_sorted_order():
    state = make_state(stm_idle_ms=100)
    events = Events()
    run(
        state,
        events.store("k", ts=1_000, namespace="c"),
        events.store("k", ts=1_000, namespace="a"),
        events.store("k", ts=1_000, namespace="b"),
    )

    run(state, events.maintain(ts=2_000))

    assert [move.namespace for move in state.moves] == ["a", "b", "c"]


def test_maintain_expires_before_moving():
    """An expired record is deleted, not moved, and frees its capacity slot."""
    state = make_state(stm_capacity=1, stm_idle_ms=NEVER_MS)
    events = Events()
    run(
        state,
        events.store("expiring", ts=1_000, importance=0.9, ttl_s=1),
        events.store("k", ts=1_000, importance=0.1),
    )

    maintain = events.maintain(ts=2_000)
    run(state, maintain)

    assert state.moves == [Move(maintain.seq, "a", "expiring", "stm", None, "expired")]
    assert state.tier_of("a", "k") == "stm"


# ----------------------------------------------------------------- cache


def test_cache_evicts_least_recently_used():
    state = make_state(cache_capacity=2)
    events = Events()

    run(
        state,
        events.store("k1", ts=1_000),
        events.store("k2", ts=1_001),
        events.store("k3", ts=1_002),
    )

    assert state.cache_keys() == [("a", "k2"), ("a", "k3")]
    assert find(state, "k1")[1].meta.cache_touch == 0
    assert find(state, "k2")[1].meta.cache_touch == 2
    assert find(state, "k3")[1].meta.cache_touch == 3


def test_cache_eviction_across_batches():
    state = make_state(cache_capacity=2)
    events = Events()
    run(state, events.store("k1", ts=1_000), events.store("k2", ts=1_001))

    run(state, events.store("k3", ts=1_002))

    assert find(state, "k1")[1].meta.cache_touch == 0
    assert state.cache_keys() == [("a", "k2"), ("a", "k3")]


def test_cache_get_refreshes_recency():
    state = make_state(cache_capacity=2)
    events = Events()
    run(state, events.store("k1", ts=1_000), events.store("k2", ts=1_001))

    run(state, events.get("k1", ts=1_002), events.store("k3", ts=1_003))

    assert state.cache_keys() == [("a", "k1"), ("a", "k3")]
    assert find(state, "k2")[1].meta.cache_touch == 0


def test_cache_evicts_record_in_im():
    """Eviction clears cache_touch in whichever tier contains the record."""
    state = make_state(cache_capacity=1, **TO_IM)
    events = Events()
    place(state, events, "im")

    run(state, events.store("other", ts=3_000, namespace="b"))

    assert find(state, "k")[0] == "im"
    assert find(state, "k")[1].meta.cache_touch == 0


def test_cache_reload_restores_order():
    """After a restart the cache is rebuilt in cache_touch order."""
    state = make_state(cache_capacity=3, **TO_IM)
    events = Events()
    run(state, events.store("k1", ts=1_000), events.store("k2", ts=1_000))
    run(state, events.maintain(ts=2_000))  # both to IM, still cached
    run(state, events.store("k3", ts=2_000), events.get("k1", ts=2_001))

    reloaded = ShardState(0, state.policy, state.tiers)
    reloaded.load(state.watermark)

    assert reloaded.cache_keys() == [("a", "k2"), ("a", "k3"), ("a", "k1")]
    assert reloaded.cache_keys() == state.cache_keys()
    get = events.get("k2", ts=2_002)
    assert reloaded.apply_batch([get])[1][0].tier == "cache"


# ----------------------------------------------------------------- retention


@pytest.mark.parametrize(
    ("importance", "idle_ms", "access_count", "expected"),
    [
        (0.5, 0, 0, 500),
        (0.5, 3_599_999, 0, 500),  # not yet one full half-life
        (0.5, 3_600_000, 0, 250),
        (0.5, 5_400_000, 0, 250),  # 1.5 half-lives halve once
        (1.0, 3 * 3_600_000, 0, 125),
        (1.0, 9 * 3_600_000, 0, 1),  # 1000 >> 9
        (1.0, 10 * 3_600_000, 0, 0),  # 1000 >> 10
        (0.0, 0, 0, 0),
        (0.123, 0, 0, 123),
        (0.5, 0, 1, 600),
        (0.5, 0, 2, 700),
        (0.5, 0, 3, 700),
        (0.5, 0, 4, 800),
        (0.5, 0, 1_000, 1_500),  # bit_length(1000) = 10
        (1.0, 64 * 3_600_000, 0, 0),
        (1.0, 64 * 3_600_000, 5, 300),
        (1.0, 10**6 * 3_600_000, 0, 0),
    ],
)
def test_retention_default_policy(importance, idle_ms, access_count, expected):
    now = 10**15
    record = meta(
        importance=importance, accessed_ts=now - idle_ms, access_count=access_count
    )

    assert retention(record, now, Policy()) == expected


def test_retention_custom_policy():
    """half_life_ms 10 and access_weight 7: (800 >> 2) + 7 * bit_length(6)."""
    policy = Policy(half_life_ms=10, access_weight=7)
    record = meta(importance=0.8, accessed_ts=0, access_count=6)

    assert retention(record, 25, policy) == 221


def test_retention_many_halvings_small_half_life():
    policy = Policy(half_life_ms=1)
    record = meta(importance=1.0, accessed_ts=0, access_count=1)

    assert retention(record, 64, policy) == 100
    assert retention(record, 10**9, policy) == 100


def test_retention_is_int():
    assert type(retention(meta(importance=0.3333), 0, Policy())) is int
