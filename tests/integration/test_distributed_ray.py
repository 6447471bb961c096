"""Shard actors on a two-node Ray cluster: placement by resource, and node loss.

Both nodes run on this machine: the head from `RayHead`, and a second node
from `ray start --address HEAD --block` with its own temp dir and ports. A
node is identified by process ancestry, because Ray starts every worker
process as a child of its node's raylet, which is a child of that node's
`ray start`.

The router runs in a child process (through `Stack`), because this test
process may already be a driver of the session's Ray cluster and a process
can connect to only one cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pytest
import redis

from bus.client import Client
from bus.dispatch import placement_resources
from events.log import RedisEventLog
from events.types import Ack, Get, Store, Value
from replay.rebuild import compare_digests, rebuild
from tiermem.config import StackConfig
from tiermem.ray_head import RayHead
from tiermem.servers import ServerError, wait_until
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Offered by both nodes, so a shard actor that requires it can restart on
# either. `node_a` and `node_b` are offered by one node each.
SHARD_RESOURCE = "tiermem_shard"

# How fast the head declares a node dead after its raylet stops replying.
# Ray's defaults (a 3 s period and 5 missed checks in Ray 2.60) take about
# 15 s; these take about 1.5 s.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "0",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


class RayWorkerNode:
    """A Ray node that joins a head with `ray start --address HEAD --block`.

    Like `RayHead`, it uses a short temp dir under /tmp (Ray's socket paths
    must stay under about 107 bytes) and picks every port free.
    """

    def __init__(self, head_address: str, *, resources: dict[str, float], num_cpus: int = 1) -> None:
        self.head_address = head_address
        self.resources = resources
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="tmrayw-", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "ray-start.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        ray = str(Path(sys.executable).with_name("ray"))
        command = [
            ray, "start", "--address", self.head_address, "--block",
            "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.num_cpus),
            "--object-store-memory", str(128 * 1024 * 1024),
            "--temp-dir", self.temp_dir,
            "--disable-usage-stats",
            "--resources", json.dumps(self.resources),
        ]  # fmt: skip
        flags = (
            "--node-manager-port",
            "--object-manager-port",
            "--metrics-export-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
        )
        for flag, port in zip(flags, distinct_free_ports(len(flags)), strict=True):
            command += [flag, str(port)]
        return command

    def start(self, timeout: float = 60.0) -> RayWorkerNode:
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            wait_until(self._ready, timeout=timeout, interval=0.1, what="the Ray worker node")
        except TimeoutError:
            self.kill()
            raise ServerError(f"the Ray worker node did not start within {timeout:.0f}s; see {self.log_path}") from None
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise ServerError(f"`ray start --address` exited with status {self.process.returncode}; see {self.log_path}")
        return b"Ray runtime started" in self.log_path.read_bytes()

    def kill(self) -> None:
        """SIGKILL every process of the node, as a crash of its host would.

        Ray starts each worker process in a session of its own, so killing
        the process group of `ray start` would leave the actors running.
        Every descendant is killed as well.
        """
        if self.process is None or self.process.poll() is not None:
            return
        doomed = descendants(self.process.pid) | {self.process.pid}
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def distinct_free_ports(count: int) -> list[int]:
    """Return `count` different TCP ports that were free on 127.0.0.1 a moment ago.

    Every socket stays bound until all are chosen, so the kernel cannot hand
    out one port twice, as separate `free_port()` calls can.
    """
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def parent_pids() -> dict[int, int]:
    """Return the parent PID of every process, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces, so the
        # fields are counted from the last closing parenthesis.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(root: int) -> set[int]:
    parents = parent_pids()
    found: set[int] = set()
    frontier = {root}
    while frontier:
        children = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found |= children
        frontier = children
    return found


def node_of(pid: int, nodes: dict[str, int]) -> str | None:
    """Return the name in `nodes` (name -> PID of its `ray start`) whose process tree contains `pid`."""
    for name, root in nodes.items():
        if pid in descendants(root):
            return name
    return None


def shard_host_pids(root: int) -> set[int]:
    """Return the PIDs of the `ShardHost` actor processes under `root`.

    Ray titles an actor's worker process `ray::ShardHost` (with the method
    name appended while a call runs).
    """
    found = set()
    for pid in descendants(root):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(b"ray::ShardHost"):
            found.add(pid)
    return found


@pytest.mark.parametrize(
    ("names", "shards", "expected"),
    [
        (None, 3, [None, None, None]),
        (["tiermem_shard"], 3, ["tiermem_shard"] * 3),
        (["node_a", "node_b"], 2, ["node_a", "node_b"]),
    ],
)
def test_placement_resources_per_shard(names, shards, expected):
    assert placement_resources(names, shards) == expected


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b"], "shard_resources has 2 names for 3 shards"),
        ([], "shard_resources has 0 names for 3 shards"),
        (["a", "", "c"], "empty name at position 1"),
    ],
)
def test_placement_resources_rejects_bad_list(names, message):
    with pytest.raises(ValueError, match=message):
        placement_resources(names, 3)
    with pytest.raises(ValueError, match=message):
        StackConfig(shards=3, shard_resources=names)


