"""STM and IM on a Redis Cluster: URLs, redirects, slots, doctor, a router on it.

The cluster is the session's `redis_cluster` fixture (three primaries on
127.0.0.1). The tier contract itself runs on it in test_tiers_contract.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from events.log import RedisEventLog
from events.types import Ack, Forget, Get, Maintain, NotFound, Store, Value
from handlers.actor import ShardSettings
from handlers.policy import Policy
from handlers.sharding import shard_of
from replay.erase import erase, stack_files
from tiermem.commands.replay import run
from tiermem.config import StackConfig, write_stack_config
from tiermem.doctor import DoctorOptions, check_tier_redis
from tiermem.servers import RedisServer, wait_until
from tiermem.settings import SettingsError, load_config
from tiers import Meta, Record, RedisTier, TierWrites
from tiers.redis_tier import (
    client_from_url,
    cluster_node_urls,
    is_cluster_url,
    parse_cluster_url,
    redis_key_prefix,
)

SHARDS = 4
SMALL = Policy(cache_capacity=8, stm_capacity=3, im_capacity=4, ltm_capacity=6)
# xxh64 puts these eight namespaces on all four shards.
NAMESPACES = [f"agent-{index}" for index in range(8)]
KEYS = [f"k{index}" for index in range(6)]
FORGOTTEN = "k5"


def make_meta(ts: int = 1_700_000_000_000) -> Meta:
    return Meta(
        importance=0.5,
        tags=("chat",),
        created_ts=ts,
        updated_ts=ts,
        accessed_ts=ts,
        access_count=0,
        version=1,
        tier_since_ts=ts,
    )


@pytest.fixture
def cluster_client(redis_cluster) -> Iterator[RedisCluster]:
    client = client_from_url(redis_cluster.url)
    client.flushall(target_nodes=client.PRIMARIES)
    yield client
    client.close()


# ----------------------------------------------------------- URLs


def test_parse_cluster_url_lists_startup_nodes():
    address = parse_cluster_url(
        "redis+cluster://tiermem:pw@10.0.0.1:7000,[::1]:7001,cache/0?socket_timeout=2"
    )

    assert address.scheme == "redis"
    assert address.userinfo == "tiermem:pw@"
    assert address.nodes == (("10.0.0.1", 7000), ("::1", 7001), ("cache", 6379))
    assert address.query == "?socket_timeout=2"
    assert (
        address.node_url("::1", 7001)
        == "redis://tiermem:pw@[::1]:7001/0?socket_timeout=2"
    )


def test_parse_cluster_url_tls_scheme():
    address = parse_cluster_url("rediss+cluster://10.0.0.1:7000")

    assert address.node_url("10.0.0.1", 7000) == "rediss://10.0.0.1:7000/0"


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis://10.0.0.1:7000/0", "URL scheme 'redis' is not a Redis Cluster scheme"),
        ("redis+cluster://", "Redis Cluster URL names no node"),
        ("redis+cluster://:pw@", "Redis Cluster URL names no node"),
        ("redis+cluster://h:7000/1", "Redis Cluster URL path '/1' is invalid"),
        ("redis+cluster://h:70000", "Redis Cluster node 'h:70000' is invalid"),
        ("redis+cluster://h:7000,,h:7001", "Redis Cluster node '' is invalid"),
        ("redis+cluster://:pw@h:port", "Redis Cluster node 'h:port' is invalid"),
        ("redis+cluster://h:7000#x", "Redis Cluster URL fragment 'x' is invalid"),
    ],
)
def test_parse_cluster_url_rejects_invalid(url, message):
    with pytest.raises(ValueError, match=message) as raised:
        parse_cluster_url(url)

    assert "pw" not in str(raised.value)


def test_is_cluster_url_by_scheme():
    assert is_cluster_url("redis+cluster://h:7000")
    assert is_cluster_url("REDISS+CLUSTER://h:7000")
    assert not is_cluster_url("redis://h:7000/0")
    assert not is_cluster_url("unix:///run/redis.sock")


def test_client_from_plain_url_is_redis():
    client = client_from_url("redis://127.0.0.1:1/0")

    assert type(client) is redis.Redis
    client.close()


def test_settings_accept_cluster_url_for_tiers_only():
    url = "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"

    config = load_config(None, environ={"TIERMEM_STM_URL": url, "TIERMEM_IM_URL": url})
    with pytest.raises(SettingsError) as log_error:
        load_config(None, environ={"TIERMEM_LOG_URL": url})
    with pytest.raises(SettingsError) as node_error:
        load_config(None, environ={"TIERMEM_IM_URL": "redis+cluster://h:port"})

    assert config.stm_url == url
    assert config.im_url == url
    assert log_error.value.problems == [
        "log_url: expected a Redis URL (redis://, rediss://, unix://), "
        f'got "{url}" (from TIERMEM_LOG_URL)'
    ]
    assert node_error.value.problems == [
        "im_url: expected a Redis or Redis Cluster URL (redis://, rediss://, unix://, "
        'redis+cluster://, rediss+cluster://), got "redis+cluster://h:port" '
        "(from TIERMEM_IM_URL)"
    ]


# ----------------------------------------------------------- the tier on a cluster


def _slot_owner_port(client: redis.Redis, slot: int) -> int:
    """Return the port of the node that serves `slot`, from one node's CLUSTER SLOTS."""
    for first, last, (_, port, *_), *_ in client.execute_command("CLUSTER", "SLOTS"):
        if first <= slot <= last:
            return port
    raise AssertionError(f"no node serves slot {slot}")


