"""The stats projection: tier usage, reads, hot and cold keys."""

from __future__ import annotations

import pytest

from events.limits import value_size
from events.types import Forget, Get, Maintain, Store
from handlers.effects import Effect
from replay.projections import DatabaseNotFoundError, EventWithEffects, TierUsage, cold_keys, hot_keys, stats
from replay.projections.db import connect, create_core_tables, write_checkpoint, write_transaction
from replay.projections.stats import stats_projection


class Log:
    def __init__(self, db_path) -> None:
        self.db_path = db_path
        self.seq = 0
        self.projection = stats_projection()
        conn = connect(db_path)
        with write_transaction(conn):
            create_core_tables(conn)
            self.projection.setup(conn)
        conn.close()

    def store(self, key: str, value, namespace: str = "a") -> None:
        self.apply_event(lambda seq, ts: Store(seq=seq, ts=ts, namespace=namespace, key=key, value=value), ())

    def forget(self, key: str, namespace: str = "a") -> None:
        self.apply_event(lambda seq, ts: Forget(seq=seq, ts=ts, namespace=namespace, key=key), ())

    def get(self, key: str, served: str | None, namespace: str = "a") -> None:
        self.apply_event(
            lambda seq, ts: Get(seq=seq, ts=ts, namespace=namespace, key=key),
            lambda seq: (Effect(seq, "read", namespace, key, tier=served, client=f"r{seq}"),),
        )

    def maintain(self, *changes: tuple) -> None:
        def effects(seq):
            return tuple(Effect(seq, kind, "a", key, tier=tier, target=target, reason=reason) for kind, key, tier, target, reason in changes)

        self.apply_event(lambda seq, ts: Maintain(seq=seq, ts=ts), effects)

    def apply_event(self, make_event, make_effects) -> None:
        self.seq += 1
        event = make_event(self.seq, 1000 * self.seq)
        effects = make_effects(self.seq) if callable(make_effects) else make_effects
        conn = connect(self.db_path)
        with write_transaction(conn):
            self.projection.apply(conn, [EventWithEffects(event, effects)])
            write_checkpoint(conn, self.projection.name, self.seq, event.ts)
        conn.close()


@pytest.fixture
def log(tmp_path) -> Log:
    return Log(tmp_path / "projections.db")


def tiers_of(log: Log, namespace: str = "a") -> dict[str, TierUsage]:
    (only,) = stats(log.db_path, namespace).namespaces
    return only.tiers


def test_stats_counts_and_bytes_per_tier(log):
    log.store("k1", "x" * 10)
    log.store("k2", {"a": [1, 2]})
    assert tiers_of(log) == {
        "stm": TierUsage(records=2, bytes=value_size("x" * 10) + value_size({"a": [1, 2]})),
        "im": TierUsage(),
        "ltm": TierUsage(),
    }


def test_stats_overwrite_replaces_bytes(log):
    log.store("k", "short")
    log.store("k", "a much longer value")
    assert tiers_of(log)["stm"] == TierUsage(records=1, bytes=value_size("a much longer value"))


def test_stats_follow_moves_deletes_and_forgets(log):
    for key in ("k1", "k2", "k3"):
        log.store(key, key)
    size = value_size("k1")
    log.maintain(("move", "k1", "stm", "im", "capacity"), ("move", "k1", "im", "ltm", "capacity"), ("move", "k2", "stm", "im", "idle"))
    assert tiers_of(log) == {"stm": TierUsage(records=1, bytes=size), "im": TierUsage(records=1, bytes=size), "ltm": TierUsage(records=1, bytes=size)}
    log.maintain(("delete", "k1", "ltm", None, "evicted"))
    log.forget("k2")
    log.forget("never-stored")
    assert tiers_of(log) == {"stm": TierUsage(records=1, bytes=size), "im": TierUsage(), "ltm": TierUsage()}


def test_stats_store_brings_key_back_to_stm(log):
    log.store("k", "v")
    log.maintain(("move", "k", "stm", "im", "idle"))
    log.store("k", "v2")
    assert tiers_of(log) == {"stm": TierUsage(records=1, bytes=value_size("v2")), "im": TierUsage(), "ltm": TierUsage()}


