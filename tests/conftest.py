"""Shared fixtures: private redis-servers, a Redis Cluster and a Ray head per session, routers.

Every server is started by the fixture on a free port on 127.0.0.1 with its
own data directory, and stopped by PID when the test ends. Nothing here
talks to the Redis on 6379.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import structlog
from redis.crc import REDIS_CLUSTER_HASH_SLOTS

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bus.client import Client  # noqa: E402
from bus.dispatch import LocalDispatcher, RayDispatcher, Waker  # noqa: E402
from bus.router import Router, RouterSettings  # noqa: E402
from events.log import RedisEventLog  # noqa: E402
from handlers.actor import ShardSettings, build_shard  # noqa: E402
from handlers.policy import Policy  # noqa: E402
from tiermem.ray_head import RayHead  # noqa: E402
from tiermem.servers import RedisServer, free_ports, wait_until  # noqa: E402

RANDOM_PORTS = {"high": 0, "normal": 0, "low": 0, "pub": 0}


@pytest.fixture(autouse=True)
def structlog_not_configured() -> Iterator[None]:
    """Fail a test that configures structlog in the test process.

    `configure_logging` caches a level filter in every logger it touches,
    so the log captures of all later tests would see nothing. Run a command
    that configures logging in a child process instead.
    """
    yield
    # `capture_logs` configures processors too, but only `configure_logging`
    # turns on logger caching.
    if structlog.get_config()["cache_logger_on_first_use"]:
        structlog.reset_defaults()
        pytest.fail(
            "this test configured structlog in the test process, which silences the "
            "log captures of later tests; run the command in a child process"
        )


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start redis-servers for roles; every one is stopped at teardown."""
    started: list[RedisServer] = []

    def start(role: str, **kwargs) -> RedisServer:
        server = RedisServer(tmp_path / f"{role}-{len(started)}", role=role, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


class RedisClusterNodes:
    """A Redis Cluster of private redis-servers, primaries only, with the slots split evenly.

    Each node runs with the STM role's settings (`noeviction`, append-only
    file) and keeps `nodes.conf` in its own data directory. Client and
    cluster bus ports are all chosen free, because the default bus port,
    the client port plus 10000, can be taken or above 65535.
    """

    def __init__(self, base_dir: Path, primaries: int = 3) -> None:
        ports = free_ports(2 * primaries)
        self.bus_ports = ports[primaries:]
        self.servers: list[RedisServer] = []
        for index in range(primaries):
            node_dir = base_dir / f"node-{index}"
            cluster_args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "redis-stm" / "nodes.conf"),
                "--cluster-port", str(self.bus_ports[index]),
            )  # fmt: skip
            server = RedisServer(node_dir, role="stm", port=ports[index], extra_args=cluster_args)
            self.servers.append(server)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{server.host}:{server.port}" for server in self.servers)

    def start(self, timeout: float = 20.0) -> RedisClusterNodes:
        """Start the nodes, give each its slot range, join them, and wait until all agree."""
        try:
            for server in self.servers:
                server.start()
            self._join(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _join(self, timeout: float) -> None:
        clients = [server.client() for server in self.servers]
        count = len(clients)
        try:
            for index, client in enumerate(clients):
                first = index * REDIS_CLUSTER_HASH_SLOTS // count
                last = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // count - 1
                # Distinct epochs up front, as `redis-cli --cluster create` sets
                # them, so that the nodes need not resolve an epoch collision.
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for server, bus_port in zip(self.servers[1:], self.bus_ports[1:], strict=True):
                clients[0].execute_command("CLUSTER", "MEET", server.host, server.port, bus_port)
            wait_until(
                lambda: all(self._agrees(client) for client in clients),
                timeout=timeout,
                interval=0.05,
                what="every Redis Cluster node to report cluster_state:ok with all nodes and slots",
            )
        finally:
            for client in clients:
                client.close()

    def _agrees(self, client: redis.Redis) -> bool:
        lines = client.execute_command("CLUSTER", "INFO").decode().splitlines()
        info = dict(line.split(":", 1) for line in lines if ":" in line)
        return (
            info["cluster_state"] == "ok"
            and int(info["cluster_known_nodes"]) == len(self.servers)
            and int(info["cluster_slots_ok"]) == REDIS_CLUSTER_HASH_SLOTS
        )

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterNodes]:
    """Start one 3-primary Redis Cluster for the session. Each test empties it before use."""
    cluster = RedisClusterNodes(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


class Servers:
    """The three Redis servers of one stack: log, STM, IM."""

    def __init__(self, factory: Callable[..., RedisServer], tmp_path: Path) -> None:
        self.log = factory("log")
        self.stm = factory("stm")
        self.im = factory("im")
        self.ltm_dir = tmp_path / "ltm"

    def shard_settings(self, shards: int, policy: Policy = Policy()) -> list[ShardSettings]:
        return [
            ShardSettings(
                shard=index,
                shards=shards,
                log_url=self.log.url,
                stm_url=self.stm.url,
                im_url=self.im.url,
                ltm_dir=str(self.ltm_dir),
                policy=policy,
            )
            for index in range(shards)
        ]

    def event_log(self) -> RedisEventLog:
        return RedisEventLog(redis.Redis.from_url(self.log.url))


@pytest.fixture
def servers(redis_factory, tmp_path: Path) -> Servers:
    return Servers(redis_factory, tmp_path)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One Ray head for the whole session, with this process as a driver."""
    import ray

    head = RayHead(num_cpus=2).start()
    ray.init(address=head.address, namespace="tiermem-tests", log_to_driver=False, logging_level="WARNING")
    yield head.address
    ray.shutdown()
    head.stop()


class RunningRouter:
    """A router serving in a thread of the test process."""

    def __init__(self, router: Router, dispatcher, waker: Waker) -> None:
        self.router = router
        self.dispatcher = dispatcher
        self.waker = waker
        self.endpoints = router.bind()
        self.thread = threading.Thread(target=router.serve_forever, name="router", daemon=True)
        self.thread.start()

    def client(self, **kwargs) -> Client:
        return Client(self.endpoints, **kwargs)

    def stop(self) -> None:
        if not self.thread.is_alive() and not self.router.sockets:
            return
        self.router.stop()
        self.thread.join(timeout=30)
        self.router.close()
        self.dispatcher.close()
        self.waker.close()


@pytest.fixture
def start_router(servers: Servers) -> Iterator[Callable[..., RunningRouter]]:
    """Start a router on random ports with local (in-process) shards."""
    running: list[RunningRouter] = []

    def start(shards: int = 2, *, policy: Policy = Policy(), ray: bool = False, settings: RouterSettings | None = None, event_log=None) -> RunningRouter:
        waker = Waker()
        shard_settings = servers.shard_settings(shards, policy)
        if ray:
            dispatcher = RayDispatcher(shard_settings, waker)
            dispatcher.wait_ready(timeout=120)
        else:
            hosts = [build_shard(item) for item in shard_settings]
            for host in hosts:
                host.recover()
            dispatcher = LocalDispatcher(hosts, waker)
        router_settings = settings or RouterSettings(ports=dict(RANDOM_PORTS))
        router = Router(router_settings, event_log or servers.event_log(), dispatcher, waker)
        item = RunningRouter(router, dispatcher, waker)
        running.append(item)
        return item

    yield start
    for item in reversed(running):
        item.stop()
