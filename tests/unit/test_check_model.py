"""Tests of the reference model in `tiermem.check.model` against docs/semantics.md.

Every expected value is worked out by hand from the document, so these
tests pin the model to the text and not to `handlers/state.py`.
"""

from __future__ import annotations

import pytest
import xxhash

from events.errors import ErrorCode
from events.types import (
    Ack,
    Conflict,
    Error,
    Forget,
    Get,
    Maintain,
    NotFound,
    Store,
    Value,
)
from handlers.policy import Policy
from handlers.sharding import shard_of
from tiermem.check.model import (
    Envelope,
    IdUse,
    Model,
    ModelRecord,
    envelope_reply,
    placement,
    retention_score,
)

# Long enough that no test's clock reaches it by accident.
NEVER_MS = 10**12


class Log:
    """Numbers events as the router does: seq 1, 2, 3, ... with a given ts."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.seq = 0

    def send(self, event, ts: int):
        self.seq += 1
        stamped = type(event)(
            **{**_fields(event), "seq": self.seq, "ts": ts, "id": f"e{self.seq}"}
        )
        return self.model.apply(stamped)


def _fields(event) -> dict:
    return {name: getattr(event, name) for name in event.__struct_fields__}


def slow_policy(**settings) -> Policy:
    """Return a policy whose idle times and half-life no test reaches, unless set."""
    defaults = {
        "stm_idle_ms": NEVER_MS,
        "im_idle_ms": NEVER_MS,
        "half_life_ms": NEVER_MS,
    }
    return Policy(**{**defaults, **settings})


def one_shard(**settings) -> tuple[Model, Log]:
    model = Model(1, slow_policy(**settings))
    return model, Log(model)


def test_store_then_get_served_by_cache():
    model, log = one_shard()
    log.send(
        Store(namespace="a", key="k", value={"x": 1}, importance=0.9, tags=["t"]),
        ts=1_000,
    )
    reply = log.send(Get(namespace="a", key="k"), ts=1_500)
    record = model.records[("a", "k")]
    assert reply == Value(
        id="e2",
        seq=2,
        key="k",
        value={"x": 1},
        tier="cache",
        importance=0.9,
        tags=["t"],
    )
    assert record.tier == "stm"
    assert record.accessed_ts == 1_500
    assert record.access_count == 1
    assert record.cache_touch == 2


def test_store_metadata_fields():
    model, log = one_shard()
    log.send(Store(namespace="a", key="k", value="abc", ttl_s=3), ts=1_000)
    record = model.records[("a", "k")]
    assert record.created_ts == 1_000
    assert record.updated_ts == 1_000
    assert record.version == 1
    assert record.tier_since_ts == 1_000
    assert record.expires_ts == 4_000
    # "abc" is a MessagePack fixstr: one header byte and three bytes.
    assert record.size == 4


def test_overwrite_keeps_history():
    model, log = one_shard()
    log.send(Store(namespace="a", key="k", value=1), ts=1_000)
    log.send(Get(namespace="a", key="k"), ts=1_100)
    log.send(Store(namespace="a", key="k", value=2, importance=0.2), ts=1_200)
    record = model.records[("a", "k")]
    assert record.created_ts == 1_000
    assert record.updated_ts == 1_200
    assert record.accessed_ts == 1_200
    assert record.version == 2
    assert record.access_count == 1
    assert record.tier_since_ts == 1_000
    assert record.importance == 0.2


def test_get_at_expiry_is_not_found():
    model, log = one_shard()
    log.send(Store(namespace="a", key="k", value=1, ttl_s=1), ts=1_000)
    before = log.send(Get(namespace="a", key="k"), ts=1_999)
    at = log.send(Get(namespace="a", key="k"), ts=2_000)
    assert isinstance(before, Value)
    assert at == NotFound(id="e3", seq=3, key="k")
    assert model.records[("a", "k")].access_count == 1
    assert model.records[("a", "k")].accessed_ts == 1_999


def test_store_after_expiry_starts_fresh_history():
    model, log = one_shard()
    log.send(Store(namespace="a", key="k", value=1, ttl_s=1), ts=1_000)
    log.send(Get(namespace="a", key="k"), ts=1_500)
    log.send(Store(namespace="a", key="k", value=2), ts=2_000)
    record = model.records[("a", "k")]
    assert record.created_ts == 2_000
    assert record.version == 1
    assert record.access_count == 0
    assert record.expires_ts is None


def test_get_missing_changes_nothing():
    model, log = one_shard(cache_capacity=1)
    log.send(Store(namespace="a", key="k", value=1), ts=1_000)
    reply = log.send(Get(namespace="a", key="nope"), ts=1_100)
    assert reply == NotFound(id="e2", seq=2, key="nope")
    assert model.cache_order(0) == [("a", "k")]


def test_cache_evicts_least_recently_used():
    model, log = one_shard(cache_capacity=2)
    log.send(Store(namespace="a", key="a", value=1), ts=1)
    log.send(Store(namespace="a", key="b", value=2), ts=2)
    log.send(Get(namespace="a", key="a"), ts=3)
    log.send(Store(namespace="a", key="c", value=3), ts=4)
    served = log.send(Get(namespace="a", key="b"), ts=5)
    assert served.tier == "stm"
    # The Get of b put it back in the cache and pushed out a, the oldest use.
    assert model.cache_order(0) == [("a", "c"), ("a", "b")]
    assert model.records[("a", "a")].cache_touch == 0
    assert model.records[("a", "c")].cache_touch == 4
    assert model.records[("a", "b")].cache_touch == 5


def test_forget_removes_record_and_cache_entry():
    model, log = one_shard()
    log.send(Store(namespace="a", key="k", value=1), ts=1)
    log.send(Forget(namespace="a", key="k"), ts=2)
    log.send(Forget(namespace="a", key="never"), ts=3)
    assert ("a", "k") not in model.records
    assert model.cache_order(0) == []


def test_maintain_moves_idle_then_capacity():
    model, log = one_shard(stm_idle_ms=100, stm_capacity=1)
    log.send(Store(namespace="a", key="a", value=1, importance=0.9), ts=0)
    log.send(Store(namespace="a", key="b", value=2, importance=0.1), ts=50)
    log.send(Store(namespace="a", key="c", value=3, importance=0.5), ts=90)
    log.send(Maintain(namespace="a"), ts=120)
    # a idled 120 ms (>= 100) and moves for being idle. Of b and c, one is
    # over capacity; b has the lower score (100 against 500) and moves.
    tiers = {key: record.tier for (_, key), record in model.records.items()}
    assert tiers == {"a": "im", "b": "im", "c": "stm"}
    assert model.records[("a", "a")].tier_since_ts == 120
    assert model.records[("a", "b")].tier_since_ts == 120
    assert model.records[("a", "c")].tier_since_ts == 90
    # Moves keep cache membership.
    assert model.cache_order(0) == [("a", "a"), ("a", "b"), ("a", "c")]


def test_maintain_idle_boundary_is_inclusive():
    model, log = one_shard(stm_idle_ms=100)
    log.send(Store(namespace="a", key="at", value=1), ts=0)
    log.send(Store(namespace="a", key="under", value=1), ts=1)
    log.send(Maintain(), ts=100)
    assert model.records[("a", "at")].tier == "im"
    assert model.records[("a", "under")].tier == "stm"


def test_ltm_eviction_ties_by_key():
    model, log = one_shard(stm_idle_ms=1, im_idle_ms=1, ltm_capacity=1)
    log.send(Store(namespace="a", key="y", value=1), ts=0)
    log.send(Store(namespace="a", key="x", value=2), ts=0)
    log.send(Maintain(), ts=10)
    # Both go STM -> IM -> LTM in one pass, with equal scores and equal
    # accessed_ts, so the smaller key sorts first and is evicted.
    assert list(model.records) == [("a", "y")]
    assert model.records[("a", "y")].tier == "ltm"
    assert model.cache_order(0) == [("a", "y")]


def test_ltm_eviction_ties_by_access():
    model, log = one_shard(stm_idle_ms=1, im_idle_ms=1, ltm_capacity=1)
    log.send(Store(namespace="a", key="a", value=1), ts=5)
    log.send(Store(namespace="a", key="b", value=2), ts=0)
    log.send(Maintain(), ts=10)
    assert list(model.records) == [("a", "a")]


def test_maintain_expires_first_and_leaves_cache():
    model, log = one_shard(stm_capacity=1)
    log.send(Store(namespace="a", key="old", value=1, ttl_s=1), ts=0)
    log.send(Store(namespace="a", key="new", value=2), ts=500)
    log.send(Maintain(), ts=1_000)
    # Expiry runs before the capacity move, so one record remains and fits.
    assert list(model.records) == [("a", "new")]
    assert model.records[("a", "new")].tier == "stm"
    assert model.cache_order(0) == [("a", "new")]


def test_maintain_one_namespace_leaves_others():
    model, log = one_shard(stm_idle_ms=1)
    log.send(Store(namespace="a", key="k", value=1), ts=0)
    log.send(Store(namespace="b", key="k", value=1), ts=0)
    log.send(Maintain(namespace="b"), ts=10)
    log.send(Maintain(namespace="zzz"), ts=10)
    assert model.records[("a", "k")].tier == "stm"
    assert model.records[("b", "k")].tier == "im"


def test_reads_never_move_records_up():
    model, log = one_shard(stm_idle_ms=1, cache_capacity=1)
    log.send(Store(namespace="a", key="k", value=1), ts=0)
    log.send(Store(namespace="a", key="other", value=1), ts=0)
    log.send(Maintain(), ts=10)
    reply = log.send(Get(namespace="a", key="k"), ts=20)
    assert reply.tier == "im"
    assert model.records[("a", "k")].tier == "im"


def test_retention_score_decays_and_counts_bits():
    policy = Policy(half_life_ms=100, access_weight=100)
    record = ModelRecord(
        namespace="a", key="k", value=1, tier="stm", importance=0.8, tags=(),
        created_ts=0, updated_ts=0, accessed_ts=0, access_count=3, version=1,
        tier_since_ts=0, expires_ts=None, cache_touch=0, size=1,
    )  # fmt: skip
    # 800 >> (250 // 100) = 200, plus 100 * bit_length(3) = 200.
    assert retention_score(record, 250, policy) == 400
    assert retention_score(record, 99, policy) == 1_000


def test_retention_score_rounds_half_to_even():
    record = ModelRecord(
        namespace="a", key="k", value=1, tier="stm", importance=0.0625, tags=(),
        created_ts=0, updated_ts=0, accessed_ts=0, access_count=0, version=1,
        tier_since_ts=0, expires_ts=None, cache_touch=0, size=1,
    )  # fmt: skip
    assert retention_score(record, 0, Policy()) == 62


def test_conditional_store_and_forget():
    model, log = one_shard()
    created = log.send(Store(namespace="a", key="k", value=1, expected_version=0), ts=1)
    stale = log.send(Store(namespace="a", key="k", value=2, expected_version=0), ts=2)
    updated = log.send(Store(namespace="a", key="k", value=3, expected_version=1), ts=3)
    wrong_forget = log.send(Forget(namespace="a", key="k", expected_version=1), ts=4)
    forgotten = log.send(Forget(namespace="a", key="k", expected_version=2), ts=5)
    assert created == Ack(id="e1", seq=1)
    assert stale == Conflict(
        id="e2", seq=2, key="k", expected_version=0, actual_version=1
    )
    assert updated == Ack(id="e3", seq=3)
    assert wrong_forget == Conflict(
        id="e4", seq=4, key="k", expected_version=1, actual_version=2
    )
    assert forgotten == Ack(id="e5", seq=5)
    assert ("a", "k") not in model.records


def test_conditional_store_sees_expired_key_as_version_zero():
    model, log = one_shard()
    log.send(Store(namespace="a", key="k", value=1, ttl_s=1), ts=0)
    reply = log.send(
        Store(namespace="a", key="k", value=2, expected_version=0), ts=1_000
    )
    assert reply == Ack(id="e2", seq=2)
    assert model.records[("a", "k")].version == 1


def test_unconditional_writes_get_router_ack():
    _, log = one_shard()
    assert log.send(Store(namespace="a", key="k", value=1), ts=1) is None
    assert log.send(Forget(namespace="a", key="k"), ts=2) is None
    assert log.send(Maintain(), ts=3) is None


def test_peek_records_no_access():
    model, log = one_shard()
    log.send(Store(namespace="a", key="k", value=1, ttl_s=1), ts=0)
    seen = model.peek("a", "k", seq=1, ts=500)
    gone = model.peek("a", "k", seq=1, ts=1_000)
    assert seen == Value(seq=1, key="k", value=1, tier="cache", importance=0.5, tags=[])
    assert gone == NotFound(seq=1, key="k")
    assert model.records[("a", "k")].access_count == 0


def test_envelope_classifies_ids():
    envelope = Envelope()
    first = Store(id="x", namespace="a", key="k", value=1)
    envelope.record(Store(id="x", namespace="a", key="k", value=1, seq=1, ts=5))
    assert envelope.classify(Store(id="y", namespace="a", key="k", value=1)) == IdUse(
        "new"
    )
    assert envelope.classify(first) == IdUse("duplicate", 1)
    assert envelope.classify(Store(id="x", namespace="a", key="k", value=2)) == IdUse(
        "conflict", 1
    )
    assert envelope.last_seq == 1


def test_envelope_rejects_id_logged_twice():
    envelope = Envelope()
    envelope.record(Get(id="x", key="k", seq=1, ts=0))
    with pytest.raises(AssertionError, match="logged twice"):
        envelope.record(Get(id="x", key="k", seq=2, ts=0))


def test_envelope_replies():
    store = Store(id="x", key="k", value=1)
    assert envelope_reply(store, IdUse("new"), 4) == Ack(id="x", seq=4)
    assert envelope_reply(store, IdUse("duplicate", 4), 4) == Ack(
        id="x", seq=4, duplicate=True
    )
    conflict = envelope_reply(store, IdUse("conflict", 4), None)
    assert isinstance(conflict, Error)
    assert conflict.code == ErrorCode.CONFLICT
    assert envelope_reply(Get(id="g", key="k"), IdUse("new"), 5) is None
    assert (
        envelope_reply(
            Store(id="c", key="k", value=1, expected_version=0), IdUse("new"), 6
        )
        is None
    )


def test_placement_is_xxh64_modulo_shards():
    for namespace in ("agent-1", "ns-a", "ünïcode", ""):
        expected = xxhash.xxh64_intdigest(namespace.encode()) % 3
        assert placement(namespace, 3) == expected
        assert shard_of(namespace, 3) == expected


def test_caches_are_per_shard():
    left, right = (
        "ns-a",
        next(
            name
            for name in ("ns-b", "ns-c", "ns-d", "ns-e")
            if placement(name, 2) != placement("ns-a", 2)
        ),
    )
    model = Model(2, slow_policy(cache_capacity=1))
    log = Log(model)
    log.send(Store(namespace=left, key="k", value=1), ts=0)
    log.send(Store(namespace=right, key="k", value=1), ts=0)
    assert model.cache_order(placement(left, 2)) == [(left, "k")]
    assert model.cache_order(placement(right, 2)) == [(right, "k")]


def test_search_matches_every_word():
    model, log = one_shard()
    log.send(
        Store(namespace="a", key="k1", value={"name": "Ada Lovelace"}, tags=["math"]),
        ts=0,
    )
    log.send(Store(namespace="a", key="k2", value=["Ada", 3]), ts=0)
    log.send(Store(namespace="b", key="k3", value="Ada"), ts=0)
    log.send(Store(namespace="a", key="k4", value="ada", ttl_s=1), ts=0)
    assert model.search_keys("a", "ada", 500) == {"k1", "k2", "k4"}
    assert model.search_keys("a", "ada", 1_000) == {"k1", "k2"}
    assert model.search_keys("a", "Ada math", 0) == {"k1"}
    assert model.search_keys("a", "nobody", 0) == set()
