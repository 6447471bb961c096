"""The projection runner against a real router, shards and Redis."""

from __future__ import annotations

import importlib.util
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from events.limits import value_size
from events.log import RedisEventLog
from events.types import Ack, Conflict, Forget, Get, Maintain, NotFound, Store, Value
from handlers.effects import Effect, RedisEffectLog
from handlers.policy import Policy
from handlers.sharding import shard_of
from replay.projections import (
    ProjectionError,
    TierUsage,
    audit,
    builtin_projections,
    follow_projections,
    history,
    run_projections,
    search,
    stats,
    wait_for_seq,
)
from replay.projections.runner import shard_watermarks
from tiers.redis_tier import RedisTier
from tiers.sqlite_tier import SqliteTier

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "word_count_projection.py"

# One shard each: xxh64 puts agent-1 on shard 0 and agent-3 on shard 1 of 2.
NS1, NS3 = "agent-1", "agent-3"
SHARDS = 2
POLICY = Policy(cache_capacity=4, im_capacity=2, ltm_capacity=1)
T0 = 1_700_000_000_000
HOUR = 3_600_000


def test_namespaces_are_on_both_shards():
    assert (shard_of(NS1, SHARDS), shard_of(NS3, SHARDS)) == (0, 1)


class Stack:
    """The servers of one test and the runner's view of them."""

    def __init__(self, servers, tmp_path: Path) -> None:
        self.servers = servers
        self.log_client = redis.Redis.from_url(servers.log.url)
        self.event_log = RedisEventLog(self.log_client)
        self.stm_client = redis.Redis.from_url(servers.stm.url)
        self.im_client = redis.Redis.from_url(servers.im.url)
        self.effect_log = RedisEffectLog(self.log_client)
        self.db = tmp_path / "projections.db"

    def run(self, db: Path | None = None, **kwargs):
        return run_projections(db or self.db, self.event_log, self.effect_log, self.stm_client, SHARDS, **kwargs)

    def append(self, *events) -> list:
        """Log events directly, with their own ts, as a router that then died would."""
        seq = self.event_log.last_seq()
        stamped = []
        for event in events:
            seq += 1
            stamped.append(type(event)(**{**_fields(event), "seq": seq, "id": event.id or uuid.uuid4().hex}))
        self.event_log.append(stamped, [0] * len(stamped))
        return stamped

    def actual_tiers(self) -> dict[tuple[str, str], str]:
        """Where every record is now, read from the tiers themselves."""
        found: dict[tuple[str, str], str] = {}
        for shard in range(SHARDS):
            tiers = [
                RedisTier("stm", self.stm_client, shard),
                RedisTier("im", self.im_client, shard),
                SqliteTier("ltm", self.servers.ltm_dir / f"ltm-{shard}.sqlite3", shard),
            ]
            for tier in tiers:
                for namespace, key, _ in tier.scan_meta():
                    found[(namespace, key)] = tier.name
                tier.close()
        return found

    def close(self) -> None:
        for client in (self.log_client, self.stm_client, self.im_client):
            client.close()


def _fields(event) -> dict:
    return {name: getattr(event, name) for name in event.__struct_fields__}


@pytest.fixture
def stack(servers, tmp_path) -> Iterator[Stack]:
    opened = Stack(servers, tmp_path)
    yield opened
    opened.close()