def _owner(redis_cluster, key: str) -> RedisServer:
    with redis_cluster.servers[0].client() as client:
        port = _slot_owner_port(client, key_slot(key.encode()))
    return next(server for server in redis_cluster.servers if server.port == port)


def _monitor_nodes(
    servers: list[RedisServer], action: Callable[[], object]
) -> dict[int, list[str]]:
    """Return the commands each node ran during `action`, by port, as MONITOR shows them."""
    marker = f"monitor-end-{uuid.uuid4().hex}"
    commands: dict[int, list[str]] = {server.port: [] for server in servers}
    with ExitStack() as stack:
        monitors = {}
        for server in servers:
            client = stack.enter_context(server.client(socket_timeout=10))
            monitors[server.port] = stack.enter_context(client.monitor())
        action()
        for server in servers:
            with server.client() as marker_client:
                marker_client.echo(marker)
            # MONITOR output is ordered, so everything before the marker
            # belongs to the action. The socket timeout bounds a lost marker.
            while True:
                command = monitors[server.port].next_command()["command"]
                if marker in command:
                    break
                commands[server.port].append(command)
    return commands


@pytest.mark.integration
def test_client_from_cluster_url_finds_every_primary(redis_cluster, cluster_client):
    ports = sorted(node.port for node in cluster_client.get_primaries())

    assert isinstance(cluster_client, RedisCluster)
    assert ports == sorted(server.port for server in redis_cluster.servers)
    assert cluster_node_urls(redis_cluster.url) == sorted(
        f"redis://127.0.0.1:{server.port}/0" for server in redis_cluster.servers
    )


@pytest.mark.integration
def test_client_from_unreachable_cluster_raises():
    # Port 1 is privileged, and nothing these tests start listens there.
    with pytest.raises(redis.exceptions.RedisClusterException, match="cannot be connected"):
        client_from_url("redis+cluster://127.0.0.1:1")


@pytest.mark.integration
def test_tier_rejects_decoding_cluster_client(redis_cluster):
    client = client_from_url(redis_cluster.url, decode_responses=True)

    try:
        with pytest.raises(ValueError, match="decodes responses to str"):
            RedisTier("stm", client, 0)
    finally:
        client.close()


