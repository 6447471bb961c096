"""The tier contract, run against every backend, and backend-specific guarantees.

`TestTierContract` runs once per backend: MemoryTier, RedisTier on a private
redis-server started here, RedisTier on the session's 3-primary Redis Cluster
(the `redis_cluster` fixture), and SqliteTier on a file under tmp_path.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing

import msgspec
import pytest
import redis
from redis.crc import key_slot

from tiermem.servers import RedisServer, wait_until
from tiers import (
    LTM_COMPRESSION,
    CorruptDataError,
    MemoryTier,
    Meta,
    Record,
    RedisTier,
    SqliteTier,
    StorageError,
    Tier,
    TierWrites,
    digest_records,
)
from tiers.codec import RAW, ZSTD
from tiers.redis_tier import RedisClient, client_from_url

pytestmark = pytest.mark.integration

# Small enough that the 5,000-record tests read 50 chunks or pages.
CHUNK_SIZE = 100

BACKENDS = ("memory", "redis", "redis-cluster", "sqlite")

# The tier each backend serves in production, so each runs with the
# compression of that tier: none, zstd 3, none and zstd 12.
BACKEND_TIER = {
    "memory": "stm",
    "redis": "im",
    "redis-cluster": "stm",
    "sqlite": "ltm",
}

TierFactory = Callable[..., Tier]


def make_meta(**changes: object) -> Meta:
    meta = Meta(
        importance=0.5,
        tags=("chat",),
        created_ts=1_700_000_000_000,
        updated_ts=1_700_000_000_000,
        accessed_ts=1_700_000_000_000,
        access_count=0,
        version=1,
        tier_since_ts=1_700_000_000_000,
    )
    return msgspec.structs.replace(meta, **changes)


_DEFAULT_VALUE = object()


def make_record(
    namespace: str, key: str, value: object = _DEFAULT_VALUE, **meta_changes
) -> Record:
    if value is _DEFAULT_VALUE:
        value = {"text": f"memory {namespace}/{key}"}
    return Record(namespace, key, value, make_meta(**meta_changes))


def puts(*records: Record) -> TierWrites:
    return TierWrites(puts=list(records))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("tiers-redis"), role="stm")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server) -> Iterator[redis.Redis]:
    client = redis_server.client()
    # The server is private to this module, so emptying it between tests
    # cannot touch anyone else's data.
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def redis_cluster_client(redis_cluster) -> Iterator[RedisClient]:
    client = client_from_url(redis_cluster.url)
    # The cluster is private to this test session, and each test that uses
    # it empties it first.
    client.flushall(target_nodes=client.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def make_tier(request, tmp_path) -> Iterator[TierFactory]:
    """Return a factory of tiers, closed when the test ends."""
    opened: list[Tier] = []

    def make(backend: str, name: str | None = None, shard: int = 0, **options) -> Tier:
        name = name or BACKEND_TIER[backend]
        if backend == "memory":
            tier = MemoryTier(name, shard, **options)
        elif backend == "redis":
            client = request.getfixturevalue("redis_client")
            tier = RedisTier(name, client, shard, chunk_size=CHUNK_SIZE, **options)
        elif backend == "redis-cluster":
            client = request.getfixturevalue("redis_cluster_client")
            tier = RedisTier(name, client, shard, chunk_size=CHUNK_SIZE, **options)
        elif backend == "sqlite":
            path = tmp_path / f"{name}-{shard}-{len(opened)}.db"
            tier = SqliteTier(name, path, shard, chunk_size=CHUNK_SIZE, **options)
        else:
            raise ValueError(f"unknown backend {backend!r}")
        opened.append(tier)
        return tier

    yield make
    for tier in opened:
        tier.close()


@pytest.fixture(params=BACKENDS)
def tier(request, make_tier) -> Tier:
    return make_tier(request.param)


def assert_unchanged(tier: Tier, watermark: int, records: list[Record]) -> None:
    assert tier.watermark() == watermark
    assert list(tier.records()) == records


class TestTierContract:
    def test_tier_satisfies_protocol(self, tier):
        assert isinstance(tier, Tier)

    def test_empty_tier(self, tier):
        assert tier.watermark() == 0
        assert tier.get("ns", "k") is None
        assert tier.get_many([("ns", "k")]) == {}
        assert list(tier.records()) == []
        assert list(tier.scan_meta()) == []
        assert tier.control("snapshot") is None
        assert tier.digest() == digest_records([])

    def test_put_then_get(self, tier):
        record = make_record("agent-1", "greeting", {"text": "hello", "n": [1, 2]})

        tier.commit(puts(record), watermark=1)

        assert tier.get("agent-1", "greeting") == record

    def test_get_many_returns_only_existing(self, tier):
        first = make_record("a", "1")
        second = make_record("b", "2")
        tier.commit(puts(first, second), watermark=1)

        found = tier.get_many([("a", "1"), ("a", "missing"), ("b", "2"), ("a", "1")])

        assert found == {("a", "1"): first, ("b", "2"): second}

    def test_get_many_of_no_keys(self, tier):
        tier.commit(puts(make_record("a", "1")), watermark=1)

        assert tier.get_many([]) == {}

    def test_keys_given_as_lists(self, tier):
        record = make_record("ns", "k")
        tier.commit(puts(record, make_record("ns", "gone")), watermark=1)

        tier.commit(TierWrites(deletes=[["ns", "gone"]]), watermark=2)

        assert tier.get_many([["ns", "k"], ["ns", "gone"]]) == {("ns", "k"): record}

    def test_put_replaces_whole_record(self, tier):
        tier.commit(puts(make_record("ns", "k", {"old": True}, importance=0.1)), 1)
        replacement = make_record("ns", "k", ["new"], importance=0.9, version=2)

        tier.commit(puts(replacement), watermark=2)

        assert tier.get("ns", "k") == replacement

    def test_repeated_put_in_one_commit_keeps_last(self, tier):
        last = make_record("ns", "k", "second", version=2)

        tier.commit(puts(make_record("ns", "k", "first"), last), watermark=1)

        assert list(tier.records()) == [last]

    def test_touch_changes_only_meta(self, tier):
        record = make_record("ns", "k", {"text": "keep me"})
        tier.commit(puts(record), watermark=1)
        touched = make_meta(
            accessed_ts=1_700_000_009_000, access_count=5, cache_touch=2
        )

        tier.commit(TierWrites(touches=[("ns", "k", touched)]), watermark=2)

        stored = tier.get("ns", "k")
        assert stored.value == {"text": "keep me"}
        assert stored.meta == touched

    def test_touch_of_missing_record_ignored(self, tier):
        tier.commit(TierWrites(touches=[("ns", "absent", make_meta())]), watermark=1)

        assert tier.get("ns", "absent") is None
        assert list(tier.scan_meta()) == []
        assert tier.watermark() == 1

    def test_delete_removes_record(self, tier):
        kept = make_record("ns", "kept")
        tier.commit(puts(kept, make_record("ns", "gone")), watermark=1)

        tier.commit(TierWrites(deletes=[("ns", "gone")]), watermark=2)

        assert tier.get("ns", "gone") is None
        assert list(tier.records()) == [kept]
        assert [(ns, key) for ns, key, _ in tier.scan_meta()] == [("ns", "kept")]

    def test_delete_of_missing_record_succeeds(self, tier):
        tier.commit(TierWrites(deletes=[("ns", "never")]), watermark=3)

        assert tier.watermark() == 3

    def test_commit_writes_watermark_with_records(self, tier):
        record = make_record("ns", "k")

        tier.commit(puts(record), watermark=17, control={"cache": b"\x01\x02"})

        assert tier.get("ns", "k") == record
        assert tier.watermark() == 17
        assert tier.control("cache") == b"\x01\x02"

    def test_empty_commit_advances_watermark(self, tier):
        tier.commit(TierWrites(), watermark=9)

        assert tier.watermark() == 9

    def test_commit_control_none_deletes_entry(self, tier):
        tier.commit(TierWrites(), watermark=1, control={"a": b"1", "b": b"2"})

        tier.commit(TierWrites(), watermark=2, control={"a": None})

        assert tier.control("a") is None
        assert tier.control("b") == b"2"

    def test_put_control_sets_and_deletes(self, tier):
        tier.put_control("snapshot", b"seq=10")
        assert tier.control("snapshot") == b"seq=10"

        tier.put_control("snapshot", None)
        assert tier.control("snapshot") is None

    def test_put_control_leaves_watermark(self, tier):
        tier.commit(TierWrites(), watermark=5)

        tier.put_control("snapshot", b"x")

        assert tier.watermark() == 5

    def test_control_values_not_in_digest(self, tier):
        tier.commit(puts(make_record("ns", "k")), watermark=1)
        before = tier.digest()

        tier.commit(TierWrites(), watermark=2, control={"cache": b"state"})
        tier.put_control("snapshot", b"seq=2")

        assert tier.digest() == before

    def test_control_name_of_watermark_rejected(self, tier):
        with pytest.raises(ValueError, match="reserved for the watermark"):
            tier.put_control("wm", b"5")
        with pytest.raises(ValueError, match="reserved for the watermark"):
            tier.commit(TierWrites(), watermark=1, control={"wm": b"5"})
        with pytest.raises(ValueError, match="reserved for the watermark"):
            tier.control("wm")
        assert tier.watermark() == 0

    def test_control_value_must_be_bytes(self, tier):
        with pytest.raises(TypeError, match="has type str"):
            tier.put_control("snapshot", "text")

    def test_commit_rejects_record_in_two_lists(self, tier):
        tier.commit(puts(make_record("ns", "k")), watermark=1)
        before = list(tier.records())
        writes = TierWrites(
            puts=[make_record("ns", "other")], deletes=[("ns", "other")]
        )

        with pytest.raises(
            ValueError, match=r"\('ns', 'other'\) is in both puts and deletes"
        ):
            tier.commit(writes, watermark=2)

        assert_unchanged(tier, 1, before)

    @pytest.mark.parametrize(
        "namespace, key",
        [("ns\0x", "k"), ("ns", "k\0x")],
        ids=["namespace", "key"],
    )
    def test_commit_rejects_nul(self, tier, namespace, key):
        with pytest.raises(ValueError, match="must not contain NUL"):
            tier.commit(puts(make_record(namespace, key)), watermark=1)

        assert_unchanged(tier, 0, [])

    @pytest.mark.parametrize("watermark", [-1, 1.5, True])
    def test_commit_rejects_invalid_watermark(self, tier, watermark):
        with pytest.raises(ValueError, match="watermark .* is invalid"):
            tier.commit(puts(make_record("ns", "k")), watermark=watermark)

        assert_unchanged(tier, 0, [])

    def test_unencodable_value_changes_nothing(self, tier):
        writes = puts(
            make_record("ns", "good"), make_record("ns", "bad", {"complex": 1j})
        )

        with pytest.raises(TypeError):
            tier.commit(writes, watermark=1)

        assert_unchanged(tier, 0, [])

    def test_records_sorted_by_namespace_then_key(self, tier):
        identities = [
            ("b", "a"),
            ("a", "z"),
            ("a b", "k"),
            ("ab", "k"),
            ("a", ""),
            ("", "k"),
            ("a", "Z"),
            ("é", "k"),
            ("a", "\U0001f600"),
            ("a", "\uffff"),
            ("a", "ab"),
            ("a", "a"),
        ]
        tier.commit(puts(*[make_record(ns, key) for ns, key in identities]), 1)

        listed = [(record.namespace, record.key) for record in tier.records()]

        assert listed == sorted(identities)

    def test_scan_and_records_complete_for_5000(self, tier):
        expected = [
            make_record(f"agent-{i % 7}", f"memory-{i:05d}", {"i": i}, access_count=i)
            for i in range(5000)
        ]
        for start in range(0, 5000, 1000):
            tier.commit(puts(*expected[start : start + 1000]), watermark=start + 1000)

        scanned = list(tier.scan_meta())
        listed = list(tier.records())
        fetched = tier.get_many([(r.namespace, r.key) for r in expected])

        assert len(scanned) == 5000
        assert {(ns, key): meta for ns, key, meta in scanned} == {
            (r.namespace, r.key): r.meta for r in expected
        }
        assert listed == sorted(expected, key=lambda r: (r.namespace, r.key))
        assert len(fetched) == 5000
        assert tier.digest() == (digest_records(expected)[0], 5000)

    @pytest.mark.parametrize("count", [CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1])
    def test_records_complete_at_chunk_boundary(self, tier, count):
        expected = [make_record("ns", f"{i:04d}") for i in range(count)]
        tier.commit(puts(*expected), watermark=1)

        assert list(tier.records()) == expected
        assert len(list(tier.scan_meta())) == count

    def test_values_round_trip_every_kind(self, tier):
        values = {
            "none": None,
            "true": True,
            "false": False,
            "int64-max": 2**63 - 1,
            "int64-min": -(2**63),
            "uint64-max": 2**64 - 1,
            "float": 3.141592653589793,
            "float-max": 1.7976931348623157e308,
            "unicode": "Grüße, 世界 🧠",
            "100KiB": "memory " * (100 * 1024 // 7),
            "empty-list": [],
            "empty-dict": {},
            "nested": {"a": [{"b": [1, 2.5, None, "x"]}, {"c": {"d": True}}]},
        }
        tier.commit(
            puts(*[make_record("kinds", name, v) for name, v in values.items()]), 1
        )

        stored = {r.key: r.value for r in tier.records()}

        for name, value in values.items():
            assert stored[name] == value, name
            assert type(stored[name]) is type(value), name

    def test_mutating_returned_value_isolated(self, tier):
        tier.commit(puts(make_record("ns", "k", {"items": [1, 2]})), watermark=1)

        tier.get("ns", "k").value["items"].append(3)
        next(tier.records()).value["extra"] = True

        assert tier.get("ns", "k").value == {"items": [1, 2]}

    def test_mutating_committed_value_isolated(self, tier):
        value = {"items": [1, 2]}
        tier.commit(puts(make_record("ns", "k", value)), watermark=1)

        value["items"].append(3)

        assert tier.get("ns", "k").value == {"items": [1, 2]}

    def test_clear_removes_everything(self, tier):
        tier.commit(puts(make_record("ns", "k")), watermark=4, control={"a": b"1"})
        tier.put_control("b", b"2")

        tier.clear()

        assert tier.watermark() == 0
        assert list(tier.records()) == []
        assert tier.control("a") is None
        assert tier.control("b") is None
        assert tier.digest() == digest_records([])

    def test_commit_after_clear(self, tier):
        tier.commit(puts(make_record("ns", "old")), watermark=4)
        tier.clear()
        record = make_record("ns", "new")

        tier.commit(puts(record), watermark=1)

        assert list(tier.records()) == [record]
        assert tier.watermark() == 1

    def test_digest_matches_digest_of_records(self, tier):
        records = [
            make_record("ns", f"k{i}", {"i": i, "s": "x" * i}) for i in range(20)
        ]
        tier.commit(puts(*records), watermark=1)

        assert tier.digest() == digest_records(records)

    @pytest.mark.parametrize(
        "name, shard, message",
        [
            ("cache", 0, "tier name 'cache' is invalid"),
            ("stm", -1, "shard -1 is invalid"),
        ],
    )
    def test_constructor_rejects_invalid_identity(
        self, make_tier, name, shard, message
    ):
        for backend in BACKENDS:
            with pytest.raises(ValueError, match=message):
                make_tier(backend, name=name, shard=shard)


def _history(records: list[Record]) -> list[tuple[TierWrites, int]]:
    """Return commits that end with exactly `records`, using touches and deletes."""
    stale = [msgspec.structs.replace(r, value={"stale": r.key}) for r in records]
    doomed = [make_record("doomed", f"d{i}") for i in range(5)]
    return [
        (TierWrites(puts=stale + doomed), 1),
        (TierWrites(puts=records[: len(records) // 2]), 2),
        (
            TierWrites(
                puts=records[len(records) // 2 :],
                deletes=[(d.namespace, d.key) for d in doomed],
            ),
            3,
        ),
        (TierWrites(touches=[(r.namespace, r.key, r.meta) for r in records]), 4),
    ]


def _all_backends(make_tier) -> list[Tier]:
    return [
        make_tier("memory", name="ltm", compression=LTM_COMPRESSION),
        make_tier("memory", name="stm"),
        make_tier("redis", name="stm", shard=1),
        make_tier("redis", name="im", shard=2),
        make_tier("redis-cluster", name="im", shard=3),
        make_tier("sqlite", name="ltm"),
    ]


class TestDigestAcrossBackends:
    def test_digest_identical_across_backends(self, make_tier):
        records = [
            make_record(
                f"agent-{i % 4}",
                f"k{i:03d}",
                {"text": "memory " * i, "i": i},
                cache_touch=i,
            )
            for i in range(200)
        ]
        tiers = _all_backends(make_tier)

        for tier in tiers:
            for writes, watermark in _history(records):
                tier.commit(writes, watermark)

        expected = digest_records(records)
        for tier in tiers:
            assert tier.digest() == expected, tier

    def test_digest_differs_for_one_changed_byte(self, make_tier):
        records = [
            make_record("ns", f"k{i}", {"text": "memory " * 50, "i": i})
            for i in range(20)
        ]
        changed = list(records)
        changed[5] = msgspec.structs.replace(
            records[5], value={"text": "memory " * 49 + "memorz ", "i": 5}
        )
        original_digest = digest_records(records)[0]
        tiers = _all_backends(make_tier)

        for tier in tiers:
            tier.commit(puts(*changed), watermark=1)

        digests = {tier.digest()[0] for tier in tiers}
        assert len(digests) == 1
        assert original_digest not in digests

    def test_digest_differs_for_one_meta_field(self, make_tier):
        records = [make_record("ns", f"k{i}") for i in range(20)]
        tiers = _all_backends(make_tier)
        for tier in tiers:
            tier.commit(puts(*records), watermark=1)
        before = tiers[0].digest()

        for tier in tiers:
            tier.commit(
                TierWrites(touches=[("ns", "k3", make_meta(access_count=1))]),
                watermark=2,
            )

        digests = {tier.digest() for tier in tiers}
        assert len(digests) == 1
        assert before not in digests

    def test_digest_ignores_dict_order_across_backends(self, make_tier):
        forward = {"a": 1, "b": {"c": 2, "d": [3]}}
        backward = {"b": {"d": [3], "c": 2}, "a": 1}
        memory = make_tier("memory")
        sqlite = make_tier("sqlite")

        memory.commit(puts(make_record("ns", "k", forward)), watermark=1)
        sqlite.commit(puts(make_record("ns", "k", backward)), watermark=1)

        assert memory.digest() == sqlite.digest()

    def test_digest_ignores_watermark(self, make_tier):
        record = make_record("ns", "k")
        memory = make_tier("memory")
        sqlite = make_tier("sqlite")

        memory.commit(puts(record), watermark=1)
        sqlite.commit(puts(record), watermark=900)

        assert memory.digest() == sqlite.digest()


def _monitor(server: RedisServer, action: Callable[[], object]) -> list[str]:
    """Return the commands the server ran during `action`, as MONITOR shows them."""
    marker = f"monitor-end-{uuid.uuid4().hex}"
    commands: list[str] = []
    with server.client(socket_timeout=10) as monitor_client:
        with monitor_client.monitor() as monitor:
            action()
            with server.client() as marker_client:
                marker_client.echo(marker)
            # MONITOR output is ordered, so everything before the marker belongs
            # to the action. The socket timeout bounds the wait if it is lost.
            while True:
                command = monitor.next_command()["command"]
                if marker in command:
                    return commands
                if not command.startswith("HELLO"):
                    commands.append(command)


def _client_names(client: redis.Redis) -> set[str]:
    return {entry["name"] for entry in client.client_list()}


class TestRedisTier:
    def test_shard_keys_share_one_cluster_slot(self, redis_client):
        tier = RedisTier("im", redis_client, 7)

        slots = {
            key_slot(k.encode())
            for k in (tier.values_key, tier.metas_key, tier.control_key)
        }

        assert tier.values_key == "tm:{im:7}:v"
        assert len(slots) == 1

    def test_shards_keep_separate_state(self, redis_client):
        first = RedisTier("stm", redis_client, 0)
        second = RedisTier("stm", redis_client, 1)

        first.commit(puts(make_record("ns", "k")), watermark=5, control={"c": b"1"})

        assert second.get("ns", "k") is None
        assert second.watermark() == 0
        assert second.control("c") is None

    def test_commit_is_one_multi_exec(self, redis_server, redis_client):
        tier = RedisTier("im", redis_client, 0)
        tier.commit(
            puts(make_record("ns", "touched"), make_record("ns", "gone")), watermark=1
        )
        writes = TierWrites(
            puts=[make_record("ns", "new")],
            touches=[("ns", "touched", make_meta(access_count=1))],
            deletes=[("ns", "gone")],
        )

        commands = _monitor(
            redis_server, lambda: tier.commit(writes, 2, {"c": b"1", "d": None})
        )

        assert commands[0] == "MULTI"
        assert commands[-1] == "EXEC"
        assert [c for c in commands if c in ("MULTI", "EXEC")] == ["MULTI", "EXEC"]
        assert any(c.startswith("HSET tm:{im:0}:v ns\\x00new ") for c in commands)
        assert any(c.startswith("HDEL tm:{im:0}:v ns\\x00gone") for c in commands)
        assert any(c.startswith("HEXISTS tm:{im:0}:v ns\\x00touched") for c in commands)
        assert "HSET tm:{im:0}:ctl wm 2 c 1" in commands
        assert "HDEL tm:{im:0}:ctl d" in commands

    def test_records_read_in_chunks(self, redis_server, redis_client):
        tier = RedisTier("im", redis_client, 0, chunk_size=CHUNK_SIZE)
        tier.commit(
            puts(*[make_record("ns", f"{i:04d}") for i in range(1000)]), watermark=1
        )

        commands = _monitor(redis_server, lambda: list(tier.records()))

        hscans = [c for c in commands if c.startswith("HSCAN")]
        hmgets = [c for c in commands if c.startswith("HMGET tm:{im:0}:v")]
        assert len(hscans) > 1
        assert len(hmgets) == 1000 // CHUNK_SIZE
        assert not [
            c for c in commands if c.split()[0] in ("HGETALL", "HKEYS", "HVALS")
        ]

    def test_out_of_memory_commit_changes_nothing(self, redis_client):
        tier = RedisTier("im", redis_client, 0)
        record = make_record("ns", "k")
        tier.commit(puts(record), watermark=1, control={"c": b"old"})
        redis_client.config_set("maxmemory", 1)
        try:
            with pytest.raises(
                StorageError, match="commit failed: .*maxmemory"
            ) as raised:
                tier.commit(
                    puts(make_record("ns", "new")), watermark=2, control={"c": b"new"}
                )
        finally:
            redis_client.config_set("maxmemory", 0)

        assert raised.value.action == "commit"
        assert isinstance(raised.value.__cause__, redis.RedisError)
        assert_unchanged(tier, 1, [record])
        assert tier.control("c") == b"old"

    def test_stores_large_value_compressed(self, redis_client):
        tier = RedisTier("im", redis_client, 0)
        tier.commit(
            puts(
                make_record("ns", "big", "memory " * 1000),
                make_record("ns", "small", 1),
            ),
            1,
        )

        big = redis_client.hget(tier.values_key, b"ns\0big")
        small = redis_client.hget(tier.values_key, b"ns\0small")

        assert big[0] == ZSTD
        assert len(big) < 1000
        assert small[0] == RAW

    def test_stm_stores_values_raw(self, redis_client):
        tier = RedisTier("stm", redis_client, 0)
        tier.commit(puts(make_record("ns", "big", "memory " * 1000)), 1)

        assert redis_client.hget(tier.values_key, b"ns\0big")[0] == RAW

    def test_missing_meta_entry_raises(self, redis_client):
        tier = RedisTier("im", redis_client, 0)
        tier.commit(puts(make_record("ns", "k")), watermark=1)
        redis_client.hdel(tier.metas_key, b"ns\0k")
        redis_client.hset(tier.metas_key, b"ns\0other", b"\x90")

        with pytest.raises(
            CorruptDataError, match=r"\('ns', 'other'\) has no entry in tm:\{im:0\}:v"
        ):
            list(tier.records())
        with pytest.raises(
            CorruptDataError, match=r"\('ns', 'k'\) has no entry in tm:\{im:0\}:m"
        ):
            tier.get("ns", "k")

    def test_rejects_client_decoding_responses(self, redis_server):
        with redis_server.client(decode_responses=True) as client:
            with pytest.raises(ValueError, match="decode_responses=False"):
                RedisTier("stm", client, 0)

    def test_close_leaves_shared_client_open(self, redis_client):
        RedisTier("stm", redis_client, 0).close()

        assert redis_client.ping() is True

    def test_close_closes_owned_client(self, redis_server, redis_client):
        name = f"owned-{uuid.uuid4().hex}"
        tier = RedisTier(
            "stm", redis_server.client(client_name=name), 0, owns_client=True
        )
        tier.commit(TierWrites(), watermark=1)
        assert name in _client_names(redis_client)

        tier.close()

        # The server drops the connection when it reads the close, a moment
        # after the client side has closed it.
        wait_until(
            lambda: name not in _client_names(redis_client),
            timeout=5,
            what="the server to drop the closed connection",
        )

    def test_unreachable_server_raises_storage_error(self):
        client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
        tier = RedisTier("stm", client, 0, owns_client=True)
        try:
            with pytest.raises(
                StorageError, match="stm shard 0: watermark failed"
            ) as raised:
                tier.watermark()
        finally:
            tier.close()

        assert isinstance(raised.value.__cause__, redis.ConnectionError)

    def test_commit_survives_sigkill(self, tmp_path):
        # appendfsync always makes Redis fsync before it replies. With the
        # role's everysec, a kill of the process alone loses nothing in
        # practice either, but that depends on the timing of the background
        # fsync, and this test must not.
        records = [make_record("ns", f"k{i}", {"i": i}) for i in range(100)]
        server = RedisServer(tmp_path, role="stm", appendfsync="always")
        restarted = RedisServer(
            tmp_path, role="stm", port=server.port, appendfsync="always"
        )
        server.start()
        try:
            with server.client() as client:
                tier = RedisTier("stm", client, 3)
                tier.commit(puts(*records), watermark=41)
                tier.commit(
                    TierWrites(deletes=[("ns", "k0")]),
                    watermark=42,
                    control={"c": b"v"},
                )
            server.kill()

            restarted.start()
            with restarted.client() as client:
                tier = RedisTier("stm", client, 3)

                assert tier.watermark() == 42
                assert tier.control("c") == b"v"
                assert list(tier.records()) == sorted(records[1:], key=lambda r: r.key)
        finally:
            server.kill()
            restarted.stop()


class TestSqliteTier:
    def test_reopen_keeps_commits(self, tmp_path):
        path = tmp_path / "ltm-0.db"
        records = [
            make_record("ns", f"k{i:02d}", {"text": "memory " * i}) for i in range(50)
        ]
        tier = SqliteTier("ltm", path, 0)
        tier.commit(puts(*records), watermark=8, control={"c": b"v"})
        tier.put_control("snapshot", b"s")
        digest = tier.digest()
        tier.close()

        reopened = SqliteTier("ltm", path, 0)
        try:
            assert reopened.watermark() == 8
            assert reopened.control("c") == b"v"
            assert reopened.control("snapshot") == b"s"
            assert list(reopened.records()) == records
            assert reopened.digest() == digest
        finally:
            reopened.close()

    def test_uses_wal_and_full_sync(self, tmp_path):
        path = tmp_path / "ltm-0.db"
        tier = SqliteTier("ltm", path, 0)
        try:
            # synchronous is a setting of each connection, so ask the tier's own.
            synchronous = tier._connection.execute("PRAGMA synchronous").fetchone()[0]
            with closing(sqlite3.connect(path)) as other:
                journal_mode = other.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            tier.close()

        assert synchronous == 2  # FULL
        assert journal_mode == "wal"

    def test_failed_commit_rolls_back(self, tmp_path):
        path = tmp_path / "ltm-0.db"
        tier = SqliteTier("ltm", path, 0)
        try:
            kept = make_record("ns", "kept")
            tier.commit(puts(kept), watermark=1, control={"c": b"old"})
            # A trigger makes the third insert of the commit fail after two
            # rows are already written inside the transaction.
            with closing(sqlite3.connect(path)) as admin:
                admin.execute(
                    "CREATE TRIGGER reject_poison BEFORE INSERT ON records "
                    "WHEN NEW.key = 'poison' BEGIN SELECT RAISE(ABORT, 'poison'); END"
                )
            writes = TierWrites(
                puts=[
                    make_record("ns", "a"),
                    make_record("ns", "b"),
                    make_record("ns", "poison"),
                ],
                deletes=[("ns", "kept")],
            )

            with pytest.raises(StorageError, match="commit failed: poison"):
                tier.commit(writes, watermark=2, control={"c": b"new"})

            assert_unchanged(tier, 1, [kept])
            assert tier.control("c") == b"old"
            tier.commit(puts(make_record("ns", "after")), watermark=3)
            assert tier.watermark() == 3
        finally:
            tier.close()

    def test_stores_large_value_compressed(self, tmp_path):
        path = tmp_path / "ltm-0.db"
        tier = SqliteTier("ltm", path, 0)
        try:
            tier.commit(puts(make_record("ns", "big", "memory " * 1000)), watermark=1)
        finally:
            tier.close()

        with closing(sqlite3.connect(path)) as reader:
            (blob,) = reader.execute("SELECT value FROM records").fetchone()
        assert blob[0] == ZSTD
        assert len(blob) < 1000

    def test_rejects_file_of_other_shard(self, tmp_path):
        path = tmp_path / "ltm.db"
        SqliteTier("ltm", path, 0).close()

        with pytest.raises(
            CorruptDataError, match="belongs to ltm shard 0, not ltm shard 1"
        ):
            SqliteTier("ltm", path, 1)

    def test_rejects_newer_schema_version(self, tmp_path):
        path = tmp_path / "ltm.db"
        SqliteTier("ltm", path, 0).close()
        with closing(sqlite3.connect(path)) as admin:
            admin.execute("PRAGMA user_version=2")

        with pytest.raises(CorruptDataError, match="schema version 2"):
            SqliteTier("ltm", path, 0)

    def test_commits_from_two_threads_serialized(self, tmp_path):
        # Without the tier's lock, one thread's BEGIN lands inside the other
        # thread's transaction and raises "cannot start a transaction within
        # a transaction".
        tier = SqliteTier("ltm", tmp_path / "ltm.db", 0)
        errors: list[BaseException] = []

        def commit_many(namespace: str) -> None:
            try:
                for i in range(200):
                    writes = puts(make_record(namespace, f"{i:03d}"))
                    tier.commit(writes, watermark=i + 1, control={namespace: b"%d" % i})
            except BaseException as error:
                errors.append(error)

        workers = [threading.Thread(target=commit_many, args=(ns,)) for ns in "ab"]
        try:
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

            assert errors == []
            assert len(list(tier.records())) == 400
            assert tier.control("a") == b"199"
            assert tier.control("b") == b"199"
        finally:
            tier.close()

    def test_close_twice(self, tmp_path):
        tier = SqliteTier("ltm", tmp_path / "ltm.db", 0)

        tier.close()
        tier.close()

        with pytest.raises(StorageError, match="watermark failed"):
            tier.watermark()