@pytest.fixture
def cluster(monkeypatch):
    """A head that offers `node_a` and a worker node that offers `node_b`; both offer `tiermem_shard`."""
    for name, value in FAST_HEALTH_CHECKS.items():
        monkeypatch.setenv(name, value)
    head = RayHead(num_cpus=1, resources=json.dumps({"node_a": 10, SHARD_RESOURCE: 10})).start()
    worker = RayWorkerNode(head.address, resources={"node_b": 10, SHARD_RESOURCE: 10})
    try:
        worker.start()
    except BaseException:
        head.stop()
        raise
    yield head, worker
    worker.cleanup()
    head.stop()


# Spawns one shard actor per resource named on the command line. It waits up
# to 60 s until EXPECTED of them have started, then 2 s more for the others,
# and prints the PID of each started actor (null for the others) as one JSON
# line. It keeps its actors alive until its standard input closes.
PLACEMENT_SCRIPT = """
import json, sys
import msgspec, ray
from handlers.actor import ShardSettings, ShardStatusInfo, spawn_shard_actor

address, settings_json, expected, *resources = sys.argv[1:]
ray.init(address=address, namespace="tiermem-placement", log_to_driver=False, logging_level="WARNING")
settings = msgspec.json.decode(settings_json, type=ShardSettings)
# The handles stay referenced: Ray ends an actor once no handle to it is left.
actors = {name: spawn_shard_actor(settings, node_resource=name) for name in resources}
calls = {name: actor.status.remote() for name, actor in actors.items()}
ready, pending = ray.wait(list(calls.values()), num_returns=int(expected), timeout=60)
if pending:
    more, _ = ray.wait(pending, num_returns=len(pending), timeout=2)
    ready += more
pids = {}
for name, call in calls.items():
    pids[name] = msgspec.msgpack.decode(ray.get(call), type=ShardStatusInfo).pid if call in ready else None
print(json.dumps(pids), flush=True)
sys.stdin.read()
"""


def test_node_resource_places_actor(cluster, servers):
    head, worker = cluster
    nodes = {"a": head.process.pid, "b": worker.process.pid}
    settings = msgspec.json.encode(servers.shard_settings(1)[0]).decode()
    script = subprocess.Popen(
        [sys.executable, "-c", PLACEMENT_SCRIPT, head.address, settings, "2", "node_a", "node_b", "node_nowhere"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"),
    )
    try:
        line = script.stdout.readline()
        pids = json.loads(line)
        placed = {name: node_of(pid, nodes) for name, pid in pids.items() if pid is not None}
    finally:
        script.stdin.close()
        script.wait(timeout=60)
        script.stdout.close()
    assert placed == {"node_a": "a", "node_b": "b"}
    assert pids["node_nowhere"] is None


@pytest.fixture
def stack(cluster, tmp_path: Path):
    head, _ = cluster
    config = StackConfig(
        data_dir=str(tmp_path / "data"), shards=2, ray_address=head.address, shard_resources=[SHARD_RESOURCE]
    )
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    running = Stack(config, celery=False)
    running.start()
    yield running
    running.stop()


def stores(first: int, count: int) -> list[Store]:
    return [
        Store(id=f"e{i}", namespace=f"agent-{i % 11}", key=f"k{i}", value={"i": i}) for i in range(first, first + count)
    ]


def test_shards_move_off_killed_node(cluster, stack):
    head, worker = cluster
    nodes = {"a": head.process.pid, "b": worker.process.pid}
    with Client(stack.endpoints, timeout=30) as client:
        before = {shard.shard: shard.pid for shard in client.status().shards}
        placement = {shard: node_of(pid, nodes) for shard, pid in before.items()}
        assert sorted(placement.values()) == ["a", "b"], f"SPREAD placed the shards as {placement}"
        moved = next(shard for shard, node in placement.items() if node == "b")
        stayed = 1 - moved

        first = stores(0, 1500)
        first_replies = client.pipeline(first, window=500)

        worker.kill()
        killed_at = time.monotonic()
        # The router acknowledges a Store once it is in the log, so these are
        # acknowledged while the shard that owns some of them has no actor.
        second = stores(1500, 1500)
        second_replies = client.pipeline(second, window=500)

        def moved_shard_restarted() -> bool:
            return len(shard_host_pids(head.process.pid)) == 2

        wait_until(moved_shard_restarted, timeout=60, interval=0.1, what="the shard actor to restart on the head")
        restart_seconds = time.monotonic() - killed_at

        after = {shard.shard: shard.pid for shard in client.status().shards}
        live = client.digest()
        reads = client.pipeline([Get(namespace=event.namespace, key=event.key) for event in first + second], window=500)

    assert all(isinstance(reply, Ack) for reply in first_replies + second_replies)
    assert after[stayed] == before[stayed]
    assert after[moved] != before[moved]
    assert node_of(after[moved], nodes) == "a"
    assert restart_seconds < 30
    assert [reply.value for reply in reads if isinstance(reply, Value)] == [event.value for event in first + second]
    last_acked = max(reply.seq for reply in second_replies)
    assert live.seq >= last_acked
    event_log = RedisEventLog(redis.Redis.from_url(stack.config.log_url or ""))
    rebuilt = rebuild(event_log, shards=2, policy=stack.config.policy, until_seq=live.seq)
    assert compare_digests(live.tiers, rebuilt.digests) == []