@pytest.mark.integration
def test_commit_is_one_multi_exec_on_slot_owner(redis_cluster, cluster_client):
    tier = RedisTier("im", cluster_client, 2)
    owner = _owner(redis_cluster, tier.values_key)
    first = [Record("ns", "k", 1, make_meta()), Record("ns", "gone", 2, make_meta())]
    tier.commit(TierWrites(puts=first), watermark=1)
    writes = TierWrites(
        puts=[Record("ns", "new", 3, make_meta())],
        touches=[("ns", "k", make_meta(1_700_000_000_001))],
        deletes=[("ns", "gone")],
    )

    commands = _monitor_nodes(
        redis_cluster.servers, lambda: tier.commit(writes, watermark=2)
    )

    on_owner = [c for c in commands[owner.port] if "tm:{" in c or c in ("MULTI", "EXEC")]
    assert on_owner[0] == "MULTI"
    assert on_owner[-1] == "EXEC"
    assert any(c.startswith("EVAL ") for c in on_owner)
    assert any(c.startswith("HDEL tm:{im:2}:v ns\\x00gone") for c in on_owner)
    assert "HSET tm:{im:2}:ctl wm 2" in on_owner
    for server in redis_cluster.servers:
        if server is not owner:
            assert [c for c in commands[server.port] if "tm:{" in c] == []
    assert tier.watermark() == 2
    assert tier.get("ns", "k").meta.accessed_ts == 1_700_000_000_001
    assert tier.get("ns", "gone") is None


def _move_slot(redis_cluster, slot: int, target: RedisServer) -> None:
    """Move `slot` and its keys to `target`, in the steps of `redis-cli --cluster reshard`."""
    with ExitStack() as stack:
        clients = {
            server.port: stack.enter_context(server.client())
            for server in redis_cluster.servers
        }
        ids = {
            port: client.execute_command("CLUSTER", "MYID").decode()
            for port, client in clients.items()
        }
        source_port = _slot_owner_port(clients[target.port], slot)
        source, destination = clients[source_port], clients[target.port]
        others = [c for p, c in clients.items() if p not in (source_port, target.port)]

        destination.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source_port])
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
        keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            source.execute_command(
                "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys
            )
        for client in (destination, source, *others):
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])

        wait_until(
            lambda: all(
                _slot_owner_port(client, slot) == target.port
                for client in clients.values()
            ),
            timeout=10,
            what=f"every node to assign slot {slot} to port {target.port}",
        )


@pytest.mark.integration
def test_tier_follows_moved_after_resharding(redis_cluster, cluster_client):
    tier = RedisTier("stm", cluster_client, 1)
    slot = key_slot(tier.values_key.encode())
    source = _owner(redis_cluster, tier.values_key)
    target = next(server for server in redis_cluster.servers if server is not source)
    tier.commit(TierWrites(puts=[Record("ns", "before", {"n": 1}, make_meta())]), watermark=1)

    _move_slot(redis_cluster, slot, target)
    try:
        # The client still maps the slot to `source`, which replies with MOVED.
        after = Record("ns", "after", {"n": 2}, make_meta())
        tier.commit(TierWrites(puts=[after]), watermark=2)
        moved_keys = [record.key for record in tier.records()]
        moved_watermark = tier.watermark()
        with target.client() as direct:
            on_target = direct.hlen(tier.values_key)
    finally:
        _move_slot(redis_cluster, slot, source)
    read_back = tier.get("ns", "after")

    assert moved_keys == ["after", "before"]
    assert moved_watermark == 2
    assert on_target == 2
    assert read_back is not None
    assert read_back.value == {"n": 2}


# ----------------------------------------------------------- doctor


@pytest.mark.integration
def test_doctor_checks_every_cluster_node(redis_cluster):
    bad = redis_cluster.servers[1]
    options = DoctorOptions(timeout_s=5)

    passed = check_tier_redis("stm", redis_cluster.url, options)
    with bad.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            failed = check_tier_redis("im", redis_cluster.url, options)
        finally:
            client.config_set("maxmemory-policy", "noeviction")

    assert passed.ok, passed.detail
    assert passed.detail.startswith(f"{redis_cluster.url}: 3 nodes: ")
    assert passed.detail.count("maxmemory-policy noeviction") == 3
    assert not failed.ok
    assert failed.detail.startswith(
        f"1 of 3 nodes of the IM Redis Cluster at {redis_cluster.url} failed: "
    )
    assert f"redis://127.0.0.1:{bad.port}/0" in failed.detail
    assert "maxmemory-policy is 'allkeys-lru'" in failed.detail
    assert "CONFIG SET maxmemory-policy noeviction" in failed.fix