def scripted_history(stack: Stack) -> list:
    """Log a scenario whose maintenance outcome is known, before any shard starts.

    The Maintain comes two hours after the stores. k4's TTL has run out, so
    it is expired. Every other STM record is idle and moves to IM. IM is
    then over its capacity of 2, so the two lowest retention scores, k6
    then k5, move on to LTM. LTM is over its capacity of 1, so k6 is
    evicted. The pass covers every namespace, so agent-3's k1 moves to IM
    too.
    """
    return stack.append(
        Store(namespace=NS1, key="k1", value={"note": "ramen noodles for dinner"}, importance=0.9, tags=["food"], ts=T0),
        Store(namespace=NS1, key="k2", value=["trip to", "東京 next spring"], importance=0.8, ts=T0),
        Store(namespace=NS1, key="k3", value="the secret code is 42", ts=T0),
        Store(namespace=NS1, key="k4", value="temporary multi-agent note", ttl_s=60, ts=T0),
        Store(namespace=NS1, key="k5", value="pizza 🍕 tonight", importance=0.1, ts=T0),
        Store(namespace=NS1, key="k6", value="old notes in a.md", importance=0.0, ts=T0),
        Store(namespace=NS3, key="k1", value="ramen in another namespace", ts=T0),
        Get(id="read-k1", namespace=NS1, key="k1", ts=T0 + 1),
        Forget(id="forget-k3", namespace=NS1, key="k3", ts=T0 + 2),
        Maintain(id="maintain-1", ts=T0 + 2 * HOUR),
    )


def hit_tiers(stack: Stack, namespace: str, query: str) -> set[tuple[str, str]]:
    hits, _ = search(stack.db, namespace, query, 10)
    return {(hit.key, hit.tier) for hit in hits}


def test_projections_follow_router_traffic(start_router, stack):
    scripted = scripted_history(stack)
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.store("k7", "fresh ramen recipe", namespace=NS1)
        read_k2 = client.request(Get(id="read-k2", namespace=NS1, key="k2"))
        read_k3 = client.request(Get(id="read-k3", namespace=NS1, key="k3"))
        client.store("k8", "ramen with 東京 style broth", namespace=NS3)
        client.forget("k8", namespace=NS3)
        client.digest()
    assert isinstance(read_k2, Value)
    assert isinstance(read_k3, NotFound)

    report = stack.run()
    last_seq = stack.event_log.last_seq()
    assert report.complete
    assert report.events == last_seq
    assert report.checkpoints == {"search": last_seq, "stats": last_seq, "history": last_seq}

    # Search: tiers after the moves; forgotten, expired and evicted keys gone.
    assert hit_tiers(stack, NS1, "ramen") == {("k1", "im"), ("k7", "stm")}
    assert hit_tiers(stack, NS3, "ramen") == {("k1", "im")}
    assert hit_tiers(stack, NS1, "東京") == {("k2", "im")}
    assert hit_tiers(stack, NS1, "🍕") == {("k5", "ltm")}
    assert hit_tiers(stack, NS1, "food") == {("k1", "im")}
    assert hit_tiers(stack, NS1, "secret") == set()
    assert hit_tiers(stack, NS1, "multi-agent") == set()
    assert hit_tiers(stack, NS1, "a.md") == set()
    assert hit_tiers(stack, NS3, "broth") == set()
    _, index_seq = search(stack.db, NS1, "ramen", 10)
    assert index_seq == last_seq
    actual = stack.actual_tiers()
    for namespace, query in ((NS1, "ramen"), (NS1, "東京"), (NS1, "pizza"), (NS3, "ramen")):
        for key, tier in hit_tiers(stack, namespace, query):
            assert actual[(namespace, key)] == tier, (namespace, key)

    # Stats: records and bytes per tier, reads by serving tier.
    (ns1,) = stats(stack.db, NS1).namespaces
    assert ns1.tiers == {
        "stm": TierUsage(records=1, bytes=value_size("fresh ramen recipe")),
        "im": TierUsage(records=2, bytes=value_size({"note": "ramen noodles for dinner"}) + value_size(["trip to", "東京 next spring"])),
        "ltm": TierUsage(records=1, bytes=value_size("pizza 🍕 tonight")),
    }
    assert sum(ns1.reads.values()) == 3
    assert ns1.reads["miss"] == 1
    (ns3,) = stats(stack.db, NS3).namespaces
    assert ns3.tiers["im"] == TierUsage(records=1, bytes=value_size("ramen in another namespace"))
    assert ns3.tiers["stm"] == TierUsage()

    # History: stores, moves and deletes with reasons, reads with their tier.
    k6 = [(e.kind, e.tier, e.target, e.reason) for e in history(stack.db, NS1, "k6")]
    assert k6 == [
        ("store", "stm", None, None),
        ("move", "stm", "im", "idle"),
        ("move", "im", "ltm", "capacity"),
        ("delete", "ltm", None, "evicted"),
    ]
    k4 = [(e.kind, e.tier, e.reason) for e in history(stack.db, NS1, "k4")]
    assert k4 == [("store", "stm", None), ("delete", "stm", "expired")]
    k2 = history(stack.db, NS1, "k2")
    assert [e.kind for e in k2] == ["store", "move", "read"]
    assert (k2[-1].tier, k2[-1].request_id) == (read_k2.tier, "read-k2")
    k3 = history(stack.db, NS1, "k3")
    assert [(e.kind, e.tier) for e in k3] == [("store", "stm"), ("forget", "stm"), ("read", None)]
    assert [e.request_id for e in k3[1:]] == ["forget-k3", "read-k3"]
    assert k3[1].seq == scripted[8].seq
    assert [e.key for e in audit(stack.db, NS1, T0 + 2 * HOUR) if e.kind == "move"] == ["k1", "k2", "k5", "k6", "k6", "k5"]


