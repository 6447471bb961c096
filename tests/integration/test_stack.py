"""The embedded stack as separate processes: router kill -9, the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis

from bus.client import Client
from events.log import RedisEventLog
from events.types import Ack, Store, Value
from replay.rebuild import compare_digests, rebuild
from tiermem.config import StackConfig
from tiermem.servers import ServerError
from tiermem.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def stack(ray_cluster, tmp_path: Path):
    config = StackConfig(data_dir=str(tmp_path / "data"), shards=2, ray_address=ray_cluster)
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    running = Stack(config, celery=False)
    running.start()
    yield running
    running.stop()


def test_acked_events_survive_router_kill(stack):
    events = [Store(id=f"e{i}", namespace=f"agent-{i % 7}", key=f"k{i}", value={"i": i}) for i in range(3000)]
    with Client(stack.endpoints) as client:
        replies = client.pipeline(events, window=500)
    assert all(isinstance(reply, Ack) for reply in replies)
    last_acked = max(reply.seq for reply in replies)

    stack.kill_router()
    stack.start_router()

    with Client(stack.endpoints, timeout=30) as client:
        reads = client.pipeline([msgspec.structs.replace(_get(e), id=None) for e in events], window=500)
        live = client.digest()
        resent = client.request(events[0])
    assert [r.value for r in reads if isinstance(r, Value)] == [e.value for e in events]
    assert live.seq >= last_acked
    assert isinstance(resent, Ack)
    assert resent.duplicate is True
    assert resent.seq == replies[0].seq
    event_log = RedisEventLog(redis.Redis.from_url(stack.config.log_url))
    rebuilt = rebuild(event_log, shards=2, policy=stack.config.policy, until_seq=live.seq)
    assert compare_digests(live.tiers, rebuilt.digests) == []


def _get(event: Store):
    from events.types import Get

    return Get(namespace=event.namespace, key=event.key)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TIERMEM_LOG_LEVEL="WARNING"),
    )


def test_publish_and_get_commands(stack):
    lines = "\n".join(
        [
            json.dumps({"type": "Store", "namespace": "cli", "key": "a", "value": "alpha"}),
            json.dumps({"type": "Store", "namespace": "cli", "key": "b", "value": [1, 2]}),
        ]
    )
    published = run_cli("publish", "--data-dir", stack.config.data_dir, "-", stdin=lines)
    replies = [json.loads(line) for line in published.stdout.splitlines()]
    found = run_cli("get", "a", "--namespace", "cli", "--data-dir", stack.config.data_dir)
    missing = run_cli("get", "zzz", "--namespace", "cli", "--data-dir", stack.config.data_dir)
    assert published.returncode == 0, published.stderr
    assert [reply["type"] for reply in replies] == ["Ack", "Ack"]
    assert found.returncode == 0
    assert json.loads(found.stdout)["value"] == "alpha"
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["type"] == "NotFound"


def test_publish_exit_status_on_bad_line(stack):
    lines = json.dumps({"type": "Store", "key": "ok", "value": 1}) + "\n" + '{"type":"Store","key":5}\n'
    published = run_cli("publish", "--data-dir", stack.config.data_dir, stdin=lines)
    replies = [json.loads(line) for line in published.stdout.splitlines()]
    assert published.returncode == 1
    assert {reply["type"] for reply in replies} == {"Ack", "Error"}
    assert any("line 2" in reply.get("message", "") for reply in replies)


def test_get_without_stack_explains(tmp_path):
    result = run_cli("get", "k", "--data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "tiermem up" in result.stderr


def test_router_refuses_unsafe_log(ray_cluster, redis_factory, tmp_path):
    from tiermem.servers import ServerError

    unsafe = redis_factory("log")
    with unsafe.client() as client:
        client.config_set("appendfsync", "no")
    config = StackConfig(data_dir=str(tmp_path / "unsafe"), shards=1, ray_address=ray_cluster, log_url=unsafe.url)
    config.router = msgspec.structs.replace(config.router, ports={"high": 0, "normal": 0, "low": 0, "pub": 0})
    running = Stack(config)
    with pytest.raises(ServerError) as raised:
        running.start(timeout=60)
    assert "appendfsync='no'" in str(raised.value)
    assert "--appendfsync always" in str(raised.value)


def test_second_stack_on_same_directory_rejected(stack):
    second = Stack(StackConfig(data_dir=stack.config.data_dir, shards=2), celery=False)

    with pytest.raises(ServerError, match="a stack already runs in"):
        second.start()

    # The running stack's files are untouched, so its commands still work.
    assert stack.endpoints_path.exists()
    with Client(stack.endpoints) as client:
        assert isinstance(client.request(Store(namespace="lock", key="k", value=1)), Ack)