@pytest.mark.integration
def test_doctor_reports_unreachable_cluster():
    url = "redis+cluster://127.0.0.1:1"

    check = check_tier_redis("stm", url, DoctorOptions(timeout_s=1))

    assert not check.ok
    assert check.detail.startswith(f"cannot reach the STM Redis Cluster at {url}: ")
    assert "correct stm_url" in check.fix


# ----------------------------------------------------------- a router on the cluster


class ClusterServers:
    """The `servers` fixture of conftest.py, with STM and IM on the Redis Cluster."""

    def __init__(self, log: RedisServer, cluster_url: str, ltm_dir: Path) -> None:
        self.log = log
        self.cluster_url = cluster_url
        self.ltm_dir = ltm_dir

    def shard_settings(self, shards: int, policy: Policy = Policy()) -> list[ShardSettings]:
        return [
            ShardSettings(
                shard=index,
                shards=shards,
                log_url=self.log.url,
                stm_url=self.cluster_url,
                im_url=self.cluster_url,
                ltm_dir=str(self.ltm_dir),
                policy=policy,
            )
            for index in range(shards)
        ]

    def event_log(self) -> RedisEventLog:
        return RedisEventLog(redis.Redis.from_url(self.log.url))

    def write_stack_dir(self, data_dir: Path, endpoints: dict[str, str]) -> None:
        """Write the stack.json and endpoints.json that `tiermem replay` reads."""
        config = StackConfig(
            data_dir=str(data_dir),
            shards=SHARDS,
            policy=SMALL,
            log_url=self.log.url,
            stm_url=self.cluster_url,
            im_url=self.cluster_url,
        )
        write_stack_config(config, data_dir / "stack.json")
        (data_dir / "endpoints.json").write_text(json.dumps(endpoints))


@pytest.fixture
def servers(redis_factory, redis_cluster, cluster_client, tmp_path) -> ClusterServers:
    """Override conftest's `servers`, so that `start_router` puts the tiers on the cluster."""
    return ClusterServers(redis_factory("log"), redis_cluster.url, tmp_path / "ltm")


def workload() -> list:
    """Return stores, a read and a forget in every namespace, then one maintenance pass."""
    events: list = []
    for namespace in NAMESPACES:
        for index, key in enumerate(KEYS):
            value = {"ns": namespace, "k": key}
            events.append(Store(namespace=namespace, key=key, value=value, importance=index / 10))
        events.append(Get(namespace=namespace, key="k0"))
        events.append(Forget(namespace=namespace, key=FORGOTTEN))
    events.append(Maintain())
    return events


def cluster_records(cluster_client, tier: str) -> set[tuple[str, str]]:
    """Return the (namespace, key) of every record of `tier`, over all shards."""
    return {
        (record.namespace, record.key)
        for shard in range(SHARDS)
        for record in RedisTier(tier, cluster_client, shard).records()
    }


def verify(data_dir: Path, capsys) -> tuple[int, dict]:
    status = run(["replay", "--verify", "--local", "--json", "--data-dir", str(data_dir)])
    return status, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.integration
def test_router_on_cluster_serves_and_verifies(
    start_router, servers, cluster_client, tmp_path, capsys
):
    router = start_router(shards=SHARDS, policy=SMALL)
    events = workload()
    identities = [(namespace, key) for namespace in NAMESPACES for key in KEYS]
    with router.client() as client:
        replies = client.pipeline(events)
        reads = client.pipeline([Get(namespace=ns, key=key) for ns, key in identities])
        # A Digest is queued behind every event sequenced before it, so the
        # shards have applied all the events above when it returns.
        applied_seq = client.digest().seq
    servers.write_stack_dir(tmp_path, router.endpoints)

    status, summary = verify(tmp_path, capsys)

    assert {shard_of(namespace, SHARDS) for namespace in NAMESPACES} == set(range(SHARDS))
    for event, reply in zip(events, replies, strict=True):
        assert isinstance(reply, Value if isinstance(event, Get) else Ack), (event, reply)
    for (namespace, key), reply in zip(identities, reads, strict=True):
        if key == FORGOTTEN:
            assert isinstance(reply, NotFound), (namespace, key, reply)
        else:
            assert isinstance(reply, Value), (namespace, key, reply)
            assert reply.value == {"ns": namespace, "k": key}
    assert applied_seq == len(events) + len(identities)
    # Five live keys per namespace and stm_capacity 3: the pass moved two
    # records of each namespace to IM.
    assert len(cluster_records(cluster_client, "stm")) == 3 * len(NAMESPACES)
    assert len(cluster_records(cluster_client, "im")) == 2 * len(NAMESPACES)
    assert status == 0, summary
    assert summary["verified"] is True
    assert summary["events"] > 0
    assert [item["verified"] for item in summary["shards"]] == [True] * SHARDS