def test_report_has_stage_timings(start_router, stack):
    scripted_history(stack)
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.digest()
    report = stack.run()
    search_stages = report.projections["search"].stages
    assert [stage.name for stage in search_stages] == ["documents", "tiers"]
    assert [stage.events for stage in search_stages] == [report.events, report.events]
    assert all(stage.seconds > 0 for stage in search_stages)
    assert report.projections["history"].error is None


def test_unapplied_events_not_consumed(start_router, stack):
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.store("k1", "applied memory", namespace=NS1)
        client.store("k1", "applied memory", namespace=NS3)
        client.digest()
    router.stop()
    applied = stack.event_log.last_seq()
    # Logged but never applied, as when the router dies right after the
    # append: a Store for each shard, the later one already applied nowhere.
    stack.append(
        Store(namespace=NS3, key="k2", value="unapplied on shard one", ts=T0),
        Store(namespace=NS1, key="k2", value="unapplied on shard zero", ts=T0),
    )
    assert shard_watermarks(stack.stm_client, SHARDS) == [applied - 1, applied]

    report = stack.run()
    assert report.readable_end == applied
    assert report.checkpoints == {"search": applied, "stats": applied, "history": applied}
    assert hit_tiers(stack, NS1, "unapplied") == set()
    assert hit_tiers(stack, NS3, "unapplied") == set()
    assert hit_tiers(stack, NS1, "applied") == {("k1", "stm")}

    # A new router's shards catch up from the log; then both are readable.
    again = start_router(SHARDS, policy=POLICY)
    with again.client() as client:
        client.digest()
    later = stack.run()
    assert later.events == 2
    assert hit_tiers(stack, NS1, "unapplied") == {("k2", "stm")}
    assert hit_tiers(stack, NS3, "unapplied") == {("k2", "stm")}


def test_effects_past_watermark_not_consumed(start_router, stack):
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.store("k1", "still here", namespace=NS1)
        client.digest()
    router.stop()
    applied = stack.event_log.last_seq()
    # A shard writes a batch's effects before it commits the batch. This one
    # died between the two, so the Maintain and its delete are not readable.
    (maintain,) = stack.append(Maintain(ts=T0))
    stack.effect_log.append(shard_of(NS1, SHARDS), [Effect(maintain.seq, "delete", NS1, "k1", tier="stm", reason="evicted")])

    report = stack.run()
    assert report.readable_end == applied
    assert report.checkpoints["search"] == applied
    assert hit_tiers(stack, NS1, "still") == {("k1", "stm")}
    assert history(stack.db, NS1, "k1")[-1].kind == "store"