def test_stats_reads_by_serving_tier(log):
    log.store("k", "v")
    log.get("k", "cache")
    log.get("k", "cache")
    log.get("k", "stm")
    log.get("missing", None)
    (only,) = stats(log.db_path, "a").namespaces
    assert only.reads == {"cache": 2, "miss": 1, "stm": 1}


def test_stats_all_namespaces_sorted(log):
    log.store("k", "v", namespace="b")
    log.store("k", "v", namespace="a")
    log.get("k", None, namespace="c")
    report = stats(log.db_path)
    assert [item.namespace for item in report.namespaces] == ["a", "b", "c"]
    assert report.seq == 3


def test_stats_unknown_namespace_is_zero(log):
    (only,) = stats(log.db_path, "nobody").namespaces
    assert only.tiers == {"stm": TierUsage(), "im": TierUsage(), "ltm": TierUsage()}
    assert only.reads == {}


def test_hot_and_cold_keys(log):
    for key in ("a", "b", "c", "d"):
        log.store(key, key)
    for key, reads in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(reads):
            log.get(key, "cache")
    hot = hot_keys(log.db_path, "a", 2)
    cold = cold_keys(log.db_path, "a", 2)
    assert [(item.key, item.access_count) for item in hot] == [("a", 3), ("c", 2)]
    assert [(item.key, item.access_count) for item in cold] == [("d", 0), ("b", 1)]
    assert hot[0].last_access_ts == 7000  # the third read of "a" is event 7
    assert cold[0].last_access_ts is None


def test_hot_keys_tie_break_by_recent_read(log):
    log.store("x", "v")
    log.store("y", "v")
    log.get("x", "cache")
    log.get("y", "cache")
    assert [item.key for item in hot_keys(log.db_path, "a", 2)] == ["y", "x"]
    assert [item.key for item in cold_keys(log.db_path, "a", 2)] == ["x", "y"]


def test_access_count_survives_overwrite_not_forget(log):
    log.store("k", "v")
    log.get("k", "cache")
    log.store("k", "v2")
    assert hot_keys(log.db_path, "a", 1)[0].access_count == 1
    log.forget("k")
    log.store("k", "v3")
    assert hot_keys(log.db_path, "a", 1)[0].access_count == 0


def test_stats_missing_database(tmp_path):
    with pytest.raises(DatabaseNotFoundError, match="the projections have not run there yet"):
        stats(tmp_path / "absent.db")


def test_stats_skip_rejected_conditional_write(log):
    log.store("k", "v")
    log.apply_event(
        lambda seq, ts: Store(seq=seq, ts=ts, namespace="a", key="k", value="much longer value", expected_version=7),
        lambda seq: (Effect(seq, "conflict", "a", "k", reason="7:1"),),
    )
    assert tiers_of(log)["stm"] == TierUsage(records=1, bytes=value_size("v"))


def test_store_over_expired_record_resets_reads(log):
    log.apply_event(lambda seq, ts: Store(seq=seq, ts=ts, namespace="a", key="k", value="v", ttl_s=1), ())
    log.get("k", "cache")
    log.store("k", "v2")  # 2 s later: the TTL of 1 s has run out
    (only,) = hot_keys(log.db_path, "a", 1)
    assert only.access_count == 0
    assert only.last_access_ts is None
    assert tiers_of(log)["stm"] == TierUsage(records=1, bytes=value_size("v2"))


def test_stats_forget_namespace_drops_rows(log):
    for key in ("k1", "k2"):
        log.store(key, key)
        log.store(key, key, namespace="b")
    log.get("k1", "stm")
    log.get("k1", "cache", namespace="b")
    log.maintain(("move", "k2", "stm", "im", "idle"))

    log.apply_event(lambda seq, ts: Forget(seq=seq, ts=ts, namespace="a"), ())

    (forgotten,) = stats(log.db_path, "a").namespaces
    assert forgotten.tiers == {"stm": TierUsage(), "im": TierUsage(), "ltm": TierUsage()}
    assert forgotten.reads == {}
    assert hot_keys(log.db_path, "a") == []
    assert [item.namespace for item in stats(log.db_path).namespaces] == ["b"]
    (kept,) = stats(log.db_path, "b").namespaces
    assert kept.tiers["stm"] == TierUsage(records=2, bytes=2 * value_size("k1"))
    assert kept.reads == {"cache": 1}