@pytest.mark.integration
def test_namespace_keys_share_one_slot(start_router, redis_cluster, cluster_client):
    router = start_router(shards=SHARDS, policy=SMALL)
    with router.client() as client:
        client.pipeline(workload())
        client.digest()

    # Every key of every primary, found by SCAN on each node, and the
    # namespaces in its hash fields.
    slots: dict[tuple[str, str], set[int]] = {}
    nodes_with_keys = set()
    for node in cluster_client.get_primaries():
        direct = node.redis_connection
        for key in direct.scan_iter(count=1000):
            nodes_with_keys.add(node.port)
            name = key.decode()
            if name.endswith(":ctl"):
                continue
            tier = name.removeprefix("tm:{").split(":", 1)[0]
            for field in direct.hkeys(key):
                namespace = field.decode().partition("\0")[0]
                slots.setdefault((tier, namespace), set()).add(key_slot(key))

    expected = {}
    for tier in ("stm", "im"):
        for namespace in NAMESPACES:
            prefix = redis_key_prefix(tier, shard_of(namespace, SHARDS))
            expected[tier, namespace] = {key_slot(f"{prefix}:v".encode())}
    assert slots == expected
    assert nodes_with_keys == {server.port for server in redis_cluster.servers}


@pytest.mark.integration
def test_verify_lists_tampered_key_on_cluster(
    start_router, servers, cluster_client, tmp_path, capsys
):
    router = start_router(shards=SHARDS, policy=SMALL)
    with router.client() as client:
        client.pipeline(workload())
        client.digest()
    servers.write_stack_dir(tmp_path, router.endpoints)
    stm = RedisTier("stm", cluster_client, 0)
    original = next(iter(stm.records()))
    tampered = Record(original.namespace, original.key, "tampered", original.meta)
    stm.commit(TierWrites(puts=[tampered]), watermark=stm.watermark())

    status, summary = verify(tmp_path, capsys)

    assert status == 1
    differences = summary["shards"][0]["differences"]
    assert [(item["tier"], item["namespace"], item["key"]) for item in differences] == [
        ("stm", original.namespace, original.key)
    ]


# ----------------------------------------------------------- erasure


def test_stack_files_keeps_cluster_urls(tmp_path):
    config = StackConfig(
        data_dir=str(tmp_path),
        stm_url="redis+cluster://10.0.0.7:7000,10.0.0.8:7000",
        im_url="rediss+cluster://10.0.0.7:7001",
    )

    _, urls = stack_files(config)

    assert "redis+cluster://10.0.0.7:7000,10.0.0.8:7000" in urls
    assert "rediss+cluster://10.0.0.7:7001" in urls


@pytest.mark.integration
def test_erase_rewrites_aof_of_every_cluster_node(redis_cluster, cluster_client, servers, tmp_path):
    nodes = [server.client() for server in redis_cluster.servers]
    cluster_client.set("tm:{agent-1:0}:forgotten", b"a value to drop from the AOF")
    before = [int(node.info("persistence")["aof_rewrites"]) for node in nodes]

    report = erase(tmp_path, servers.event_log(), redis_urls=[redis_cluster.url], force=True)

    after = [int(node.info("persistence")["aof_rewrites"]) for node in nodes]
    for node in nodes:
        node.close()
    assert report.aof_rewritten == cluster_node_urls(redis_cluster.url)
    assert len(report.aof_rewritten) == len(redis_cluster.servers)
    assert all(now > then for now, then in zip(after, before, strict=True))