def test_idle_shard_does_not_stall(start_router, stack):
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.store("k1", "early", namespace=NS3)
        for index in range(5):
            client.store(f"k{index}", "only shard zero gets these", namespace=NS1)
        client.digest()
    watermarks = shard_watermarks(stack.stm_client, SHARDS)
    last_seq = stack.event_log.last_seq()
    assert watermarks[1] < last_seq  # shard 1 has had nothing to apply since
    report = stack.run()
    assert report.readable_end == last_seq
    assert report.checkpoints["search"] == last_seq
    assert len(search(stack.db, NS1, "shard zero", 10)[0]) == 5


def test_word_count_example_runs_with_builtins(start_router, stack):
    scripted_history(stack)
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.store("k9", "three more words", namespace=NS1)
        client.digest()
    report = stack.run(projections=[*builtin_projections(), f"{EXAMPLE}:projection"])
    assert report.checkpoints["word_count"] == stack.event_log.last_seq()
    example = _load_example()
    # agent-1 keeps k1 (4 words), k2 (5), k5 (3, the emoji is a word) and
    # k9 (3); k3 was forgotten, k4 expired and k6 evicted.
    assert example.word_counts(stack.db) == {NS1: 4 + 5 + 3 + 3, NS3: 4}

    with router.client() as client:
        client.request(Forget(namespace=NS3))
        client.digest()
    stack.run(projections=[*builtin_projections(), f"{EXAMPLE}:projection"])
    assert example.word_counts(stack.db) == {NS1: 4 + 5 + 3 + 3}


def _load_example():
    spec = importlib.util.spec_from_file_location("word_count_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_max_seconds_stops_between_batches(start_router, stack):
    scripted_history(stack)
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.digest()
    report = stack.run(max_seconds=0.0)
    assert not report.complete
    assert report.events == 0
    assert stack.run().complete


def test_follow_keeps_index_fresh(start_router, stack):
    router = start_router(SHARDS, policy=POLICY)
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_projections,
        args=(stack.db, stack.event_log, stack.effect_log, stack.stm_client, SHARDS),
        kwargs={"stop": stop, "poll_interval": 0.01},
        name="projections",
    )
    follower.start()
    try:
        with router.client() as client:
            first = client.store("k1", "fresh words", namespace=NS1)
            second = client.store("k1", "fresher words", namespace=NS3)
        assert wait_for_seq(stack.db, first.seq, timeout=30)
        assert wait_for_seq(stack.db, second.seq, timeout=30)
    finally:
        stop.set()
        follower.join(timeout=30)
    assert not follower.is_alive()
    assert hit_tiers(stack, NS1, "fresh") == {("k1", "stm")}
    assert hit_tiers(stack, NS3, "fresher") == {("k1", "stm")}


def test_database_of_another_log_rejected(start_router, stack):
    scripted_history(stack)
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.digest()
    router.stop()
    stack.run()
    stack.log_client.flushall()  # a new, empty log; the database is now stale
    with pytest.raises(ProjectionError, match="past the log's last seq 0, so the database was built from another log"):
        stack.run()


def test_rejected_conditional_write_changes_nothing(start_router, stack):
    router = start_router(SHARDS, policy=POLICY)
    with router.client() as client:
        client.store("k1", "first version", namespace=NS1)
        rejected = client.request(Store(id="stale-write", namespace=NS1, key="k1", value="stale version", expected_version=7))
        accepted = client.request(Store(namespace=NS1, key="k1", value="second version", expected_version=1))
        client.digest()
    assert isinstance(rejected, Conflict)
    assert isinstance(accepted, Ack)
    stack.run()
    assert hit_tiers(stack, NS1, "stale") == set()
    assert hit_tiers(stack, NS1, "second") == {("k1", "stm")}
    (ns1,) = stats(stack.db, NS1).namespaces
    assert ns1.tiers["stm"] == TierUsage(records=1, bytes=value_size("second version"))
    kinds = [(e.kind, e.reason, e.request_id) for e in history(stack.db, NS1, "k1")]
    assert kinds[1] == ("conflict", "7:1", "stale-write")
    assert [kind for kind, _, _ in kinds] == ["store", "conflict", "store"]
